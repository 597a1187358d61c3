"""A hostile guest (issue 13): agentd's host side of the guest channel takes generated
malformed frames and messages (tests/helpers/fuzz.py: wrong ids, replies to nothing,
unknown types, output of unknown processes, torn frames, bad lengths, huge frames, early
EOF) without crashing or leaking fds, and another sandbox served by the same agentd keeps
being answered meanwhile; an output flood stays within the buffer limit."""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from contextlib import contextmanager
from collections.abc import Iterator

import pytest

from hanabi_agentd.service import AgentService
from hanabi_common.config import AgentConfig, Config
from hanabi_common.models.agentd import ConnectAgent
from hanabi_common.models.base import SandboxRef
from hanabi_wire import MAX_FRAME
from tests.helpers.fake_agent import FakeAgent
from tests.helpers.fuzz import fd_count, guest_chunk, mutate_bytes, run_budgeted
from tests.unit.test_agentd_service import ListeningAgent, create, ref

ITEMS = int(os.environ.get("HANABI_FUZZ_ITEMS", "1000"))  # a count, not a rate (load-proof)
CAP_S = float(os.environ.get("HANABI_FUZZ_CAP_S", "300"))  # only guards against a stall
SEED = 4242
OTHER_SANDBOX_ANSWERS_S = 1.0


class ClosingAgent(FakeAgent):
    """A FakeAgent that closes its socket once the host hung up (fds are counted here)."""

    def _loop(self) -> None:
        try:
            super()._loop()
        finally:
            self.sock.close()


class HostileVm(ListeningAgent):
    """A guest that answers the handshake and whatever agentd asks, and lets the test
    write anything on its channel."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.make_agent = lambda conn: ClosingAgent(conn, self._serve)

    def write(self, data: bytes) -> bool:
        """Write on the current connection; False if agentd has dropped it."""
        agent = self.agents[-1]
        try:
            agent.send_raw(data)
            return True
        except OSError:
            return False


@contextmanager
def hostile_rig() -> Iterator[tuple[AgentService, ListeningAgent, HostileVm]]:
    """One agentd service with two sandboxes, a well-behaved guest and a hostile one,
    each running container c1."""
    root = tempfile.mkdtemp(prefix="hfz", dir="/tmp")
    config = Config(run_dir=root, agent=AgentConfig(ready_timeout_s=5, request_timeout_s=3,
                                                    output_buffer_bytes=64 * 1024))
    good = ListeningAgent(os.path.join(root, "good.sock"))
    good.make_agent = lambda conn: ClosingAgent(conn, good._serve)
    bad = HostileVm(os.path.join(root, "bad.sock"))
    svc = AgentService(config)
    for sid, agent in (("good", good), ("bad", bad)):
        svc.connect(ConnectAgent(sandbox_id=sid, socket_path=agent.path))
        create(svc, "c1", sid=sid)
        svc.start(ref("c1", sid=sid))
    try:
        yield svc, good, bad
    finally:
        svc.close()
        for agent in (good, bad):
            agent.close()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def two_sandboxes():
    with hostile_rig() as rig:
        yield rig


def _connected(svc: AgentService, sid: str) -> bool:
    return svc.get(SandboxRef(sandbox_id=sid)).connected


def _reconnect(svc: AgentService, bad: HostileVm) -> None:
    """agentd dropped the hostile guest (as it must for broken framing): connect again,
    as the runtime would for a new request."""
    deadline = time.monotonic() + 5
    while _connected(svc, "bad"):  # the drop is being recorded
        assert time.monotonic() < deadline
        time.sleep(0.01)
    svc.connect(ConnectAgent(sandbox_id="bad", socket_path=bad.path))


def fuzz_guest_channel(svc: AgentService, bad: HostileVm, *, budget_s: float, max_items: int,
                       first_seed: int) -> dict:
    """Write generated chunks on the hostile guest's channel (reconnecting whenever agentd
    cut it off), asking the other sandbox for `ps` after each batch; then check that the
    fds are back. Returns what was measured."""
    before = fd_count()
    drops = [0]
    slowest = [0.0]

    def check(chunks: list[bytes]) -> None:
        if not bad.write(b"".join(chunks)) or not _connected(svc, "bad"):
            drops[0] += 1
            _reconnect(svc, bad)
        started = time.monotonic()
        assert svc.ps(ref("c1", sid="good")).processes is not None
        slowest[0] = max(slowest[0], time.monotonic() - started)

    count = run_budgeted(guest_chunk(), check, first_seed=first_seed, budget_s=budget_s,
                         max_items=max_items, mutate=mutate_bytes, batch=50)
    if not _connected(svc, "bad"):
        _reconnect(svc, bad)
    assert svc.ps(ref("c1", sid="good")).processes is not None
    # Every dropped connection was closed on agentd's side (and the fake's): no fd is left.
    deadline = time.monotonic() + 5
    while fd_count() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    return {"chunks": count, "drops": drops[0], "slowest_other_s": round(slowest[0], 3),
            "fds_before": before, "fds_after": fd_count()}


def test_hostile_guest_frames_never_crash_agentd_nor_stall_the_other_sandbox(two_sandboxes):
    svc, good, bad = two_sandboxes
    got = fuzz_guest_channel(svc, bad, budget_s=CAP_S, max_items=ITEMS, first_seed=SEED)
    assert got["chunks"] >= ITEMS, got
    assert got["slowest_other_s"] < OTHER_SANDBOX_ANSWERS_S, got
    assert got["drops"] > 0, got  # broken framing was seen (and the guest cut off)
    assert got["fds_after"] <= got["fds_before"], got


def test_huge_frame_and_early_eof_cut_the_guest_off_cleanly(two_sandboxes):
    svc, good, bad = two_sandboxes
    bad.write((MAX_FRAME + 1).to_bytes(4, "big") + b"{")
    deadline = time.monotonic() + 5
    while _connected(svc, "bad"):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert svc.state(ref("c1", sid="bad")).processes[0].exit_status == 137  # cut off with its guest
    _reconnect(svc, bad)
    bad.write(b"\x00\x00\x01\x00{\"type\":")  # a torn frame, then the guest hangs up
    bad.agents[-1].close()
    deadline = time.monotonic() + 5
    while _connected(svc, "bad"):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert svc.ps(ref("c1", sid="good")).processes is not None


def test_output_flood_is_bounded_and_does_not_stall_the_other_sandbox(two_sandboxes):
    svc, good, bad = two_sandboxes
    chunk = os.urandom(48 * 1024)  # raw bytes: output travels in data frames
    frame = {"type": "output", "container_id": "c1", "exec_id": "init", "stream": "stdout", "data": chunk}
    stop = threading.Event()

    def flood() -> None:
        agent = bad.agents[-1]
        while not stop.is_set():
            try:
                agent.send(frame)
            except OSError:
                return

    flooder = threading.Thread(target=flood, daemon=True)
    flooder.start()
    try:
        slowest = 0.0
        for _ in range(20):
            started = time.monotonic()
            svc.ps(ref("c1", sid="good"))
            slowest = max(slowest, time.monotonic() - started)
        assert slowest < OTHER_SANDBOX_ANSWERS_S, f"the other sandbox waited {slowest:.2f} s"
        record = svc.registry.get("bad").session.process("c1", "init")
        assert record.buffered() <= 64 * 1024 and record.dropped > 0
        assert _connected(svc, "bad")  # a flood of valid output is no reason to cut it off
    finally:
        stop.set()
        flooder.join(5)
