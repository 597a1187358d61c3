"""Validation of what the untrusted guest agent may send to agentd."""

from __future__ import annotations


import pytest

from hanabi_agentd.guest_messages import (GuestExit, GuestMisbehaved, GuestOutput, GuestReady,
                                          GuestReply, PidResult, PingResult, PsResult,
                                          parse_guest_message, parse_result, reply_id)
from hanabi_wire import MAX_DATA_CHUNK, PROTOCOL_VERSION, FrameDecoder, encode_frame


def output(**over):
    msg = {"type": "output", "container_id": "c1", "exec_id": "init", "stream": "stdout", "data": b"hello"}
    msg.update(over)
    return msg


def test_valid_messages_parse():
    out = parse_guest_message(output())
    assert isinstance(out, GuestOutput) and out.data == b"hello"
    full = b"\xff" * MAX_DATA_CHUNK  # through a data frame, as it travels
    assert parse_guest_message(FrameDecoder().feed(encode_frame(output(data=full)))[0]).data == full
    ex = parse_guest_message({"type": "exit", "container_id": "c1", "exec_id": "e-1.2",
                              "exit_code": None, "signal": 9})
    assert isinstance(ex, GuestExit) and ex.signal == 9 and ex.exit_code is None
    rep = parse_guest_message({"type": "reply", "id": 7, "ok": True, "result": {"pid": 3}})
    assert isinstance(rep, GuestReply) and rep.result == {"pid": 3}
    err = parse_guest_message({"type": "reply", "id": 7, "ok": False,
                               "error": {"code": "NOT_FOUND", "message": "no"}})
    assert err.error.code == "NOT_FOUND"
    ready = parse_guest_message({"type": "ready", "agent_version": "1", "kernel": "6.1", "new": 1})
    assert isinstance(ready, GuestReady)


def test_oversized_data_is_rejected():
    with pytest.raises(GuestMisbehaved, match="data"):
        parse_guest_message(output(data=b"x" * (MAX_DATA_CHUNK + 1)))
    with pytest.raises(GuestMisbehaved, match="data"):
        parse_guest_message(output(data=b"A" * 10_000_000))


@pytest.mark.parametrize("data", ["aGVsbG8=", 5, None, ["aGk="], bytearray(b"x" * (MAX_DATA_CHUNK + 1))])
def test_output_data_must_be_bytes_of_a_data_frame(data):
    """Stdio travels in data frames: base64 text in a JSON frame is no longer output."""
    with pytest.raises(GuestMisbehaved, match="data"):
        parse_guest_message(output(data=data))


@pytest.mark.parametrize("data", ["not base64!", "aGVsbG8", "aGVs\nbG8=", 5, None, ["aGk="],
                                  "A" * 10_000_000])
def test_bad_base64_is_rejected(data):
    with pytest.raises(GuestMisbehaved, match="data"):
        parse_guest_message({"type": "dns_query", "qid": 1, "server": "127.0.0.11", "data": data})


@pytest.mark.parametrize("field,value", [
    ("container_id", "../../etc"), ("container_id", ""), ("container_id", "a" * 129),
    ("container_id", "-lead"), ("exec_id", "a/b"), ("exec_id", "x\n"), ("container_id", 12),
])
def test_bad_ids_are_rejected(field, value):
    with pytest.raises(GuestMisbehaved, match=field):
        parse_guest_message(output(**{field: value}))


@pytest.mark.parametrize("msg", [
    {"type": "exit", "container_id": "c", "exec_id": "init", "exit_code": "3"},
    {"type": "exit", "container_id": "c", "exec_id": "init", "exit_code": True},
    {"type": "exit", "container_id": "c", "exec_id": "init", "exit_code": 256},
    {"type": "exit", "container_id": "c", "exec_id": "init", "exit_code": -1},
    {"type": "exit", "container_id": "c", "exec_id": "init", "signal": 0},
    {"type": "exit", "container_id": "c", "exec_id": "init", "signal": 65},
    {"type": "exit", "container_id": "c", "exec_id": "init", "signal": 9.0},
    {"type": "reply", "id": "1", "ok": True},
    {"type": "reply", "id": True, "ok": True},
    {"type": "reply", "id": 0, "ok": True},
    {"type": "reply", "id": 1, "ok": "yes"},
    {"type": "reply", "id": 1, "ok": False},
    {"type": "reply", "id": 1, "ok": True, "error": {"code": "INTERNAL", "message": ""}},
    {"type": "reply", "id": 1, "ok": False, "error": {"code": "EVIL", "message": "x"}},
    {"type": "reply", "id": 1, "ok": False, "error": {"code": "INTERNAL", "message": "x" * 5000}},
    {"type": "reply", "id": 1, "ok": True, "result": [1]},
    {"type": "output", "container_id": "c", "exec_id": "init", "stream": "stdin", "data": ""},
    {"type": "ready", "agent_version": 1, "kernel": "k"},
])
def test_wrong_types_and_ranges_are_rejected(msg):
    with pytest.raises(GuestMisbehaved):
        parse_guest_message(msg)


@pytest.mark.parametrize("msg", [{"type": "stdin"}, {"type": "REPLY", "id": 1}, {"no": "type"},
                                 {"type": 5}, {"type": None}, "a string", [1, 2]])
def test_unknown_types_are_rejected(msg):
    with pytest.raises(GuestMisbehaved):
        parse_guest_message(msg)


def test_reply_id_of_an_invalid_reply():
    assert reply_id({"type": "reply", "id": 4, "ok": "junk"}) == 4
    assert reply_id({"type": "reply", "id": True}) is None
    assert reply_id({"type": "exit", "id": 4}) is None


def test_results_are_validated_per_request():
    assert parse_result(PidResult, {"pid": 42}, "start").pid == 42
    for bad in ({"pid": 0}, {"pid": "42"}, {}, {"pid": 1 << 40}):
        with pytest.raises(GuestMisbehaved):
            parse_result(PidResult, bad, "start")
    ping = parse_result(PingResult, {"agent_version": "0.1", "kernel": "6.1", "uptime_s": 2}, "ping")
    assert ping.uptime_s == 2.0 and ping.protocol == 1  # an agent that states no version speaks 1
    assert parse_result(PingResult, {"agent_version": "0.1", "kernel": "6.1", "protocol": PROTOCOL_VERSION},
                        "ping").protocol == PROTOCOL_VERSION
    with pytest.raises(GuestMisbehaved):
        parse_result(PingResult, {"agent_version": "v" * 100, "kernel": "k"}, "ping")
    ps = parse_result(PsResult, {"processes": [{"pid": 5, "exec_id": "init", "args": ["sh"]},
                                               {"pid": 6, "exec_id": "", "args": []}]}, "ps")
    assert [p.pid for p in ps.processes] == [5, 6]
    with pytest.raises(GuestMisbehaved):
        parse_result(PsResult, {"processes": [{"pid": 5, "exec_id": "../x", "args": []}]}, "ps")
