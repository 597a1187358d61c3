"""The warm pool's bookkeeping with a boot function that records calls (no VMs)."""

from __future__ import annotations

import threading
import time

from hanabi_common.errors import Unavailable
from hanabi_vmmd import pool as pool_mod
from hanabi_vmmd.pool import WarmPool, new_pool_id


def wait_until(predicate, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def test_pool_ids():
    made = new_pool_id()
    assert made.startswith("pool-") and made != new_pool_id()


def test_fills_hands_out_oldest_first_and_refills():
    booted: list[str] = []
    pool = WarmPool(2, booted.append)
    pool.start(adopted=["pool-adopted"])
    try:
        assert wait_until(lambda: len(pool.free()) == 2)
        assert pool.free()[0] == "pool-adopted" and len(booted) == 1   # the adopted one counts
        assert pool.take() == "pool-adopted"
        assert wait_until(lambda: len(pool.free()) == 2) and len(booted) == 2
        pool.forget(pool.free()[0])                                    # died: replaced
        assert wait_until(lambda: len(booted) == 3 and len(pool.free()) == 2)
    finally:
        pool.close()


def test_size_zero_boots_nothing():
    booted: list[str] = []
    pool = WarmPool(0, booted.append)
    pool.start(adopted=[])
    assert pool.take() is None
    time.sleep(0.05)
    assert booted == []
    pool.close()


def test_a_failing_boot_is_retried_later(monkeypatch):
    monkeypatch.setattr(pool_mod, "RETRY_AFTER_FAILURE_S", 0.05)
    attempts = []
    lock = threading.Lock()

    def boot(pool_id: str) -> None:
        with lock:
            attempts.append(pool_id)
            if len(attempts) < 3:
                raise Unavailable("QEMU exited while starting")

    pool = WarmPool(1, boot)
    pool.start(adopted=[])
    try:
        assert wait_until(lambda: len(attempts) == 3 and pool.free() == [attempts[-1]])
    finally:
        pool.close()
