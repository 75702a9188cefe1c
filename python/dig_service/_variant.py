"""Small immutable value types for the tagged unions of the Python layer.

``DisconnectReason`` and ``ExitReason`` mirror Rust enums. Each variant is a
subclass of its union class (``isinstance(r, DisconnectReason)`` holds), is
immutable, compares and hashes by value, supports ``match`` through
``__match_args__``, pickles, and has a ``repr`` that reads as the constructor
call (``DisconnectReason.Transport(message='reset')``).

This module only holds the shared machinery; it imports nothing heavy.
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = ["Variant", "publish_variants"]


class Variant:
    """Mixin for one variant: value equality, hashing, repr, immutability.

    A subclass lists its fields, in constructor order, in ``__match_args__``
    and stores them with :meth:`_init_fields` from its ``__init__``.
    """

    __slots__ = ()
    __match_args__: ClassVar[tuple[str, ...]] = ()

    def _init_fields(self, *values: object) -> None:
        for field, value in zip(self.__match_args__, values, strict=True):
            object.__setattr__(self, field, value)

    def _values(self) -> tuple[object, ...]:
        return tuple(getattr(self, field) for field in self.__match_args__)

    def __eq__(self, other: object) -> bool:
        if type(other) is type(self):
            assert isinstance(other, Variant)
            return self._values() == other._values()
        return NotImplemented

    def __hash__(self) -> int:
        return hash((type(self).__qualname__, self._values()))

    def __repr__(self) -> str:
        args = ", ".join(f"{f}={getattr(self, f)!r}" for f in self.__match_args__)
        return f"{type(self).__qualname__}({args})"

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__qualname__} is immutable; build a new value instead")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__qualname__} is immutable")

    def __reduce__(self) -> tuple[Any, tuple[object, ...]]:
        return (type(self), self._values())

    def __copy__(self) -> Variant:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> Variant:
        return self


def publish_variants(union: type, **variants: type) -> None:
    """Attach each variant class to ``union`` under its public name.

    The classes get the public ``__name__``/``__qualname__``
    (``DisconnectReason.Transport``) so that ``repr``, tracebacks and pickle
    all use the spelling of the public API.
    """
    for name, cls in variants.items():
        cls.__name__ = name
        cls.__qualname__ = f"{union.__qualname__}.{name}"
        cls.__module__ = union.__module__
        setattr(union, name, cls)
