"""hanabi_common.locks.KeyedLocks, the daemons' one keyed lock: never two holders of a key.

blockd used a `setdefault` + `pop` pair: a holder that left popped the entry while another
caller still waited on the old lock, so the next caller made a fresh one and both were in at
once (the first test, run against that code, saw 2 holders). KeyedLocks drops an entry only
when nobody holds or waits for it; its waits end at the RPC caller's deadline.
"""

from __future__ import annotations

import threading
import time

import pytest

from hanabi_common.errors import DeadlineExceeded, Unavailable
from hanabi_common.locks import KeyedLocks
from hanabi_common.rpc.context import current_call, serving, within_deadline
from hanabi_common.rpc.envelope import RequestHeader


class Occupancy:
    """Counts the holders inside a critical section; `most` is the largest number seen."""

    def __init__(self) -> None:
        self._m = threading.Lock()
        self.inside = 0
        self.most = 0

    def enter(self) -> None:
        with self._m:
            self.inside += 1
            self.most = max(self.most, self.inside)

    def leave(self) -> None:
        with self._m:
            self.inside -= 1


def _wait_until(cond, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.005)


def test_a_caller_after_the_holder_left_waits_for_the_one_that_waited():
    """A holds; B waits; A leaves; C arrives while B holds: C must wait for B (blockd's
    setdefault+pop gave C a fresh lock here)."""
    locks = KeyedLocks(timeout=10)
    occ = Occupancy()
    a_in, a_go, b_in, b_go = threading.Event(), threading.Event(), threading.Event(), threading.Event()

    def a() -> None:
        with locks.hold("s"):
            a_in.set()
            a_go.wait(5)

    def b() -> None:
        with locks.hold("s"):
            occ.enter()
            b_in.set()
            b_go.wait(5)
            occ.leave()

    ta = threading.Thread(target=a)
    ta.start()
    assert a_in.wait(5)
    tb = threading.Thread(target=b)
    tb.start()
    _wait_until(lambda: locks._entries["s"][1] == 2)  # B waits on A's lock
    a_go.set()
    ta.join(5)
    assert b_in.wait(5)
    c_in = threading.Event()

    def c() -> None:
        with locks.hold("s"):
            occ.enter()
            c_in.set()
            occ.leave()

    tc = threading.Thread(target=c)
    tc.start()
    assert not c_in.wait(0.2), "C got in while B held the key"
    b_go.set()
    tb.join(5)
    tc.join(5)
    assert c_in.is_set() and occ.most == 1 and len(locks) == 0


def test_many_threads_one_key_never_two_holders_and_no_entry_left():
    locks = KeyedLocks(timeout=30)
    occ = Occupancy()
    done = []

    def worker(i: int) -> None:
        for _ in range(200):
            with locks.hold(f"k{i % 2}" if i % 3 else "k0"):
                occ.enter()
                occ.leave()
        done.append(i)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(done) == 8 and occ.most == 1 and len(locks) == 0


def test_other_keys_do_not_wait():
    locks = KeyedLocks(timeout=0.2)
    with locks.hold("a"):
        with locks.hold("b"):
            pass
        with pytest.raises(Unavailable, match="sandbox a is busy"):
            with locks.hold("a"):
                pass
    assert len(locks) == 0


def _header(seconds: float) -> RequestHeader:
    now = time.time()
    return RequestHeader(msg_id="m1", method="vm.create", deadline=now + seconds, sent_at=now)


def test_inside_a_call_the_wait_ends_at_the_callers_deadline():
    locks = KeyedLocks(timeout=None)  # blockd's: wait as long as the caller does
    held, go = threading.Event(), threading.Event()

    def holder() -> None:
        with locks.hold("s"):
            held.set()
            go.wait(10)

    t = threading.Thread(target=holder)
    t.start()
    assert held.wait(5)
    try:
        started = time.monotonic()
        with serving(_header(0.3)) as ctx:
            assert current_call() is ctx and 0 < within_deadline(100) <= 0.3
            with pytest.raises(DeadlineExceeded, match="caller's deadline"):
                with locks.hold("s"):
                    pass
        assert 0.2 < time.monotonic() - started < 3
        assert current_call() is None and within_deadline(7) == 7
    finally:
        go.set()
        t.join(5)
    assert len(locks) == 0
