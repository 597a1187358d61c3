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
# Resynchronisation marker. A valid stream never holds three 0xFF bytes in a row (a header
# is at most 00 10 00 00 .. 00 00 FF FF and bodies are UTF-8), so a run of 0xFF marks a
# point where the reader may start over. A host writes SYNC right after it connects; the
# agent answers with SYNC before its next frame (see docs/agent-protocol.md).
SYNC = b"\xff" * 8
_RUN = b"\xff\xff\xff"

# Host -> guest requests.
T_PING = "ping"
T_CREATE_CONTAINER = "create_container"
T_START = "start"
T_EXEC = "exec"
T_SIGNAL = "signal"
T_CLOSE_STDIN = "close_stdin"
T_RESIZE = "resize"
T_PS = "ps"
T_DESTROY_CONTAINER = "destroy_container"
T_SHUTDOWN = "shutdown"
T_CONFIGURE_NETWORK = "configure_network"
REQUEST_TYPES = frozenset(
    {
        T_PING,
        T_CREATE_CONTAINER,
        T_START,
        T_EXEC,
        T_SIGNAL,
        T_CLOSE_STDIN,
        T_RESIZE,
        T_PS,
        T_DESTROY_CONTAINER,
        T_SHUTDOWN,
        T_CONFIGURE_NETWORK,
    }
)

# Host -> guest events.
T_STDIN = "stdin"
T_DNS_ANSWER = "dns_answer"

# Guest -> host messages.
T_REPLY = "reply"
T_READY = "ready"
T_OUTPUT = "output"
T_EXIT = "exit"
T_PROTOCOL_ERROR = "protocol_error"
T_DNS_QUERY = "dns_query"
T_SYNC = "sync"  # yielded by FrameDecoder where a SYNC marker was; never sent as a frame

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
# The mount tag of the VM's 9P file share (QEMU's virtio-9p device); the agent mounts it
# at SHARE_MOUNT_POINT and finds each container's tree under it (docs/agent-protocol.md).
SHARE_MOUNT_TAG = "hanabi"
STREAM_STDOUT = "stdout"
STREAM_STDERR = "stderr"


class ProtocolError(Exception):
    """The byte stream or a value in it violates the protocol; the stream is corrupt."""

    messages: list[dict[str, Any]] = []  # decoded before the error in the same feed


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

    SYNC markers (runs of 0xFF, see ``SYNC``) resynchronise the stream: everything not yet
    decoded before a marker is discarded, and ``feed`` yields ``{"type": "sync"}`` at the
    marker's place among the messages. With ``wait_sync=True`` (a host that just connected)
    every byte before the first marker is discarded.

    A corrupt frame raises ProtocolError (``exc.messages`` holds the messages decoded before
    it in the same feed). The decoder then discards input until a SYNC marker or ``reset()``;
    ``corrupt`` tells whether it is in that state.
    """

    def __init__(self, wait_sync: bool = False, sync: bool = True) -> None:
        """`sync=False` is for streams without SYNC markers (agentd's io socket): there a
        0xFF byte is just part of a length, and any corrupt frame raises ProtocolError."""
        self._sync = sync
        self._buf = bytearray()
        self._waiting = wait_sync
        self._skip_ff = False
        self._error: str | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as a message."""
        return len(self._buf)

    @property
    def corrupt(self) -> bool:
        """True after a ProtocolError, until a SYNC marker or reset()."""
        return self._error is not None

    def reset(self) -> None:
        """Forget buffered bytes and any error (a new peer starts at a frame boundary)."""
        self._buf.clear()
        self._error = None
        self._waiting = False
        self._skip_ff = False

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        """Add bytes; return every message (and sync point) completed by them."""
        if not self._sync:
            return self._feed_plain(data)
        buf = self._buf
        buf += data
        out: list[dict[str, Any]] = []
        pos = 0
        try:
            while True:
                if self._waiting:
                    i = buf.find(_RUN, pos)
                    if i < 0:
                        pos = max(pos, len(buf) - len(_RUN) + 1)
                        break
                    j = i
                    while j < len(buf) and buf[j] == 0xFF:
                        j += 1
                    if j == len(buf) and j - i < len(SYNC):  # the marker may go on in the next feed
                        pos = i
                        break
                    pos = j
                    self._waiting = False
                    self._skip_ff = j == len(buf)  # a longer run's tail must not start a new marker
                    self._error = None
                    out.append({"type": T_SYNC})
                    continue
                if self._skip_ff:
                    while pos < len(buf) and buf[pos] == 0xFF:
                        pos += 1
                    if pos == len(buf):
                        break
                    self._skip_ff = False
                if pos < len(buf) and buf[pos] == 0xFF:  # no header starts with 0xFF: a marker
                    self._waiting = True
                    continue
                if len(buf) - pos < HEADER.size:
                    break
                (length,) = HEADER.unpack_from(buf, pos)
                if length == 0 or length > MAX_FRAME:
                    pos = self._corrupt(pos, f"frame length {length} outside 1..MAX_FRAME ({MAX_FRAME})", out)
                    continue
                end = pos + HEADER.size + length
                k = buf.find(_RUN, pos + HEADER.size, min(end, len(buf)))
                if k >= 0:  # a marker inside a frame: the frame was cut short by a reconnect
                    pos = k
                    self._waiting = True
                    continue
                if len(buf) < end:
                    break
                try:
                    msg = decode_body(bytes(buf[pos + HEADER.size:end]))
                except ProtocolError as exc:
                    pos = self._corrupt(pos, str(exc), out)
                    continue
                out.append(msg)
                pos = end
        finally:
            del buf[:pos]
        return out

    def _feed_plain(self, data: bytes) -> list[dict[str, Any]]:
        """Decode without SYNC handling; every corrupt frame raises."""
        if self._error is not None:
            raise ProtocolError(f"stream already corrupt: {self._error}")
        buf = self._buf
        buf += data
        out: list[dict[str, Any]] = []
        while len(buf) >= HEADER.size:
            (length,) = HEADER.unpack_from(buf, 0)
            try:
                if length == 0 or length > MAX_FRAME:
                    raise ProtocolError(f"frame length {length} outside 1..MAX_FRAME ({MAX_FRAME})")
                if len(buf) < HEADER.size + length:
                    break
                msg = decode_body(bytes(buf[HEADER.size:HEADER.size + length]))
            except ProtocolError as exc:
                self._error = str(exc)
                del buf[:]
                exc.messages = out
                raise
            out.append(msg)
            del buf[:HEADER.size + length]
        return out

    def _corrupt(self, pos: int, reason: str, out: list[dict[str, Any]]) -> int:
        """Skip to a later marker if one is buffered; otherwise raise (and discard until one)."""
        self._waiting = True
        k = self._buf.find(_RUN, pos + 1)
        if k >= 0:
            return k
        self._error = reason
        del self._buf[:]
        exc = ProtocolError(reason)
        exc.messages = out
        raise exc


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
