"""Framing of the host <-> guest byte stream: JSON frames, data frames, the SYNC marker.

A frame is a 4-byte big-endian header, then its body. The header's top byte is the frame
kind, the low 24 bits the body length N, 1 <= N <= MAX_FRAME:

* kind 0, a JSON frame: N bytes of UTF-8 JSON encoding one JSON object (a message);
* kind 1, a data frame (stdio, no base64): ``tag`` (1 byte: 1 stdin, 2 output on stdout,
  3 output on stderr), the container id, the exec id and the position (each a length byte
  then ASCII; the position in decimal, empty for none: an output's ``seq``, a stdin's
  ``offset``), then the data, escaped so the body never holds
  0xFF: 0xFE -> FE 00, 0xFF -> FE 01. ``FrameDecoder`` yields it as the message
  ``{"type": "stdin"|"output", "container_id", "exec_id", ["stream",] ["seq"|"offset",] "data": bytes}``
  and ``encode_frame`` makes one of any such message whose ``data`` is bytes.

SYNC (8 bytes of 0xFF) resynchronises the stream. It works because a valid stream never
holds three 0xFF bytes in a row: a header's kind byte is 0 or 1 and its length at most
00 10 00 00 (at most two 0xFF, in its low bytes), a JSON body is UTF-8 (which never has
0xFF), a data frame's tag, id lengths and ids are small or ASCII and its data is escaped.
So a run of three 0xFF is always a marker, found even in the middle of a cut frame.

STDLIB ONLY: runs inside the guest.
"""

from __future__ import annotations

import binascii
import json
import struct

from .constants import (ID_MAX_LEN, MAX_FRAME, STREAM_STDERR, STREAM_STDOUT, T_OUTPUT,
                        T_STDIN, T_SYNC_MARKER)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

HEADER = struct.Struct(">I")
KIND_JSON = 0
KIND_DATA = 1
KIND_SHIFT = 24
LENGTH_MASK = (1 << KIND_SHIFT) - 1
SYNC = b"\xff" * 8
_RUN = b"\xff\xff\xff"
# Data frame tags: (message type, stream); stdin has no stream.
DATA_TAGS = {1: (T_STDIN, None), 2: (T_OUTPUT, STREAM_STDOUT), 3: (T_OUTPUT, STREAM_STDERR)}
_TAG_OF: dict[tuple[str | None, str | None], int] = {v: k for k, v in DATA_TAGS.items()}


class ProtocolError(Exception):
    """The byte stream or a value in it violates the protocol; the stream is corrupt."""

    messages: list[dict[str, Any]] = []  # decoded before the error in the same feed


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def escape(data: bytes) -> bytes:
    """Data as it travels in a data frame: no 0xFF byte (0xFE -> FE 00, 0xFF -> FE 01)."""
    return data.replace(b"\xfe", b"\xfe\x00").replace(b"\xff", b"\xfe\x01")


def unescape(data: bytes) -> bytes:
    """The inverse of ``escape``; ProtocolError for a 0xFF byte or a bad escape."""
    if b"\xff" in data:
        raise ProtocolError("data frame holds a 0xFF byte")
    escapes = data.count(b"\xfe")
    if escapes and data.count(b"\xfe\x00") + data.count(b"\xfe\x01") != escapes:
        raise ProtocolError("data frame holds a bad escape")
    return data.replace(b"\xfe\x01", b"\xff").replace(b"\xfe\x00", b"\xfe") if escapes else data


def _frame(kind: int, body: bytes) -> bytes:
    if len(body) > MAX_FRAME:
        raise ProtocolError(f"frame of {len(body)} bytes exceeds MAX_FRAME ({MAX_FRAME})")
    return HEADER.pack(kind << KIND_SHIFT | len(body)) + body


def _ident(value: object, what: str) -> bytes:
    if not isinstance(value, str):
        raise ProtocolError(f"{what} of a data frame must be a string")
    raw = value.encode("ascii", "replace")
    if len(raw) > ID_MAX_LEN:
        raise ProtocolError(f"{what} of a data frame is longer than {ID_MAX_LEN}")
    return bytes((len(raw),)) + raw


# The third id of a data frame: where the data stands in its stream.
POSITION_OF = {T_OUTPUT: "seq", T_STDIN: "offset"}


