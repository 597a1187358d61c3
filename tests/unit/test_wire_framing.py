"""Unit tests of the agent protocol framing (hanabi_wire.framing): JSON and data frames, SYNC."""

from __future__ import annotations

import struct

import pytest

import hanabi_wire as P
from hanabi_wire import framing


def test_round_trip_one_frame() -> None:
    msg = {"type": "ping", "id": 7, "text": "héllo ✓", "n": [1, 2.5, None, True]}
    frame = P.encode_frame(msg)
    (length,) = struct.unpack(">I", frame[:4])
    assert length == len(frame) - 4
    assert P.FrameDecoder().feed(frame) == [msg]


def test_split_feeds_byte_by_byte_and_batched() -> None:
    msgs = [{"type": "output", "data": P.b64e(bytes(range(256)) * i)} for i in range(5)]
    stream = b"".join(P.encode_frame(m) for m in msgs)
    dec = P.FrameDecoder()
    got = []
    for i in range(len(stream)):
        got += dec.feed(stream[i : i + 1])
    assert got == msgs
    assert dec.buffered == 0
    dec2 = P.FrameDecoder()
    assert dec2.feed(stream[:10]) == []
    assert dec2.feed(stream[10:]) == msgs


def test_max_frame_boundary() -> None:
    pad = "x" * (P.MAX_FRAME - len('{"p":""}'))
    frame = P.encode_frame({"p": pad})
    assert len(frame) == 4 + P.MAX_FRAME
    assert P.FrameDecoder().feed(frame) == [{"p": pad}]
    with pytest.raises(P.ProtocolError):
        P.encode_frame({"p": pad + "y"})


@pytest.mark.parametrize("length", [0, P.MAX_FRAME + 1, 0x12345678])
def test_bad_lengths_are_rejected_from_the_header_alone(length: int) -> None:
    dec = P.FrameDecoder()
    with pytest.raises(P.ProtocolError):
        dec.feed(struct.pack(">I", length))
    assert dec.corrupt
    assert dec.feed(P.encode_frame({"type": "ping"})) == []  # discarded until SYNC
    assert dec.feed(P.SYNC + P.encode_frame({"type": "ping"})) == [{"type": P.T_SYNC_MARKER}, {"type": "ping"}]
    assert not dec.corrupt
    with pytest.raises(P.ProtocolError):
        dec.feed(b"\x00\x00\x00\x00")
    dec.reset()
    assert dec.feed(P.encode_frame({"type": "ping"})) == [{"type": "ping"}]


def test_messages_before_an_error_are_kept_on_the_exception() -> None:
    dec = P.FrameDecoder()
    with pytest.raises(P.ProtocolError) as info:
        dec.feed(P.encode_frame({"type": "a"}) + struct.pack(">I", 2) + b"[]")
    assert info.value.messages == [{"type": "a"}]


def test_sync_marker_cuts_a_half_received_frame() -> None:
    """A reconnecting peer: the old peer's frame was cut short, the new one starts with SYNC."""
    old = P.encode_frame({"type": "output", "data": "x" * 1000})
    dec = P.FrameDecoder()
    assert dec.feed(P.encode_frame({"type": "a"}) + old[:500]) == [{"type": "a"}]
    stream = P.SYNC + P.encode_frame({"type": "b"})
    got = []
    for i in range(len(stream)):  # byte by byte: the marker is split across feeds too
        got += dec.feed(stream[i:i + 1])
    assert got == [{"type": P.T_SYNC_MARKER}, {"type": "b"}]


def test_sync_after_a_cut_header_and_wait_sync() -> None:
    dec = P.FrameDecoder()
    assert dec.feed(b"\x00\x00") == []
    assert dec.feed(P.SYNC + P.encode_frame({"type": "b"})) == [{"type": P.T_SYNC_MARKER}, {"type": "b"}]
    host = P.FrameDecoder(wait_sync=True)  # a host that just connected skips stale bytes
    stale = P.encode_frame({"type": "old"})[3:] + P.encode_frame({"type": "old2"})
    assert host.feed(stale + P.SYNC[:5]) == []
    assert host.feed(P.SYNC[5:] + P.encode_frame({"type": "new"})) == [{"type": P.T_SYNC_MARKER}, {"type": "new"}]
    # A stream can hold two 0xFF bytes in a row (in a header), never three.
    body = b'{"p":"' + b"y" * (0xFFFF - 8) + b'"}'
    assert len(body) == 0xFFFF
    assert P.FrameDecoder().feed(struct.pack(">I", len(body)) + body)[0]["p"].startswith("yyy")


