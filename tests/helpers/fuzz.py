"""Generated malformed input for the daemons' RPC servers and agentd's guest channel.

Hypothesis strategies draw the messages; `run_budgeted` replays a Hypothesis-driven check
with fixed seeds (seed, seed+1, ...) until a message count or a time budget is reached,
so the suite runs a few seconds of it and bench/fuzz.py hundreds of thousands of messages,
both reproducibly.

RPC messages (`rpc_message`) are multipart ZeroMQ messages as a DEALER sends them: random
frames; the protocol frame with random header and body bytes; a well-formed header whose
fields are mutated (wrong types, versions, methods, deadlines, extra keys); a request
that is well formed but for a body the method's model must refuse (a key no model has),
so no generated message can make a daemon act; byte flips and truncations of those; and,
rarely, a message above the daemon's size limit. Every one must get one error reply
(`ping` and `describe` excepted, which take anything).

Guest chunks (`guest_chunk`) are what a hostile guest writes on its channel: valid frames
of invalid messages (wrong ids, replies to nothing, unknown types, output of unknown
processes, bad base64, huge fields), torn frames, bad lengths, SYNC markers, raw noise.
"""

from __future__ import annotations

import base64
import json
import os
import random
import struct
import time
from collections.abc import Callable

from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from hanabi_common.rpc.envelope import PROTOCOL

FORBIDDEN_KEY = "\u0000fuzz"  # no request model has it, and every one forbids extra keys
HARMLESS = {"ping", "describe"}  # accept any body, answer ok
FUTURE = 4.0e9  # a deadline far ahead (a fixed one: generation must not depend on the clock)

_scalars = (st.none() | st.booleans() | st.integers(min_value=-2**70, max_value=2**70)
            | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=24))
JSON = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=12)


def _dumps(value: object) -> bytes:
    return json.dumps(value, allow_nan=True).encode()


@st.composite
def _header(draw, methods: list[str]) -> dict:
    header = {
        "version": draw(st.just(1) | st.integers(-3, 5) | JSON),
        "msg_id": draw(st.text(min_size=1, max_size=16) | st.text(max_size=80) | JSON),
        "method": draw(st.sampled_from(methods) | st.text(max_size=70) | JSON),
        "deadline": draw(st.just(FUTURE) | st.floats(allow_nan=True) | st.just(1.0) | JSON),
        "sent_at": draw(st.just(1.0) | JSON),
        "sender": draw(st.text(max_size=140) | JSON),
    }
    for key in draw(st.lists(st.sampled_from(sorted(header)), max_size=3)):
        header.pop(key, None)
    if draw(st.booleans()):
        header[draw(st.text(max_size=8))] = draw(JSON)
    return header


@st.composite
def _body(draw, method: object) -> bytes:
    if not isinstance(method, str) or method in HARMLESS:
        return draw(st.binary(max_size=64) | JSON.map(_dumps))
    fields = draw(st.dictionaries(st.text(max_size=12), JSON, max_size=5))
    fields[FORBIDDEN_KEY] = draw(JSON)
    return _dumps(fields)


@st.composite
def _envelope(draw, methods: list[str]) -> list[bytes]:
    header = draw(_header(methods))
    return [PROTOCOL, _dumps(header), draw(_body(header.get("method")))]


@st.composite
def _mutated(draw, methods: list[str]) -> list[bytes]:
    frames = draw(_envelope(methods))
    index = draw(st.integers(0, len(frames) - 1))
    frame = bytearray(frames[index])
    for _ in range(draw(st.integers(1, 4))):
        if frame and draw(st.booleans()):
            frame[draw(st.integers(0, len(frame) - 1))] = draw(st.integers(0, 255))
        else:
            frame = frame[:draw(st.integers(0, len(frame)))]
    frames[index] = bytes(frame)
    if draw(st.booleans()):
        frames.insert(draw(st.integers(0, len(frames))), draw(st.binary(max_size=16)))
    return frames


def rpc_message(methods: list[str], max_bytes: int) -> st.SearchStrategy[list[bytes]]:
    """One malformed multipart message (without the DEALER's empty delimiter)."""
    oversized = st.just([PROTOCOL, b"{" + b" " * max_bytes + b"}", b"{}"])
    return st.one_of(
        st.lists(st.binary(max_size=48), max_size=5),
        st.builds(lambda h, b: [PROTOCOL, h, b], st.binary(max_size=96), st.binary(max_size=96)),
        _envelope(methods), _envelope(methods), _mutated(methods), _mutated(methods),
        st.integers(0, 999).flatmap(lambda n: oversized if n == 0 else _envelope(methods)),
    )


