"""Wire types: ``PeerInfo``, ``InboundMessage``, ``DisconnectReason``, ``JsonRpcError``.

Issue 3, bullet 2: they validate their fields (32-byte peer id, opcode
0..=255) with errors that name the field.
"""

from __future__ import annotations

import copy
import pickle

import pytest

from dig_service import DisconnectReason, InboundMessage, JsonRpcError, PeerInfo

PEER = bytes(range(32))


# --------------------------------------------------------------------------- PeerInfo


def test_peer_info_keeps_its_fields_and_compares_by_value() -> None:
    """Proves: a valid ``PeerInfo`` keeps its fields, compares and hashes by value,
    accepts a bytearray peer id (stored as bytes), and is immutable.

    Catches: identity equality (two infos of one peer not equal), a mutable value
    object shared between connection handlers.
    """
    info = PeerInfo(PEER, "10.0.0.1:9444", "full_node")
    assert (info.peer_id, info.remote_addr, info.node_type) == (PEER, "10.0.0.1:9444", "full_node")
    same = PeerInfo(bytearray(PEER), "10.0.0.1:9444", "full_node")
    assert same == info and hash(same) == hash(info)
    assert type(same.peer_id) is bytes
    assert info != PeerInfo(PEER, "10.0.0.2:9444", "full_node")
    with pytest.raises(AttributeError):
        info.node_type = "wallet"  # type: ignore[misc]
    assert pickle.loads(pickle.dumps(info)) == info
    assert "PeerInfo(peer_id=bytes.fromhex(" in repr(info)


@pytest.mark.parametrize("length", [0, 31, 33, 64])
def test_peer_info_rejects_a_peer_id_that_is_not_32_bytes(length: int) -> None:
    """Proves: a peer id of any length but 32 is a ``ValueError`` naming ``peer_id``
    and saying what was given.

    Catches: truncated/hex-encoded ids accepted silently and failing later as
    unknown peers.
    """
    with pytest.raises(ValueError, match=rf"`peer_id` must be exactly 32 bytes.*got {length}"):
        PeerInfo(bytes(length), "1.2.3.4:1", "full_node")


@pytest.mark.parametrize("bad", [PEER.hex(), 12, None, list(PEER)])
def test_peer_info_rejects_a_peer_id_that_is_not_bytes(bad: object) -> None:
    """Proves: a peer id that is not bytes-like is a ``TypeError`` naming ``peer_id``
    (with a hint to decode a hex string).

    Catches: a hex ``str`` id (64 chars) passing as "some sequence".
    """
    with pytest.raises(TypeError, match="`peer_id` must be bytes"):
        PeerInfo(bad, "1.2.3.4:1", "full_node")  # type: ignore[arg-type]


@pytest.mark.parametrize("field", ["remote_addr", "node_type"])
def test_peer_info_rejects_non_str_text_fields(field: str) -> None:
    """Proves: ``remote_addr``/``node_type`` must be ``str``; the error names the field.

    Catches: bytes or tuples (``("1.2.3.4", 1)``) stored where logs expect text.
    """
    kwargs: dict[str, object] = {"remote_addr": "1.2.3.4:1", "node_type": "full_node"}
    kwargs[field] = ("1.2.3.4", 1)
    with pytest.raises(TypeError, match=f"`{field}` must be str"):
        PeerInfo(PEER, **kwargs)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- InboundMessage


@pytest.mark.parametrize("opcode", [0, 1, 127, 255])
def test_inbound_message_accepts_every_one_byte_opcode(opcode: int) -> None:
    """Proves: opcodes 0 and 255 (the bounds) and values between are accepted, and the
    message compares by value.

    Catches: an off-by-one bound (rejecting 0 or 255).
    """
    msg = InboundMessage(opcode, b"\x01\x02")
    assert (msg.opcode, msg.payload) == (opcode, b"\x01\x02")
    assert msg == InboundMessage(opcode, bytearray(b"\x01\x02"))
    assert pickle.loads(pickle.dumps(msg)) == msg


@pytest.mark.parametrize("opcode", [-1, 256, 10**6])
def test_inbound_message_rejects_an_opcode_outside_one_byte(opcode: int) -> None:
    """Proves: an opcode outside 0..=255 is a ``ValueError`` naming ``opcode`` and the value.

    Catches: an opcode silently truncated to a byte (300 -> 44) and dispatched to
    the wrong handler.
    """
    with pytest.raises(ValueError, match=rf"`opcode` must be in 0..=255.*got {opcode}"):
        InboundMessage(opcode, b"")


@pytest.mark.parametrize("opcode", [True, 1.0, "1", None])
def test_inbound_message_rejects_an_opcode_that_is_not_an_int(opcode: object) -> None:
    """Proves: a non-int opcode (including ``bool``) is a ``TypeError`` naming ``opcode``.

    Catches: ``True`` passing as opcode 1, floats passing as ints.
    """
    with pytest.raises(TypeError, match="`opcode` must be int"):
        InboundMessage(opcode, b"")  # type: ignore[arg-type]


