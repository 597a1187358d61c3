"""What the (untrusted) guest agent may send, as strict pydantic models.

Every frame read from the guest goes through `parse_guest_message` before anything acts on
it. Types are strict (no "3" for 3, no true for 1), ids match the container id pattern,
`data` is strict base64 of at most MAX_DATA_CHUNK bytes, signals are 1..64 and exit codes
0..255. Request results are checked again per request type (`PingResult`, `PidResult`,
`PsResult`). A message that fails is reported as `GuestMisbehaved`; the session logs it
and drops the frame.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, TypeAdapter,
                      ValidationError)

from hanabi_guest.protocol import MAX_DATA_CHUNK, ProtocolError, b64d

ID_REGEX = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
MAX_B64_CHARS = 4 * ((MAX_DATA_CHUNK + 2) // 3)
MAX_TEXT = 4096
MAX_PID = (1 << 22)
GuestId = Annotated[str, Field(pattern=ID_REGEX)]
GuestErrorCode = Literal["NOT_FOUND", "INVALID_ARGUMENT", "FAILED_PRECONDITION",
                         "ALREADY_EXISTS", "INTERNAL"]


class GuestMisbehaved(Exception):
    """A frame from the guest is not a valid message (logged and dropped)."""


def _decode_data(value: object) -> bytes:
    if not isinstance(value, str):
        raise ValueError("data must be a base64 string")
    if len(value) > MAX_B64_CHARS:
        raise ValueError(f"data longer than {MAX_B64_CHARS} base64 characters")
    try:
        raw = b64d(value)
    except ProtocolError as exc:
        raise ValueError(str(exc)) from None
    if len(raw) > MAX_DATA_CHUNK:
        raise ValueError(f"data of {len(raw)} bytes exceeds {MAX_DATA_CHUNK}")
    return raw


Data = Annotated[bytes, BeforeValidator(_decode_data)]


class _Msg(BaseModel):
    """Strict; fields a newer agent adds are ignored, never used."""

    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


class GuestError(_Msg):
    """The error of a failed reply."""

    code: GuestErrorCode
    message: str = Field(max_length=MAX_TEXT)


class GuestReply(_Msg):
    """The answer to the host's request `id`."""

    type: Literal["reply"]
    id: int = Field(ge=1, le=(1 << 53))
    ok: bool
    result: dict[str, Any] | None = None
    error: GuestError | None = None


class GuestReady(_Msg):
    """Sent once when the agent starts (informational only)."""

    type: Literal["ready"]
    agent_version: str = Field(max_length=64)
    kernel: str = Field(max_length=256)


class GuestOutput(_Msg):
    """A chunk of a process's stdout or stderr."""

    type: Literal["output"]
    container_id: GuestId
    exec_id: GuestId
    stream: Literal["stdout", "stderr"]
    data: Data
    seq: int | None = Field(None, ge=1, le=2**63)  # the agent's event counter (replays repeat it)


class GuestExit(_Msg):
    """A process ended: its exit code, or the signal that killed it."""

    type: Literal["exit"]
    container_id: GuestId
    exec_id: GuestId
    exit_code: int | None = Field(None, ge=0, le=255)
    signal: int | None = Field(None, ge=1, le=64)
    seq: int | None = Field(None, ge=1, le=2**63)


MAX_DNS_BYTES = 4096


def _decode_dns(value: object) -> bytes:
    raw = _decode_data(value)
    if not 12 <= len(raw) <= MAX_DNS_BYTES:  # a DNS header alone is 12 bytes
        raise ValueError(f"a DNS query must be 12..{MAX_DNS_BYTES} bytes")
    return raw


class GuestDnsQuery(_Msg):
    """A DNS query the guest relays to a loopback resolver of the container's namespace."""

    type: Literal["dns_query"]
    qid: int = Field(ge=0, le=(1 << 31))
    server: str = Field(pattern=r"^127\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}$")
    data: Annotated[bytes, BeforeValidator(_decode_dns)]
    tcp: bool = False


class GuestProtocolError(_Msg):
    """The agent complains that the host broke the protocol (logged)."""

    type: Literal["protocol_error"]
    message: str = Field("", max_length=MAX_TEXT)


GuestMessage = Annotated[Union[GuestReply, GuestReady, GuestOutput, GuestExit, GuestProtocolError, GuestDnsQuery],
                         Field(discriminator="type")]
_ADAPTER: TypeAdapter[Any] = TypeAdapter(GuestMessage)
KNOWN_TYPES = ("reply", "ready", "output", "exit", "protocol_error", "dns_query")


def _summary(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False, include_input=False)[:3]:
        where = ".".join(str(p) for p in err["loc"]) or "message"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


def parse_guest_message(msg: object) -> (GuestReply | GuestReady | GuestOutput | GuestExit | GuestProtocolError
                                         | GuestDnsQuery):
    """Validate one decoded frame; raise GuestMisbehaved with a short, safe reason."""
    if not isinstance(msg, dict):
        raise GuestMisbehaved("message is not a JSON object")
    kind = msg.get("type")
    if kind not in KNOWN_TYPES:
        shown = kind[:32] if isinstance(kind, str) else type(kind).__name__
        raise GuestMisbehaved(f"unknown message type {shown!r}")
    try:
        message = _ADAPTER.validate_python(msg)
    except ValidationError as exc:
        raise GuestMisbehaved(f"invalid {kind} message: {_summary(exc)}") from None
    if isinstance(message, GuestReply):
        if message.ok and message.error is not None:
            raise GuestMisbehaved("successful reply carries an error")
        if not message.ok and message.error is None:
            raise GuestMisbehaved("failed reply without an error")
    return message


def reply_id(msg: object) -> int | None:
    """The request id of something that looks like a reply, even an invalid one."""
    if isinstance(msg, dict) and msg.get("type") == "reply":
        value = msg.get("id")
        if type(value) is int:
            return value
    return None


class _Result(_Msg):
    pass


class PingResult(_Result):
    """Result of `ping`."""

    agent_version: str = Field(max_length=64)
    kernel: str = Field(max_length=256)
    uptime_s: float = Field(0.0, ge=0)


class PidResult(_Result):
    """Result of `start` and `exec`."""

    pid: int = Field(ge=1, le=MAX_PID)


class PsEntry(_Result):
    """One process in the result of `ps`."""

    pid: int = Field(ge=1, le=MAX_PID)
    exec_id: Annotated[str, Field(pattern=r"^$|" + ID_REGEX)]  # "" for processes it did not start
    args: list[Annotated[str, Field(max_length=MAX_TEXT)]] = Field(default_factory=list, max_length=1024)


class PsResult(_Result):
    """Result of `ps`."""

    processes: list[PsEntry] = Field(max_length=65536)


def parse_result(model: type[_Result], result: dict[str, Any] | None, what: str) -> Any:
    """Validate the result of one request type; GuestMisbehaved if it does not fit."""
    try:
        return model.model_validate(result or {})
    except ValidationError as exc:
        raise GuestMisbehaved(f"invalid result of {what}: {_summary(exc)}") from None
