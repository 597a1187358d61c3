"""Validation of container and sandbox ids, done before any path is built from them."""

from __future__ import annotations

from hanabi_wire.constants import ID_RE

from hanabi_common.errors import InvalidArgument

ID_PATTERN = ID_RE  # one rule for every id, host and guest (hanabi_wire.constants)
EXEC_ID_PATTERN = ID_PATTERN


def validate_id(value: object, what: str = "container id") -> str:
    """Return `value` if it is a valid id, else raise InvalidArgument saying why."""
    if not isinstance(value, str) or value == "":
        raise InvalidArgument(f"{what} must be a non-empty string")
    if not ID_PATTERN.fullmatch(value):
        raise InvalidArgument(
            f"invalid {what} {value!r}: must match {ID_PATTERN.pattern} "
            "(letters, digits, '_', '.', '-'; at most 128 characters; no '/')"
        )
    return value


def is_valid_id(value: object) -> bool:
    """True when `value` would pass validate_id."""
    return isinstance(value, str) and bool(ID_PATTERN.fullmatch(value))