def expects_error(frames: list[bytes]) -> bool:
    """Whether the reply to `frames` must be an error (all but harmless methods)."""
    try:
        method = json.loads(frames[1]).get("method") if len(frames) == 3 else None
    except (ValueError, AttributeError, UnicodeDecodeError):
        return True
    return not (isinstance(method, str) and method in HARMLESS)


# -- the guest channel ----------------------------------------------------------------------

def _frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


_IDS = st.text(alphabet="abc.-_/ \u00e9", max_size=8) | st.sampled_from(["c1", "init", "", "x" * 200])


@st.composite
def _guest_message(draw) -> dict:
    kind = draw(st.sampled_from(["reply", "output", "exit", "ready", "dns_query", "protocol_error",
                                 "sync", "stdin", "nonsense"]) | st.text(max_size=12))
    msg: dict = {"type": kind}
    if kind == "reply":
        msg.update(id=draw(st.integers(-5, 2**64) | JSON), ok=draw(st.booleans() | JSON),
                   result=draw(JSON), error=draw(JSON | st.just({"code": "NOT_FOUND", "message": "x"})))
    elif kind == "output":
        msg.update(container_id=draw(_IDS), exec_id=draw(_IDS), stream=draw(st.sampled_from(["stdout", "stderr", "x"])),
                   data=draw(st.binary(max_size=256).map(_b64) | st.text(max_size=32) | JSON))
    elif kind == "exit":
        msg.update(container_id=draw(_IDS), exec_id=draw(_IDS), exit_code=draw(st.integers(-1, 300) | JSON),
                   signal=draw(st.integers(-1, 70) | JSON))
    elif kind == "dns_query":
        msg.update(qid=draw(st.integers(-1, 2**40) | JSON), server=draw(st.text(max_size=20)),
                   data=draw(st.binary(max_size=64).map(_b64)), tcp=draw(JSON))
    else:
        for key in draw(st.lists(st.text(max_size=8), max_size=3)):
            msg[key] = draw(JSON)
    if kind in ("output", "exit") and draw(st.booleans()):
        msg["seq"] = draw(st.integers(-1, 2**64) | JSON)
    return msg


def guest_chunk() -> st.SearchStrategy[bytes]:
    """Bytes a hostile guest writes (the host must survive all of them)."""
    message = _guest_message().map(lambda m: _frame(_dumps(m)))
    return st.one_of(
        message, message, message,
        st.binary(max_size=64),                                            # noise
        st.binary(min_size=1, max_size=64).map(_frame),                    # frames of non-JSON
        JSON.map(lambda v: _frame(_dumps(v))),                              # JSON that is no object
        st.integers(0, 2**32 - 1).map(lambda n: struct.pack(">I", n)),     # any length, no body
        message.flatmap(lambda f: st.integers(0, len(f)).map(lambda n: f[:n])),  # torn frames
        st.just(b"\xff" * 8),                                               # SYNC markers
    )


# -- running ------------------------------------------------------------------------------

_TOKENS = [b"null", b"1e999", b"-0", b'"\\ud800"', b"[" * 64, b"{}", b'""', b"\x00", b"\xff" * 3,
           b'{"a":' * 20, b"NaN", b"99999999999999999999999", b"\\", b'"', b","]