def test_inbound_message_rejects_a_payload_that_is_not_bytes() -> None:
    """Proves: a ``str`` payload is a ``TypeError`` naming ``payload``.

    Catches: text payloads whose encoding is then guessed downstream.
    """
    with pytest.raises(TypeError, match="`payload` must be bytes"):
        InboundMessage(1, "hello")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- DisconnectReason


REASONS = [
    DisconnectReason.Graceful(),
    DisconnectReason.LocalClose(),
    DisconnectReason.Transport("reset by peer"),
    DisconnectReason.ProtocolViolation("bad handshake"),
]


def describe(reason: DisconnectReason) -> str:
    match reason:
        case DisconnectReason.Graceful():
            return "graceful"
        case DisconnectReason.LocalClose():
            return "local"
        case DisconnectReason.Transport(message):
            return f"transport:{message}"
        case DisconnectReason.ProtocolViolation(message=message):
            return f"violation:{message}"
    return "unknown"


def test_disconnect_reason_variants_match_and_compare_by_value() -> None:
    """Proves: every variant is a ``DisconnectReason``, works with ``match`` (positional
    and keyword patterns), compares and hashes by value, and its ``repr`` reads as the
    constructor call.

    Catches: variants that are not subclasses (``isinstance`` fails), identity
    equality, ``match`` falling through for lack of ``__match_args__``.
    """
    assert [describe(r) for r in REASONS] == [
        "graceful",
        "local",
        "transport:reset by peer",
        "violation:bad handshake",
    ]
    for reason in REASONS:
        assert isinstance(reason, DisconnectReason)
        assert copy.deepcopy(reason) == reason
        assert pickle.loads(pickle.dumps(reason)) == reason
    assert DisconnectReason.Transport("x") == DisconnectReason.Transport("x")
    assert DisconnectReason.Transport("x") != DisconnectReason.Transport("y")
    assert DisconnectReason.Transport("x") != DisconnectReason.ProtocolViolation("x")
    assert DisconnectReason.Graceful() != DisconnectReason.LocalClose()
    assert len({*REASONS, DisconnectReason.Graceful()}) == 4
    assert repr(REASONS[2]) == "DisconnectReason.Transport(message='reset by peer')"
    assert str(REASONS[3]) == "protocol violation: bad handshake"


def test_disconnect_reason_rejects_bad_construction() -> None:
    """Proves: the union itself cannot be instantiated (the error shows a variant to
    use), a message must be ``str`` (error names ``message``), a fieldless variant takes
    no argument, and variants are immutable.

    Catches: ``DisconnectReason()`` creating a value no ``match`` arm handles.
    """
    with pytest.raises(TypeError, match=r"use a variant, e\.g\. DisconnectReason\.Graceful"):
        DisconnectReason()
    with pytest.raises(TypeError, match="`message` must be str"):
        DisconnectReason.Transport(b"reset")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        DisconnectReason.Graceful("why")  # type: ignore[call-arg]
    with pytest.raises(AttributeError):
        REASONS[2].message = "other"  # type: ignore[misc]


# --------------------------------------------------------------------------- JsonRpcError


def test_json_rpc_error_is_an_exception_with_code_message_and_data() -> None:
    """Proves: ``JsonRpcError(code, message, data=None)`` is an ``Exception`` keeping
    its fields, renders as a JSON-RPC error object, and survives pickling (it crosses
    process pools in RPC servers).

    Catches: a non-Exception (cannot be raised from ``dispatch``), a ``data`` slot
    that is lost, an unpicklable error.
    """
    err = JsonRpcError(-32000, "busy", {"retry_after": 1})
    assert isinstance(err, Exception)
    assert (err.code, err.message, err.data) == (-32000, "busy", {"retry_after": 1})
    assert err.to_dict() == {"code": -32000, "message": "busy", "data": {"retry_after": 1}}
    assert JsonRpcError(1, "x").to_dict() == {"code": 1, "message": "x"}
    assert str(err) == "JSON-RPC error -32000: busy"
    back = pickle.loads(pickle.dumps(err))
    assert (back.code, back.message, back.data) == (err.code, err.message, err.data)
    with pytest.raises(JsonRpcError) as info:
        raise JsonRpcError(-32602, "invalid params")
    assert info.value.code == -32602


@pytest.mark.parametrize(
    ("args", "field"), [(("-32000", "busy"), "code"), ((True, "busy"), "code"), ((1, 2), "message")]
)
def test_json_rpc_error_validates_code_and_message(args: tuple[object, object], field: str) -> None:
    """Proves: a non-int ``code`` (including bool) or non-str ``message`` is a
    ``TypeError`` naming the field.

    Catches: string codes that break JSON-RPC clients expecting an integer.
    """
    with pytest.raises(TypeError, match=f"`{field}` must be"):
        JsonRpcError(*args)  # type: ignore[arg-type]
