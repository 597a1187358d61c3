"""The on-disk release queue (hanabi_common.releasing): a released sandbox's record moves out
of its directory at once, the worker finishes it (retrying what fails), `drain` waits for
it, and a process killed -9 in between leaves the record for the next one to finish."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from hanabi_common.errors import FailedPrecondition
from hanabi_common.releasing import Releases

log = logging.getLogger("test.releasing")


def _state_file(root: Path, sid: str, body: dict) -> Path:
    directory = root / "sbs" / sid
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "hypervisor.json"
    path.write_text(json.dumps(body))
    return path


def test_take_moves_the_record_and_the_worker_finishes_it(tmp_path):
    done: list[tuple[str, dict]] = []
    releases = Releases(tmp_path, "vmmd", lambda sid, rec: done.append((sid, json.loads(rec.read_text()))), log)
    releases.start()
    try:
        path = _state_file(tmp_path, "c1", {"pid": 7})
        record = releases.take(path, "c1")
        assert record == tmp_path / "releasing" / "vmmd" / "c1.json" and not path.exists()
        assert releases.take(path, "c1") is None  # nothing left to take: idempotent
        releases.wake()
        assert releases.drain(10) == []
        assert done == [("c1", {"pid": 7})] and not record.exists()
    finally:
        releases.close()


def test_a_failing_release_is_retried_until_it_succeeds_and_drain_waits(tmp_path):
    attempts: list[float] = []
    busy = threading.Event()
    busy.set()

    def finisher(sid: str, record: Path) -> None:
        attempts.append(time.monotonic())
        if busy.is_set():
            raise FailedPrecondition("volume still attached")

    releases = Releases(tmp_path, "blockd", finisher, log)
    releases.start()
    try:
        releases.take(_state_file(tmp_path, "c2", {}), "c2")
        releases.wake()
        assert releases.drain(0.5) == ["c2"]  # still failing: drain says what is left
        assert len(attempts) >= 2
        busy.clear()
        assert releases.drain(10) == []
    finally:
        releases.close()


def test_finish_of_a_reused_id_runs_now_and_raises_its_error(tmp_path):
    calls: list[str] = []

    def finisher(sid: str, record: Path) -> None:
        calls.append(sid)
        if len(calls) == 1:
            raise FailedPrecondition("busy")

    releases = Releases(tmp_path, "netd", finisher, log)  # no worker: only finish() runs it
    releases.take(_state_file(tmp_path, "c3", {}), "c3")
    with pytest.raises(FailedPrecondition):
        releases.finish("c3")
    assert releases.pending() == ["c3"]
    assert releases.finish("c3") and releases.pending() == [] and not releases.finish("c3")


_WORKER = textwrap.dedent("""
    import logging, sys, time
    from pathlib import Path
    from hanabi_common.releasing import Releases
    root = Path(sys.argv[1])
    def finisher(sid, record):
        Path(root, "started").write_text(sid)
        time.sleep(600)  # a release that never ends here: the test kills us -9 during it
    releases = Releases(root, "vmmd", finisher, logging.getLogger("w"))
    state = root / "sbs" / "c4" / "hypervisor.json"
    releases.take(state, "c4")
    releases.start()
    releases.wake()
    time.sleep(600)
""")


def test_a_process_killed_in_the_middle_leaves_the_record_for_the_next_start(tmp_path):
    _state_file(tmp_path, "c4", {"pid": 1})
    worker = subprocess.Popen([sys.executable, "-c", _WORKER, str(tmp_path)])
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "started").exists():
            assert worker.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait(10)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    assert not (tmp_path / "sbs" / "c4" / "hypervisor.json").exists()
    finished: list[str] = []
    again = Releases(tmp_path, "vmmd", lambda sid, rec: finished.append(json.loads(rec.read_text())["pid"]), log)
    assert again.pending() == ["c4"]
    assert again.finish_all() == ["c4"] and finished == [1] and again.pending() == []
