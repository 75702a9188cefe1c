"""The values a peer API and an RPC API exchange.

Every constructor validates its fields and, on bad input, raises a
``TypeError`` (wrong type) or ``ValueError`` (right type, bad value) whose
message names the field and says what was given, so the mistake is found
where it is made rather than deep inside a connection handler.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Final, TypeAlias, final

from ._variant import Variant, publish_variants

__all__ = ["DisconnectReason", "InboundMessage", "JsonRpcError", "PeerInfo"]

PEER_ID_LEN: Final = 32
"""Length of a peer id in bytes (a SHA-256 of the remote certificate's key)."""


def _type_name(value: object) -> str:
    return type(value).__name__


def _check_str(value: object, owner: str, field: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{owner}: `{field}` must be str, got {_type_name(value)}")
    return value


def _check_bytes(value: object, owner: str, field: str) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    hint = (
        " (to pass a hex string, decode it: bytes.fromhex(...))" if isinstance(value, str) else ""
    )
    raise TypeError(
        f"{owner}: `{field}` must be bytes (or bytearray/memoryview){hint}, got {_type_name(value)}"
    )


def check_peer_id(value: object, owner: str, field: str = "peer_id") -> bytes:
    """Return ``value`` as ``bytes`` if it is a valid peer id, else raise.

    Raises:
        TypeError: ``value`` is not bytes-like.
        ValueError: it is not exactly 32 bytes long.
    """
    peer_id = _check_bytes(value, owner, field)
    if len(peer_id) != PEER_ID_LEN:
        raise ValueError(
            f"{owner}: `{field}` must be exactly {PEER_ID_LEN} bytes "
            f"(a SHA-256 digest), got {len(peer_id)} bytes"
        )
    return peer_id


@final
class PeerInfo:
    """What is known about a peer once its handshake succeeded.

    Immutable; compares and hashes by value.

    Args:
        peer_id: exactly 32 bytes (typically ``SHA256(remote cert pubkey)``).
        remote_addr: the remote ``"ip:port"``.
        node_type: the node type the peer declared (for logs).

    Raises:
        TypeError: a field has the wrong type (the message names it).
        ValueError: ``peer_id`` is not exactly 32 bytes.
    """

    __slots__ = ("node_type", "peer_id", "remote_addr")
    __match_args__ = ("peer_id", "remote_addr", "node_type")

    peer_id: bytes
    remote_addr: str
    node_type: str

    def __init__(self, peer_id: bytes, remote_addr: str, node_type: str) -> None:
        owner = "PeerInfo"
        object.__setattr__(self, "peer_id", check_peer_id(peer_id, owner))
        object.__setattr__(self, "remote_addr", _check_str(remote_addr, owner, "remote_addr"))
        object.__setattr__(self, "node_type", _check_str(node_type, owner, "node_type"))

    def _values(self) -> tuple[bytes, str, str]:
        return (self.peer_id, self.remote_addr, self.node_type)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, PeerInfo):
            return self._values() == other._values()
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        return (
            f"PeerInfo(peer_id=bytes.fromhex({self.peer_id.hex()!r}), "
            f"remote_addr={self.remote_addr!r}, node_type={self.node_type!r})"
        )

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("PeerInfo is immutable; build a new one instead")

    def __delattr__(self, name: str) -> None:
        raise AttributeError("PeerInfo is immutable")

    def __reduce__(self) -> tuple[type[PeerInfo], tuple[bytes, str, str]]:
        return (PeerInfo, self._values())


@final
class InboundMessage:
    """A raw inbound peer-protocol message; decoding it is the binary's business.

    Immutable; compares and hashes by value.

    Args:
        opcode: the message opcode, an ``int`` in ``0..=255``.
        payload: the raw payload (bytes; a bytearray or memoryview is copied).

    Raises:
        TypeError: ``opcode`` is not an int, or ``payload`` is not bytes-like.
        ValueError: ``opcode`` is outside ``0..=255``.
    """

    __slots__ = ("opcode", "payload")
    __match_args__ = ("opcode", "payload")

    opcode: int
    payload: bytes

    def __init__(self, opcode: int, payload: bytes) -> None:
        owner = "InboundMessage"
        if isinstance(opcode, bool) or not isinstance(opcode, int):
            raise TypeError(f"{owner}: `opcode` must be int (0..=255), got {_type_name(opcode)}")
        if not 0 <= opcode <= 255:
            raise ValueError(f"{owner}: `opcode` must be in 0..=255 (one byte), got {opcode}")
        object.__setattr__(self, "opcode", int(opcode))
        object.__setattr__(self, "payload", _check_bytes(payload, owner, "payload"))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, InboundMessage):
            return (self.opcode, self.payload) == (other.opcode, other.payload)
        return NotImplemented

    def __hash__(self) -> int:
        return hash((self.opcode, self.payload))

    def __repr__(self) -> str:
        return f"InboundMessage(opcode={self.opcode}, payload={self.payload!r})"

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("InboundMessage is immutable; build a new one instead")

    def __delattr__(self, name: str) -> None:
        raise AttributeError("InboundMessage is immutable")

    def __reduce__(self) -> tuple[type[InboundMessage], tuple[int, bytes]]:
        return (InboundMessage, (self.opcode, self.payload))


