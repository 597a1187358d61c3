"""The watchdog is fed from the RPC workers' progress: a canary on the pool, no call stuck
past its deadline. A real server, a real notify socket, a worker wedged on purpose."""

from __future__ import annotations

import logging
import socket
import threading
import time

import pytest
from pydantic import BaseModel

from hanabi_common.errors import DeadlineExceeded
from hanabi_common.rpc.client import RpcClient
from hanabi_common.rpc.progress import Progress, Watchdog
from hanabi_common.rpc.server import RpcServer
from hanabi_common.sdnotify import notify


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_progress_names_a_starved_pool_and_a_call_past_its_deadline():
    clock = Clock()
    progress = Progress(stall_s=10, clock=clock)
    assert progress.canary_due() and not progress.canary_due()  # one at a time
    clock.now += 9
    assert progress.stalled() is None
    clock.now += 2
    assert "no RPC worker was free for 11s" in progress.stalled()
    progress.canary_ran()
    assert progress.stalled() is None
    token = progress.begin("vm.create", seconds_left=5)
    clock.now += 14
    assert progress.stalled() is None  # 9 s past the deadline: still within the grace
    clock.now += 2
    assert progress.stalled() == "a worker is stuck in vm.create, 11s past its deadline"
    progress.end(token)
    assert progress.stalled() is None and progress.completed == 1


class Nothing(BaseModel):
    pass


class NotifySocket:
    """What systemd listens on: a datagram socket named by $NOTIFY_SOCKET."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)

    def until(self, prefix: str, seconds: float) -> list[str]:
        """Messages up to and including the first that starts with `prefix`."""
        got = []
        end = time.monotonic() + seconds
        while not (got and got[-1].startswith(prefix)):
            left = end - time.monotonic()
            assert left > 0, f"no {prefix!r} within {seconds} s: {got}"
            self.sock.settimeout(left)
            got.append(self.sock.recv(4096).decode())
        return got

    def messages(self, seconds: float) -> list[str]:
        """Everything received within `seconds`."""
        got = []
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                got.append(self.sock.recv(4096).decode())
            except TimeoutError:
                break
        return got


@pytest.fixture
def wedgeable(tmp_path, monkeypatch):
    """A server of 2 workers whose `wedge` method blocks until released, its watchdog
    (every 0.05 s, 0.5 s of grace; the idle loop turns every 0.5 s) notifying a real socket."""
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    listener = NotifySocket(str(tmp_path / "notify"))
    release = threading.Event()
    server = RpcServer("wedged", f"ipc://{tmp_path}/w.sock", workers=2, stall_s=0.5)
    watchdog = Watchdog(0.05, server.progress, notify, logging.getLogger("test.watchdog"))
    server._on_tick = watchdog.tick
    server.register("wedge", Nothing, lambda _: release.wait(30) and {})
    ready = threading.Event()
    thread = threading.Thread(target=server.serve_forever, kwargs={"ready": ready.set}, daemon=True)
    thread.start()
    assert ready.wait(5)
    yield server, listener, release, watchdog
    release.set()
    server.stop()
    thread.join(10)


def _wedge(server: RpcServer, timeout: float) -> threading.Thread:
    def call() -> None:
        try:
            RpcClient("wedged", server.endpoint, timeout=timeout).call("wedge")
        except DeadlineExceeded:
            pass  # the short one: its caller gave up

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    return thread


def test_a_worker_wedged_past_its_deadline_stops_the_watchdog(wedgeable, caplog):
    server, listener, release, watchdog = wedgeable
    assert "WATCHDOG=1" in listener.messages(1.5)
    caller = _wedge(server, timeout=0.2)  # the caller gives up; the worker stays stuck
    caller.join(5)
    # The other worker still serves (ping works), yet the daemon is not healthy.
    assert RpcClient("wedged", server.endpoint, timeout=2).ping()["daemon"] == "wedged"
    listener.until("STATUS=stalled: a worker is stuck in wedge", 3.0)
    assert "WATCHDOG=1" not in listener.messages(1.5)  # 30 watchdog periods, 3 loop turns
    assert "stuck in wedge" in watchdog.withheld
    release.set()
    assert "WATCHDOG=1" in listener.messages(1.5)
    assert watchdog.withheld is None


def test_all_workers_busy_starves_the_canary_and_stops_the_watchdog(wedgeable):
    server, listener, release, watchdog = wedgeable
    callers = [_wedge(server, timeout=30) for _ in range(2)]  # long deadlines: not overdue
    deadline = time.monotonic() + 5
    while server.progress.running() < 2:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    listener.until("STATUS=stalled: no RPC worker was free", 3.0)
    assert "WATCHDOG=1" not in listener.messages(1.5)
    assert "no RPC worker was free" in watchdog.withheld
    release.set()
    assert "WATCHDOG=1" in listener.messages(1.5)
    for caller in callers:
        caller.join(5)
