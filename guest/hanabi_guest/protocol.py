"""Framing and message vocabulary of the hanabi host <-> guest agent protocol.

See docs/agent-protocol.md (binding). A frame is a 4-byte big-endian length N followed by
N bytes of UTF-8 JSON encoding one JSON object, with 1 <= N <= MAX_FRAME. Binary payloads
travel base64-encoded in a ``data`` field, at most MAX_DATA_CHUNK raw bytes per frame.

STDLIB ONLY: this module runs inside the guest under a bare, trimmed python3.11.
"""

from __future__ import annotations

import binascii
import json
import struct
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

MAX_FRAME = 1 << 20
MAX_DATA_CHUNK = 64 * 1024
HEADER = struct.Struct(">I")

# Host -> guest requests.
T_PING = "ping"
T_CREATE_CONTAINER = "create_container"
T_START = "start"
T_EXEC = "exec"
T_SIGNAL = "signal"
T_CLOSE_STDIN = "close_stdin"
T_PS = "ps"
T_DESTROY_CONTAINER = "destroy_container"
T_SHUTDOWN = "shutdown"
REQUEST_TYPES = frozenset(
    {
        T_PING,
        T_CREATE_CONTAINER,
        T_START,
        T_EXEC,
        T_SIGNAL,
        T_CLOSE_STDIN,
        T_PS,
        T_DESTROY_CONTAINER,
        T_SHUTDOWN,
    }
)

# Host -> guest events.
T_STDIN = "stdin"

# Guest -> host messages.
T_REPLY = "reply"
T_READY = "ready"
T_OUTPUT = "output"
T_EXIT = "exit"
T_PROTOCOL_ERROR = "protocol_error"

# Error codes carried in failed replies.
E_NOT_FOUND = "NOT_FOUND"
E_INVALID_ARGUMENT = "INVALID_ARGUMENT"
E_FAILED_PRECONDITION = "FAILED_PRECONDITION"
E_ALREADY_EXISTS = "ALREADY_EXISTS"
E_INTERNAL = "INTERNAL"
ERROR_CODES = frozenset(
    {E_NOT_FOUND, E_INVALID_ARGUMENT, E_FAILED_PRECONDITION, E_ALREADY_EXISTS, E_INTERNAL}
)

INIT_EXEC_ID = "init"
STREAM_STDOUT = "stdout"
STREAM_STDERR = "stderr"


class ProtocolError(Exception):
    """The byte stream or a value in it violates the protocol; the stream is corrupt."""


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def encode_frame(msg: dict[str, Any]) -> bytes:
    """Serialize one message as a length-prefixed frame."""
    if not isinstance(msg, dict):
        raise ProtocolError("a message must be a JSON object")
    try:
        body = json.dumps(msg, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode(
            "utf-8"
        )
    except (TypeError, ValueError, UnicodeEncodeError) as exc:
        raise ProtocolError(f"message is not encodable as JSON: {exc}") from exc
    if len(body) > MAX_FRAME:
        raise ProtocolError(f"frame of {len(body)} bytes exceeds MAX_FRAME ({MAX_FRAME})")
    return HEADER.pack(len(body)) + body


def decode_body(body: bytes) -> dict[str, Any]:
    """Decode one frame body (without its length prefix) into a message."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"frame is not UTF-8: {exc}") from exc
    try:
        value = _DECODER.decode(text)
    except ValueError as exc:
        raise ProtocolError(f"frame is not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise ProtocolError(f"frame is a JSON {type(value).__name__}, not an object")
    return value


class FrameDecoder:
    """Incremental frame decoder: feed it bytes as they arrive, get whole messages back.

    After it raised ProtocolError once, the decoder stays broken (every later feed raises)
    until ``reset()``: a length-prefixed stream cannot be resynchronised.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._error: str | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as a message."""
        return len(self._buf)

    def reset(self) -> None:
        """Forget buffered bytes and any error (a new peer starts at a frame boundary)."""
        self._buf.clear()
        self._error = None

    def _fail(self, reason: str) -> ProtocolError:
        self._error = reason
        self._buf.clear()
        return ProtocolError(reason)

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        """Add bytes; return every message completed by them (possibly none)."""
        if self._error is not None:
            raise ProtocolError(f"stream already corrupt: {self._error}")
        self._buf += data
        out: list[dict[str, Any]] = []
        buf = self._buf
        pos = 0
        while len(buf) - pos >= HEADER.size:
            (length,) = HEADER.unpack_from(buf, pos)
            if length == 0:
                raise self._fail("frame length 0")
            if length > MAX_FRAME:
                raise self._fail(f"frame length {length} exceeds MAX_FRAME ({MAX_FRAME})")
            end = pos + HEADER.size + length
            if len(buf) < end:
                break
            body = bytes(buf[pos + HEADER.size : end])
            pos = end
            try:
                out.append(decode_body(body))
            except ProtocolError as exc:
                raise self._fail(str(exc)) from None
        if pos:
            del buf[:pos]
        return out


def b64e(data: bytes) -> str:
    """Base64-encode bytes for a ``data`` field."""
    return binascii.b2a_base64(data, newline=False).decode("ascii")


def b64d(text: str) -> bytes:
    """Strictly decode a base64 ``data`` field (standard alphabet, padded)."""
    if not isinstance(text, str):
        raise ProtocolError(f"base64 data must be a string, not {type(text).__name__}")
    try:
        raw = text.encode("ascii")
        data = binascii.a2b_base64(raw, strict_mode=True)
    except (binascii.Error, UnicodeEncodeError, ValueError) as exc:
        raise ProtocolError(f"invalid base64 data: {exc}") from exc
    if len(raw) != (len(data) + 2) // 3 * 4:
        raise ProtocolError("invalid base64 data: excess padding")
    return data


def reply_ok(req_id: int, result: dict[str, Any] | None = None) -> dict[str, Any]:
    """Build a successful reply to request ``req_id``."""
    return {"type": T_REPLY, "id": req_id, "ok": True, "result": result or {}}


def reply_error(req_id: int, code: str, message: str) -> dict[str, Any]:
    """Build a failed reply to request ``req_id``."""
    if code not in ERROR_CODES:
        code = E_INTERNAL
    return {"type": T_REPLY, "id": req_id, "ok": False, "error": {"code": code, "message": message}}