@pytest.mark.parametrize(
    "body",
    [
        b"\xff\xfe\x00garbage",  # not UTF-8
        b"{not json",
        b'{"a": NaN}',  # non-standard constant
        '"\u00e9"'.encode("utf-16"),  # JSON, but not UTF-8
    ],
)
def test_garbage_bodies(body: bytes) -> None:
    with pytest.raises(P.ProtocolError):
        P.FrameDecoder().feed(struct.pack(">I", len(body)) + body)


@pytest.mark.parametrize("body", [b"[1,2]", b'"str"', b"3", b"null", b"true"])
def test_non_object_is_rejected(body: bytes) -> None:
    with pytest.raises(P.ProtocolError, match="not an object"):
        P.FrameDecoder().feed(struct.pack(">I", len(body)) + body)


def test_encode_rejects_non_objects_and_unencodable() -> None:
    with pytest.raises(P.ProtocolError):
        P.encode_frame([1, 2])  # type: ignore[arg-type]  # the wrong type on purpose
    with pytest.raises(P.ProtocolError):
        P.encode_frame({"x": float("nan")})
    with pytest.raises(P.ProtocolError):
        P.encode_frame({"x": object()})
    with pytest.raises(P.ProtocolError):
        P.encode_frame({"x": "\udcff"})  # lone surrogate: not UTF-8 encodable


def test_b64_strict() -> None:
    raw = bytes(range(256))
    assert P.b64d(P.b64e(raw)) == raw
    assert P.b64d("") == b""
    for bad in ["abc", "ab!=", "YWJj\n", "YW Jj", "YWJj===="]:
        with pytest.raises(P.ProtocolError):
            P.b64d(bad)
    with pytest.raises(P.ProtocolError):
        P.b64d(b"YWJj")  # type: ignore[arg-type]  # the wrong type on purpose
    with pytest.raises(P.ProtocolError):
        P.b64d("é")


def test_reply_helpers() -> None:
    assert P.reply_ok(3, {"a": 1}) == {"type": "reply", "id": 3, "ok": True, "result": {"a": 1}}
    err = P.reply_error(4, P.E_NOT_FOUND, "gone")
    assert err["ok"] is False and err["error"] == {"code": "NOT_FOUND", "message": "gone"}
    assert P.reply_error(5, "BOGUS", "x")["error"]["code"] == "INTERNAL"
    assert P.MAX_DATA_CHUNK == 64 * 1024 and P.MAX_FRAME == 1 << 20


def test_the_marker_is_no_message_type_and_no_frame_may_claim_it() -> None:
    # The `sync` request (flush the guest's filesystems) once shared the marker's name: the
    # agent took it for a SYNC and never replied.
    assert P.T_SYNC_MARKER not in P.MESSAGES and P.T_SYNC in P.REQUESTS
    dec = P.FrameDecoder()
    assert dec.feed(P.encode_frame({"type": P.T_SYNC, "id": 1})) == [{"type": P.T_SYNC, "id": 1}]
    with pytest.raises(P.ProtocolError, match="only stands for a SYNC marker"):
        dec.feed(P.encode_frame({"type": P.T_SYNC_MARKER}))


def test_sync_is_reported_as_soon_as_the_marker_is_complete() -> None:
    dec = P.FrameDecoder()
    assert dec.feed(P.SYNC) == [{"type": P.T_SYNC_MARKER}]  # no need to wait for the next frame
    assert dec.feed(b"\xff\xff") == []  # a longer run's tail is no second marker
    assert dec.feed(P.encode_frame({"type": "x"})) == [{"type": "x"}]
    assert dec.feed(P.SYNC + P.SYNC) == [{"type": P.T_SYNC_MARKER}]


def test_plain_decoder_has_no_sync_markers():
    """With sync=False (agentd's io socket) 0xFF runs are part of lengths: errors, not markers."""
    decoder = P.FrameDecoder(sync=False)
    frame = P.encode_frame({"type": "stdin", "data": ""})
    assert decoder.feed(frame[:3]) == []
    assert decoder.feed(frame[3:] + frame) == [{"type": "stdin", "data": ""}] * 2
    with pytest.raises(P.ProtocolError, match="outside"):
        P.FrameDecoder(sync=False).feed(struct.pack(">I", 0x7FFFFFFF))
    broken = P.FrameDecoder(sync=False)
    with pytest.raises(P.ProtocolError):
        broken.feed(b"\x00\x00\x00\x02{x")
    with pytest.raises(P.ProtocolError, match="already corrupt"):
        broken.feed(frame)


def _out(data: bytes, stream: str = "stdout", cid: str = "c1", eid: str = "init") -> dict:
    return {"type": "output", "container_id": cid, "exec_id": eid, "stream": stream, "data": data}


