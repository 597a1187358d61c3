"""hanabi_common.doorbell on real FIFOs: a ring wakes the waiter at once, rings coalesce,
ringing never blocks or fails the ringer, and the waiter refuses what is not its FIFO."""

from __future__ import annotations

import os
import threading
import time

import pytest

from hanabi_common.doorbell import Doorbell, ring


def test_a_ring_wakes_the_waiter_and_rings_coalesce(tmp_path):
    path = tmp_path / "bell"
    assert ring(path) is False  # no doorbell yet: nothing to ring, no error
    bell = Doorbell(path)
    try:
        assert bell.wait(0.05) is False  # not rung: the timeout
        threading.Timer(0.2, ring, args=(path,)).start()
        began = time.monotonic()
        assert bell.wait(30) is True
        assert time.monotonic() - began < 10  # woken by the ring, not the timeout
        for _ in range(70000):  # more than a pipe holds: the ringer never blocks
            assert ring(path) is True
        assert bell.wait(0) is True and bell.wait(0) is False  # heard all at once
    finally:
        bell.close()
    assert ring(path) is False  # nobody waits any more (ENXIO)
    again = Doorbell(path)  # a later waiter takes the FIFO that is there
    again.close()


def test_the_waiter_refuses_what_is_not_a_fifo(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(OSError):
        Doorbell(tmp_path / "file")
    os.symlink(tmp_path / "elsewhere", tmp_path / "link")
    with pytest.raises(OSError):
        Doorbell(tmp_path / "link")
    assert ring(tmp_path / "link") is False  # never follows a link
    with pytest.raises(FileNotFoundError):
        Doorbell(tmp_path / "gone" / "bell")