def encode_data(msg: dict[str, Any]) -> bytes:
    """A data frame for a ``stdin`` or ``output`` message whose ``data`` is bytes."""
    tag = _TAG_OF.get((msg.get("type"), msg.get("stream")))
    if tag is None:
        raise ProtocolError(f"no data frame for {msg.get('type')!r} on stream {msg.get('stream')!r}")
    position = POSITION_OF[msg["type"]]  # output: its seq (>= 1); stdin: its offset (>= 0)
    extra = set(msg) - {"type", "stream", "container_id", "exec_id", "data", position}
    if extra:  # a data frame has no place for them: refuse rather than drop them
        raise ProtocolError(f"a {msg['type']} data frame cannot carry {', '.join(sorted(extra))}")
    value = msg.get(position)
    if value is not None and (type(value) is not int or value < (1 if position == "seq" else 0)):
        raise ProtocolError(f"{position} of a data frame must be a {'positive' if position == 'seq' else 'non-negative'} integer")
    body = (bytes((tag,)) + _ident(msg.get("container_id"), "container_id")
            + _ident(msg.get("exec_id"), "exec_id") + _ident("" if value is None else str(value), position)
            + escape(bytes(msg["data"])))
    return _frame(KIND_DATA, body)


def decode_data(body: bytes) -> dict[str, Any]:
    """The message of a data frame's body (ids are checked later, as any field is)."""
    kind = DATA_TAGS.get(body[0])
    if kind is None:
        raise ProtocolError(f"data frame with unknown tag {body[0]}")
    pos, ids = 1, []
    for _ in range(3):  # container id, exec id, seq or offset (decimal, "" for none)
        end = pos + 1 + (body[pos] if pos < len(body) else 0)
        if pos >= len(body) or end > len(body):
            raise ProtocolError("data frame cut inside its ids")
        try:
            ids.append(body[pos + 1:end].decode("ascii"))
        except UnicodeDecodeError:
            raise ProtocolError("data frame ids are not ASCII") from None
        pos = end
    msg: dict[str, Any] = {"type": kind[0], "container_id": ids[0], "exec_id": ids[1]}
    if ids[2]:
        position = POSITION_OF[kind[0]]
        if not (ids[2].isascii() and ids[2].isdigit()):
            raise ProtocolError(f"data frame {position} is not a decimal number")
        msg[position] = int(ids[2])
    if kind[1] is not None:
        msg["stream"] = kind[1]
    msg["data"] = unescape(body[pos:])
    return msg


def encode_frame(msg: dict[str, Any]) -> bytes:
    """Serialize one message: a data frame for stdio bytes, otherwise a JSON frame."""
    if not isinstance(msg, dict):
        raise ProtocolError("a message must be a JSON object")
    if msg.get("type") in (T_STDIN, T_OUTPUT) and isinstance(msg.get("data"), (bytes, bytearray, memoryview)):
        return encode_data(msg)
    try:
        body = json.dumps(msg, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode(
            "utf-8"
        )
    except (TypeError, ValueError, UnicodeEncodeError) as exc:
        raise ProtocolError(f"message is not encodable as JSON: {exc}") from exc
    return _frame(KIND_JSON, body)


def decode_body(body: bytes, kind: int = KIND_JSON) -> dict[str, Any]:
    """Decode one frame body (without its header) into a message."""
    if kind == KIND_DATA:
        return decode_data(body)
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
    if value.get("type") == T_SYNC_MARKER:
        raise ProtocolError(f"frame has the type {T_SYNC_MARKER!r}, which only stands for a SYNC marker")
    return value


def _header(buf: bytearray, pos: int) -> tuple[int, int]:
    """(kind, length) of the header at ``pos``; ProtocolError if either is out of range."""
    (word,) = HEADER.unpack_from(buf, pos)
    kind, length = word >> KIND_SHIFT, word & LENGTH_MASK
    if length == 0 or length > MAX_FRAME:
        raise ProtocolError(f"frame length {length} outside 1..MAX_FRAME ({MAX_FRAME})")
    if kind not in (KIND_JSON, KIND_DATA):
        raise ProtocolError(f"frame header {word:#010x}: unknown frame kind {kind}")
    return kind, length


class FrameDecoder:
    """Incremental frame decoder: feed it bytes as they arrive, get whole messages back.

    SYNC markers (runs of 0xFF, see ``SYNC``) resynchronise the stream: everything not yet
    decoded before a marker is discarded, and ``feed`` yields ``{"type": T_SYNC_MARKER}`` at
    the marker's place among the messages (a JSON frame of that type is corrupt). With ``wait_sync=True`` (a host that just connected)
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
                    out.append({"type": T_SYNC_MARKER})
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
                try:
                    kind, length = _header(buf, pos)
                except ProtocolError as exc:
                    pos = self._corrupt(pos, str(exc), out)
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
                    msg = decode_body(bytes(buf[pos + HEADER.size:end]), kind)
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
            try:
                kind, length = _header(buf, 0)
                if len(buf) < HEADER.size + length:
                    break
                msg = decode_body(bytes(buf[HEADER.size:HEADER.size + length]), kind)
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
    """Base64-encode bytes for a ``data`` field of a JSON frame (dns_query, dns_answer)."""
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