class DisconnectReason:
    """Why a peer disconnected.

    Variants: ``DisconnectReason.Graceful()``, ``.LocalClose()``,
    ``.Transport(message)``, ``.ProtocolViolation(message)``. Each variant is
    a ``DisconnectReason``, is immutable, compares by value, and works with
    ``match``::

        match reason:
            case DisconnectReason.Transport(message):
                log.warning("transport failed: %s", message)
            case DisconnectReason.Graceful():
                pass

    ``DisconnectReason`` itself cannot be instantiated.
    """

    __slots__ = ()

    if TYPE_CHECKING:
        Graceful: TypeAlias = "_Graceful"
        LocalClose: TypeAlias = "_LocalClose"
        Transport: TypeAlias = "_Transport"
        ProtocolViolation: TypeAlias = "_ProtocolViolation"

    def __new__(cls, *args: object, **kwargs: object) -> DisconnectReason:
        if cls is DisconnectReason:
            raise TypeError(
                "DisconnectReason cannot be instantiated; use a variant, e.g. "
                "DisconnectReason.Graceful() or DisconnectReason.Transport('reset by peer')"
            )
        return super().__new__(cls)


@final
class _Graceful(Variant, DisconnectReason):
    """The peer closed the connection cleanly."""

    __slots__ = ()

    def __init__(self) -> None:
        pass

    def __str__(self) -> str:
        return "graceful"


@final
class _LocalClose(Variant, DisconnectReason):
    """The local side closed the connection (shutdown, eviction)."""

    __slots__ = ()

    def __init__(self) -> None:
        pass

    def __str__(self) -> str:
        return "local close"


@final
class _Transport(Variant, DisconnectReason):
    """The transport failed; ``message`` says how."""

    __slots__ = ("message",)
    __match_args__ = ("message",)
    message: str

    def __init__(self, message: str) -> None:
        self._init_fields(_check_str(message, "DisconnectReason.Transport", "message"))

    def __str__(self) -> str:
        return f"transport error: {self.message}"


@final
class _ProtocolViolation(Variant, DisconnectReason):
    """The peer broke the protocol (and was banned); ``message`` says how."""

    __slots__ = ("message",)
    __match_args__ = ("message",)
    message: str

    def __init__(self, message: str) -> None:
        self._init_fields(_check_str(message, "DisconnectReason.ProtocolViolation", "message"))

    def __str__(self) -> str:
        return f"protocol violation: {self.message}"


publish_variants(
    DisconnectReason,
    Graceful=_Graceful,
    LocalClose=_LocalClose,
    Transport=_Transport,
    ProtocolViolation=_ProtocolViolation,
)


class JsonRpcError(Exception):
    """A JSON-RPC 2.0 error, raised by an ``RpcApi`` to answer a request with an error.

    Args:
        code: the JSON-RPC error code (an ``int``; ``-32601`` is "method not found").
        message: a short human-readable description.
        data: optional structured details (anything JSON-serialisable).

    Raises:
        TypeError: ``code`` is not an int or ``message`` is not a str.
    """

    METHOD_NOT_FOUND: ClassVar[int] = -32601
    """The JSON-RPC code for "method not found"."""

    code: int
    message: str
    data: object

    def __init__(self, code: int, message: str, data: object = None) -> None:
        if isinstance(code, bool) or not isinstance(code, int):
            raise TypeError(f"JsonRpcError: `code` must be int, got {_type_name(code)}")
        _check_str(message, "JsonRpcError", "message")
        super().__init__(code, message, data)
        self.code = int(code)
        self.message = message
        self.data = data

    @classmethod
    def method_not_found(cls, method: str) -> JsonRpcError:
        """The "method not found" error (code -32601) for ``method``."""
        return cls(cls.METHOD_NOT_FOUND, f"method not found: {method!r}")

    def to_dict(self) -> dict[str, Any]:
        """The JSON-RPC error object: ``{"code", "message"}`` plus ``"data"`` if set."""
        obj: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data is not None:
            obj["data"] = self.data
        return obj

    def __str__(self) -> str:
        return f"JSON-RPC error {self.code}: {self.message}"

    def __repr__(self) -> str:
        extra = f", data={self.data!r}" if self.data is not None else ""
        return f"JsonRpcError({self.code}, {self.message!r}{extra})"
