"""What the (untrusted) guest agent may send, checked against `hanabi_wire.messages`.

Every frame read from the guest goes through `parse_guest_message` before anything acts on
it: the one validator of `hanabi_wire` (strict types: no "3" for 3, no true for 1; ids
match the id pattern; `data` at most MAX_DATA_CHUNK bytes; signals 1..64, exit codes
0..255; text fields bounded), then wrapped in a read-only object of its type
(`GuestReply`, `GuestOutput`, ...). Request results are checked per request type
(`PingResult`, `PidResult`, `PsResult`). A message that fails is reported as
`GuestMisbehaved`; the session logs it and drops the frame.

`ID_REGEX` and `Data` are pydantic types for agentd's own models (the io socket).
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

from pydantic import BeforeValidator

import hanabi_wire as W
from hanabi_wire import ID_REGEX, MAX_DATA_CHUNK, ProtocolError, WireError, b64d

__all__ = ["ID_REGEX", "Data", "GuestMisbehaved", "parse_guest_message", "parse_result", "reply_id"]


class GuestMisbehaved(Exception):
    """A frame from the guest is not a valid message (logged and dropped)."""


def _decode_data(value: object) -> bytes:
    """Strict base64 of at most MAX_DATA_CHUNK bytes (agentd's io socket)."""
    if not isinstance(value, str):
        raise ValueError("data must be a base64 string")
    if len(value) > 4 * ((MAX_DATA_CHUNK + 2) // 3):
        raise ValueError(f"data longer than {MAX_DATA_CHUNK} bytes in base64")
    try:
        return b64d(value)
    except ProtocolError as exc:
        raise ValueError(str(exc)) from None


Data = Annotated[bytes, BeforeValidator(_decode_data)]


class Checked:
    """Read-only attribute view of checked fields (nested objects are views too)."""

    __slots__ = ("_fields",)
    _fields: dict[str, Any]

    def __init__(self, fields: dict[str, Any]) -> None:
        object.__setattr__(self, "_fields", {k: _view(v) for k, v in fields.items()})

    def __getattr__(self, name: str) -> Any:
        if name == "_fields":  # not set yet: no recursion
            raise AttributeError(name)
        try:
            return self._fields[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is read-only")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Checked) and type(other) is type(self) and other._fields == self._fields

    __hash__ = None  # type: ignore[assignment]  # mutable-looking views are not hashable

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._fields!r})"


def _view(value: Any) -> Any:
    if isinstance(value, dict):
        return Checked(value)
    if isinstance(value, list):
        return [_view(v) for v in value]
    return value


class GuestMessage(Checked):
    """A checked message from the guest; `GuestX(**fields)` checks `fields` as type TYPE."""

    TYPE: ClassVar[str] = ""
    __slots__ = ()

    def __init__(self, **fields: Any) -> None:
        try:
            checked = W.check_message({**fields, "type": self.TYPE}, W.GUEST)
        except WireError as exc:
            raise GuestMisbehaved(f"invalid {self.TYPE} message: {exc}") from None
        super().__init__(checked)
        if self.TYPE == W.T_REPLY:  # the result stays a plain dict (checked per request)
            self._fields["result"] = checked["result"]


class GuestReply(GuestMessage):
    """The answer to the host's request `id`."""

    TYPE = W.T_REPLY
    __slots__ = ()


class GuestReady(GuestMessage):
    """Sent once when the agent starts (informational only)."""

    TYPE = W.T_READY
    __slots__ = ()


class GuestOutput(GuestMessage):
    """A chunk of a process's stdout or stderr."""

    TYPE = W.T_OUTPUT
    __slots__ = ()


class GuestExit(GuestMessage):
    """A process ended: its exit code, or the signal that killed it."""

    TYPE = W.T_EXIT
    __slots__ = ()


class GuestOom(GuestMessage):
    """The guest's OOM killer ended a process of a container (its cgroup's count so far)."""

    TYPE = W.T_OOM
    __slots__ = ()


class GuestDnsQuery(GuestMessage):
    """A DNS query the guest relays to a loopback resolver of the container's namespace."""

    TYPE = W.T_DNS_QUERY
    __slots__ = ()


class GuestProtocolError(GuestMessage):
    """The agent complains that the host broke the protocol (logged)."""

    TYPE = W.T_PROTOCOL_ERROR
    __slots__ = ()


_CLASSES: dict[str, type[GuestMessage]] = {cls.TYPE: cls for cls in (
    GuestReply, GuestReady, GuestOutput, GuestExit, GuestOom, GuestDnsQuery, GuestProtocolError)}
assert set(_CLASSES) == W.GUEST_MESSAGES, "a guest message without its class"
KNOWN_TYPES = tuple(_CLASSES)


def parse_guest_message(msg: object) -> GuestMessage:
    """Validate one decoded frame; raise GuestMisbehaved with a short, safe reason."""
    if not isinstance(msg, dict):
        raise GuestMisbehaved("message is not a JSON object")
    kind = msg.get("type")
    cls = _CLASSES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        shown = kind[:32] if isinstance(kind, str) else type(kind).__name__
        raise GuestMisbehaved(f"unknown message type {shown!r}")
    return cls(**{k: v for k, v in msg.items() if k != "type"})


def reply_id(msg: object) -> int | None:
    """The request id of something that looks like a reply, even an invalid one."""
    if isinstance(msg, dict) and msg.get("type") == W.T_REPLY:
        value = msg.get("id")
        if type(value) is int:
            return value
    return None


class Result(Checked):
    """A request's checked result; REQUEST names the request type."""

    REQUEST: ClassVar[str] = ""
    __slots__ = ()


class PingResult(Result):
    """Result of `ping` (its `protocol` must be this host's, see `check_version`)."""

    REQUEST = W.T_PING
    __slots__ = ()


class PidResult(Result):
    """Result of `start` and `exec`."""

    REQUEST = W.T_START
    __slots__ = ()


class PsResult(Result):
    """Result of `ps`."""

    REQUEST = W.T_PS
    __slots__ = ()


def parse_result(model: type[Result], result: dict[str, Any] | None, what: str) -> Any:
    """Validate the result of one request type; GuestMisbehaved if it does not fit."""
    try:
        return model(W.check_result(model.REQUEST, result))
    except WireError as exc:
        raise GuestMisbehaved(f"invalid result of {what}: {exc}") from None


def check_version(ping: PingResult) -> PingResult:
    """The ping result if the agent speaks this host's protocol; GuestMisbehaved naming
    both versions if not."""
    mismatch = W.version_mismatch(W.PROTOCOL_VERSION, ping.protocol)
    if mismatch is not None:
        raise GuestMisbehaved(mismatch)
    return ping
