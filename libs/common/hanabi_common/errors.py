"""Typed errors shared by every hanabi daemon and client.

Each error carries one code of a fixed set. The RPC layer sends the code over the wire and
the client turns it back into the same exception class, so callers catch `NotFound`, not
strings.
"""

from __future__ import annotations

from enum import Enum


class ErrorCode(str, Enum):
    """The fixed set of error codes an RPC reply may carry."""

    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    UNAVAILABLE = "UNAVAILABLE"
    INTERNAL = "INTERNAL"


class HanabiError(Exception):
    """Base of every hanabi error; `code` says which kind it is."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str, *, details: dict | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or {}


class NotFound(HanabiError):
    """The named sandbox, container, process or method does not exist."""

    code = ErrorCode.NOT_FOUND


class AlreadyExists(HanabiError):
    """Something with that id exists already."""

    code = ErrorCode.ALREADY_EXISTS


class InvalidArgument(HanabiError):
    """The request itself is wrong: bad id, malformed config, garbage frame."""

    code = ErrorCode.INVALID_ARGUMENT


class FailedPrecondition(HanabiError):
    """The request is well-formed but the system is not in a state that allows it."""

    code = ErrorCode.FAILED_PRECONDITION


class DeadlineExceeded(HanabiError):
    """The request did not complete before its deadline."""

    code = ErrorCode.DEADLINE_EXCEEDED


class Unavailable(HanabiError):
    """A daemon, a VM or a guest agent cannot be reached."""

    code = ErrorCode.UNAVAILABLE


class Internal(HanabiError):
    """A bug or an unexpected failure on the serving side."""

    code = ErrorCode.INTERNAL


_BY_CODE: dict[ErrorCode, type[HanabiError]] = {
    cls.code: cls
    for cls in (NotFound, AlreadyExists, InvalidArgument, FailedPrecondition,
                DeadlineExceeded, Unavailable, Internal)
}


def error_for_code(code: str, message: str, details: dict | None = None) -> HanabiError:
    """Build the exception class that matches a wire error code (unknown codes: Internal)."""
    try:
        cls = _BY_CODE[ErrorCode(code)]
    except ValueError:
        return Internal(f"{message} (unknown error code {code!r})", details=details)
    return cls(message, details=details)