def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    """A few random edits of `data`: flips, cuts, insertions, JSON-ish tokens, repeats."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(6)
        pos = rng.randint(0, len(buf))
        if op == 0 and buf:
            buf[min(pos, len(buf) - 1)] = rng.randrange(256)
        elif op == 1:
            del buf[pos:pos + rng.randint(1, 16)]
        elif op == 2:
            buf[pos:pos] = rng.randbytes(rng.randint(1, 16))
        elif op == 3:
            buf[pos:pos] = rng.choice(_TOKENS)
        elif op == 4:
            buf = buf[:pos]
        else:
            buf[pos:pos] = bytes(buf[pos:pos + 32]) * rng.randint(1, 4)
    return bytes(buf)


def mutate_frames(frames: list[bytes], rng: random.Random) -> list[bytes]:
    """A mutation of a multipart message: edit one frame, or add, drop or swap frames."""
    frames = list(frames)
    op = rng.randrange(5)
    if op <= 1 and frames:
        index = rng.randrange(len(frames))
        frames[index] = mutate_bytes(frames[index], rng)
    elif op == 2:
        frames.insert(rng.randint(0, len(frames)), rng.randbytes(rng.randint(0, 24)))
    elif op == 3 and frames:
        del frames[rng.randrange(len(frames))]
    elif len(frames) >= 2:
        a, b = rng.sample(range(len(frames)), 2)
        frames[a], frames[b] = frames[b], frames[a]
    return frames


class _BudgetSpent(Exception):
    """Raised inside the Hypothesis run to end it once the budget is spent."""


def run_budgeted(strategy: st.SearchStrategy, check: Callable[[list], None], *, first_seed: int,
                 budget_s: float, max_items: int, mutate: Callable[[object, random.Random], object],
                 fanout: int = 50, batch: int = 200) -> int:
    """Hypothesis draws a template item and an RNG seed per example (seeds first_seed,
    first_seed+1, ... for the runs); each template and `fanout - 1` cheap mutations of it
    (`mutate(item, rng)`) go to `check` in batches of `batch`, until `max_items` were
    checked or `budget_s` passed. Returns how many were checked. Deterministic for a
    given seed and count (Hypothesis alone draws a few hundred items a second here)."""
    done = [0]
    pending: list = []
    stop_at = time.monotonic() + budget_s

    def flush() -> None:
        if pending:
            check(list(pending))
            done[0] += len(pending)
            pending.clear()

    current = first_seed
    while done[0] < max_items and time.monotonic() < stop_at:
        @seed(current)
        @settings(max_examples=10**6, deadline=None, database=None, derandomize=False,
                  phases=[Phase.generate], suppress_health_check=list(HealthCheck), report_multiple_bugs=False)
        @given(strategy, st.integers(0, 2**32 - 1))
        def one(item, rng_seed: int) -> None:
            rng = random.Random(rng_seed)
            pending.append(item)
            for _ in range(fanout - 1):
                pending.append(mutate(item, rng))
            if len(pending) >= batch:
                flush()
            if done[0] >= max_items or time.monotonic() >= stop_at:
                raise _BudgetSpent

        try:
            one()
        except _BudgetSpent:
            pass
        flush()
        current += 1
    return done[0]


def fd_count(pid: int | None = None) -> int:
    """How many fds process `pid` (default: this one) has open."""
    return len(os.listdir(f"/proc/{pid or os.getpid()}/fd"))


def settled_fd_count(pid: int, baseline: int, timeout: float = 10.0) -> int:
    """The fd count of `pid` once it is back at `baseline` (connections close
    asynchronously), or whatever it is after `timeout`."""
    deadline = time.monotonic() + timeout
    while (count := fd_count(pid)) > baseline and time.monotonic() < deadline:
        time.sleep(0.05)
    return count


class RpcFuzzer:
    """Sends batches of generated messages to one endpoint over one DEALER and checks
    that each gets exactly one well-formed reply (an error unless harmless)."""

    def __init__(self, endpoint: str, methods: list[str], max_bytes: int) -> None:
        import zmq

        self.endpoint = endpoint
        self.strategy = rpc_message(methods, max_bytes)
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.sent = 0

    def check(self, batch: list[list[bytes]]) -> None:
        from hanabi_common.rpc.envelope import decode_reply

        for frames in batch:
            self.sock.send_multipart([b""] + frames, copy=False)
        ok = 0
        for _ in batch:  # replies come in the order the workers finish: count them
            assert self.sock.poll(10_000), f"no reply within 10 s (after {self.sent} messages)"
            reply = self.sock.recv_multipart()
            header, body = decode_reply(reply[1:])
            assert header.status == "ok" or body.get("code"), body
            ok += header.status == "ok"
            self.sent += 1
        harmless = sum(not expects_error(frames) for frames in batch)
        assert ok <= harmless, f"{ok} ok replies to {harmless} harmless requests in {batch!r:.2000}"

    def close(self) -> None:
        self.sock.close(0)


def fuzz_daemon(daemons, name: str, *, budget_s: float, max_items: int, first_seed: int) -> int:
    """Fuzz one of the running `daemons` (tests.helpers.hanabi.Daemons) for `budget_s`
    or `max_items` messages; assert it survived and kept no fd; returns the count."""
    from hanabi_common.rpc.client import RpcClient

    config = daemons.config
    client = RpcClient(name, config.endpoint(name), timeout=5)
    methods = sorted(client.call("describe")["methods"])
    pid = daemons.procs[name].pid
    baseline = fd_count(pid)
    fuzzer = RpcFuzzer(config.endpoint(name), methods, config.rpc.max_message_bytes)
    try:
        count = run_budgeted(fuzzer.strategy, fuzzer.check, first_seed=first_seed, budget_s=budget_s,
                             max_items=max_items, mutate=mutate_frames)
    finally:
        fuzzer.close()
    assert daemons.procs[name].poll() is None, f"{name} died"
    assert client.ping()["daemon"] == name
    assert settled_fd_count(pid, baseline) <= baseline, f"{name} leaked fds"
    return count
