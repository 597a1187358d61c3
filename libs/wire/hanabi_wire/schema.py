"""Fields as data, and the one validator both ends run on every message they receive.

A message's fields are a tuple of ``F``: a name, a kind (``STR``, ``INT``, ``FLOAT``,
``BOOL``, ``BYTES`` raw bytes of a data frame, ``B64`` base64 text decoded to bytes,
``OBJECT`` with sub-fields or free-form, ``LIST`` of ``items``) and its constraints. A
field without a default is required; ``null=True`` also takes JSON null (read as the
default). ``check(fields, value)`` returns a new dict holding only the known fields, with
defaults filled in, or raises ``WireError`` naming the field. Unknown fields are dropped,
never used (a newer peer may add some). Types are strict: no "3" for 3, no true for 1.

STDLIB ONLY: runs inside the guest.
"""

from __future__ import annotations

import re

from .constants import E_INVALID_ARGUMENT
from .framing import ProtocolError, b64d

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, TypeGuard

STR, INT, FLOAT, BOOL, BYTES, B64, OBJECT, LIST = (
    "str", "int", "float", "bool", "bytes", "base64", "object", "list")
REQUIRED = object()  # the default of a required field


class WireError(ValueError):
    """A message does not fit its definition (an INVALID_ARGUMENT error)."""

    code = E_INVALID_ARGUMENT


class F:
    """One field: name, kind and constraints (see the module docstring).

    ``lo``/``hi``: bounds of a number; ``min_len``/``max_len``: of a string's characters,
    a list's items or bytes; ``pattern``: a regex the whole string must match; ``choices``:
    the values allowed; ``fields``: an OBJECT's sub-fields (None: any object); ``items``:
    the ``F`` of a LIST's elements; ``doc``: what it means (docs/agent-protocol.md)."""

    __slots__ = ("name", "kind", "default", "null", "lo", "hi", "min_len", "max_len", "pattern",
                 "choices", "fields", "items", "doc")

    def __init__(self, name: str, kind: str, doc: str = "", *, default: Any = REQUIRED,
                 null: bool = False, lo: float | None = None, hi: float | None = None,
                 min_len: int = 0, max_len: int | None = None, pattern: str | None = None,
                 choices: tuple[Any, ...] | None = None, fields: tuple[F, ...] | None = None,
                 items: F | None = None) -> None:
        self.name, self.kind, self.doc = name, kind, doc
        self.default, self.null = default, null or default is None
        self.lo, self.hi, self.min_len, self.max_len = lo, hi, min_len, max_len
        self.pattern = re.compile(pattern) if pattern is not None else None
        self.choices, self.fields, self.items = choices, fields, items

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def __repr__(self) -> str:
        return f"F({self.name!r}, {self.kind!r})"


def _fail(where: str, reason: str) -> WireError:
    return WireError(f"field {where!r} {reason}")


def is_int(v: object) -> TypeGuard[int]:
    """Whether ``v`` is a JSON integer (an int, never a bool)."""
    return isinstance(v, int) and not isinstance(v, bool)


def _sized(f: F, where: str, size: int, unit: str) -> None:
    if size < f.min_len or (f.max_len is not None and size > f.max_len):
        if f.max_len is None:
            bound = f"at least {f.min_len}"
        else:
            bound = f"at most {f.max_len}" if f.min_len == 0 else f"{f.min_len}..{f.max_len}"
        raise _fail(where, f"must have {bound} {unit}, not {size}")


def check_value(f: F, v: Any, where: str) -> Any:
    """``v`` checked against ``f`` (and normalised: floats, decoded base64, sub-objects)."""
    if v is None:
        if f.null:
            return None if f.required else f.default
        raise _fail(where, "must not be null")
    kind = f.kind
    if kind == STR:
        if not isinstance(v, str):
            raise _fail(where, f"must be a string, not {type(v).__name__}")
        _sized(f, where, len(v), "characters")
        if f.pattern is not None and not f.pattern.fullmatch(v):
            raise _fail(where, f"{v[:64]!r} does not match {f.pattern.pattern}")
    elif kind == INT or kind == FLOAT:
        if not (is_int(v) or (kind == FLOAT and isinstance(v, float))):
            raise _fail(where, f"must be {'an integer' if kind == INT else 'a number'}, not {type(v).__name__}")
        if (f.lo is not None and v < f.lo) or (f.hi is not None and v > f.hi):
            raise _fail(where, f"must be in {f.lo}..{f.hi}, not {v}")
        if kind == FLOAT:
            v = float(v)
    elif kind == BOOL:
        if not isinstance(v, bool):
            raise _fail(where, f"must be a boolean, not {type(v).__name__}")
    elif kind == BYTES:
        if not isinstance(v, (bytes, bytearray)):
            raise _fail(where, "must be bytes (a data frame)")
        _sized(f, where, len(v), "bytes")
        v = bytes(v)
    elif kind == B64:
        if not isinstance(v, str):
            raise _fail(where, "must be a base64 string")
        if f.max_len is not None and len(v) > 4 * ((f.max_len + 2) // 3):
            raise _fail(where, f"is longer than {f.max_len} bytes in base64")
        try:
            v = b64d(v)
        except ProtocolError as exc:
            raise _fail(where, str(exc)) from None
        _sized(f, where, len(v), "bytes")
    elif kind == OBJECT:
        if not isinstance(v, dict):
            raise _fail(where, f"must be an object, not {type(v).__name__}")
        if f.fields is not None:
            v = check(f.fields, v, where + ".")
    elif kind == LIST:
        if not isinstance(v, list):
            raise _fail(where, f"must be a list, not {type(v).__name__}")
        _sized(f, where, len(v), "items")
        if f.items is not None:
            v = [check_value(f.items, item, f"{where}[{i}]") for i, item in enumerate(v)]
    else:  # pragma: no cover - a definition error
        raise AssertionError(f"unknown field kind {kind!r}")
    if f.choices is not None and v not in f.choices:
        raise _fail(where, f"must be one of {', '.join(map(repr, f.choices))}")
    return v


def check(fields: tuple[F, ...], msg: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The known fields of ``msg``, checked, with defaults filled in (WireError if bad)."""
    out: dict[str, Any] = {}
    for f in fields:
        if f.name in msg:
            out[f.name] = check_value(f, msg[f.name], prefix + f.name)
        elif f.required:
            raise _fail(prefix + f.name, "is missing")
        else:
            default = f.default
            if isinstance(default, (list, tuple)):
                default = list(default)
            elif isinstance(default, dict):
                default = dict(default)
            out[f.name] = default
    return out