@pytest.mark.parametrize("data", [b"", b"hello\n", bytes(range(256)) * 3, b"\xff" * 1000, b"\xfe\x00\xfe\x01\xff",
                                  b"\xff" * P.MAX_DATA_CHUNK])
def test_data_frames_carry_any_bytes_without_0xff(data: bytes) -> None:
    for msg in (_out(data), _out(data, "stderr", "c-2.x", "e" * 128),
                {"type": "stdin", "container_id": "c1", "exec_id": "init", "data": data}):
        frame = P.encode_frame(msg)
        assert frame[0] == 1  # the data kind
        assert b"\xff\xff\xff" not in frame[4:] and b"\xff" not in frame[5:]
        assert len(frame) - 4 <= 2 * len(data) + 2 + 2 * 129
        got = P.FrameDecoder().feed(frame)
        assert got == [msg]
        assert isinstance(got[0]["data"], bytes)


def test_text_costs_no_escaping_and_json_messages_stay_json() -> None:
    frame = P.encode_frame(_out(b"plain text\n"))
    assert frame == bytes([1, 0, 0, 21, 2, 2]) + b"c1" + bytes([4]) + b"init" + bytes([0]) + b"plain text\n"
    assert P.encode_frame({"type": "output", "data": "a string"})[0] == 0  # not bytes: JSON, as before
    with pytest.raises(P.ProtocolError, match="not encodable"):  # bytes only travel in data frames
        P.encode_frame({"type": "dns_answer", "qid": 1, "data": b"x"})


def test_sync_cuts_a_data_frame_full_of_0xff() -> None:
    """A data frame cut by a reconnect: the marker is found inside it, as in a JSON frame."""
    old = P.encode_frame(_out(b"\xff" * 5000))
    dec = P.FrameDecoder()
    assert dec.feed(old[:3000]) == []
    stream = P.SYNC + P.encode_frame(_out(b"\xff\xfe after"))
    got = []
    for i in range(len(stream)):
        got += dec.feed(stream[i:i + 1])
    assert got == [{"type": P.T_SYNC_MARKER}, _out(b"\xff\xfe after")]
    host = P.FrameDecoder(wait_sync=True)  # stale data frames before the marker are skipped
    assert host.feed(old + old[:100] + P.SYNC + P.encode_frame(_out(b"new"))) == [{"type": P.T_SYNC_MARKER}, _out(b"new")]


@pytest.mark.parametrize("body", [
    bytes([9, 1]) + b"c" + bytes([1]) + b"e" + b"x",      # unknown tag
    bytes([2, 5]) + b"c",                                  # cut inside the container id
    bytes([2, 1]) + b"c" + bytes([9]) + b"e",              # cut inside the exec id
    bytes([2, 1]) + b"\xe9" + bytes([1]) + b"e",           # not ASCII
    bytes([2, 1]) + b"c" + bytes([1]) + b"e" + b"\xfe\x02",  # bad escape
    bytes([2, 1]) + b"c" + bytes([1]) + b"e" + b"\xfe",      # escape cut at the end
    bytes([2, 1]) + b"c" + bytes([1]) + b"e" + b"a\xffb",    # a raw 0xFF
])
def test_bad_data_frames_are_corrupt(body: bytes) -> None:
    dec = P.FrameDecoder()
    with pytest.raises(P.ProtocolError):
        dec.feed(struct.pack(">I", 1 << 24 | len(body)) + body)
    assert dec.corrupt


def test_unknown_frame_kinds_and_the_cap_apply_to_data_frames() -> None:
    with pytest.raises(P.ProtocolError, match="unknown frame kind"):
        P.FrameDecoder().feed(struct.pack(">I", 2 << 24 | 5) + b"{}{}{")
    with pytest.raises(P.ProtocolError, match="outside"):
        P.FrameDecoder().feed(struct.pack(">I", 1 << 24 | P.MAX_FRAME + 1))
    with pytest.raises(P.ProtocolError, match="longer than"):
        P.encode_frame(_out(b"x", eid="e" * 129))
    with pytest.raises(P.ProtocolError, match="no data frame"):
        P.encode_frame({"type": "output", "stream": "stdin", "container_id": "c", "exec_id": "e", "data": b""})
    plain = P.FrameDecoder(sync=False)  # the io socket's decoder reads data frames too
    assert plain.feed(P.encode_frame(_out(b"\xff"))) == [_out(b"\xff")]


def test_escaping_round_trips_any_mix_of_escape_bytes() -> None:
    import random

    rng = random.Random(10)
    for _ in range(2000):
        data = bytes(rng.choice(b"\x00\x01\xfe\xffa") for _ in range(rng.randrange(0, 40)))
        escaped = framing.escape(data)
        assert b"\xff" not in escaped and framing.unescape(escaped) == data
