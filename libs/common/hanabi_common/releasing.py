"""Teardown off the critical path: a daemon's on-disk queue of released sandboxes.

`delete` must return as soon as the container can no longer run and what it held is
accounted for. So a daemon's release RPC only does what makes the container unable to run
(vmmd SIGKILLs the VMM) and *moves* the sandbox's state file into this queue, one atomic
rename: `<run_dir>/releasing/<daemon>/<sandbox id>.json`. From then on the sandbox's
directory no longer names the daemon's part (the runtime removes the directory at once, and a
new container may take the same id), but the record still says what is to be removed. A
thread of the daemon works the queue off (unplugging, unmounting, removing taps and
namespaces, files), retrying what fails with a backoff; the record goes when its work is
done. A daemon killed in between finds the records at its next start and finishes them
before it serves (`finish_all`), so a crash leaves nothing behind.

A sandbox id is taken again only after its earlier release finished: the daemon calls
`finish(sid)` before it makes anything for `sid` (the resources are named after the id).
`drain(timeout)` waits until the queue is empty (tests, `ctl drain`).

Locking: the worker holds this queue's lock only while it finishes one record, and the
`finish` callback must not take the daemon's per-sandbox locks (a create holding one
may be waiting here).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from collections.abc import Callable

from hanabi_common.errors import HanabiError
from hanabi_common.ids import is_valid_id
from hanabi_common.rpc.context import after_reply

RELEASING_DIR = "releasing"
FIRST_RETRY_S = 0.2
MAX_RETRY_S = 5.0
Finisher = Callable[[str, Path], None]  # (sandbox id, record path): the slow part; raises on failure


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Releases:
    """One daemon's queue of released sandboxes and the thread that finishes them."""

    def __init__(self, run_dir: Path, daemon: str, finisher: Finisher, log: logging.Logger) -> None:
        self.dir = Path(run_dir) / RELEASING_DIR / daemon
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._finisher = finisher
        self._log = log
        self._lock = threading.Lock()  # held while one record is being finished
        self._cond = threading.Condition()  # wakes the worker and the drainers
        self._retry_at: dict[str, float] = {}
        self._failures: dict[str, int] = {}
        self._closed = False
        self._thread: threading.Thread | None = None

    # -- the RPC's half ------------------------------------------------------------------
    def record_path(self, sid: str) -> Path:
        """Where the record of a released sandbox lives."""
        return self.dir / f"{sid}.json"

    def take(self, state_file: Path, sid: str) -> Path | None:
        """Move the sandbox's state file into the queue (atomic rename, durable); the
        record's path, or None when there was no state file. A record left from an earlier
        release of the same id is finished first."""
        record = self.record_path(sid)
        if record.exists():
            self.finish(sid)
        try:
            os.rename(state_file, record)
        except FileNotFoundError:
            return None
        _fsync_dir(self.dir)
        _fsync_dir(state_file.parent)
        return record

    def wake(self) -> None:
        """Tell the worker there is work: once the reply of the release RPC being served
        is sent (at once outside one), since the worker, started earlier, held the GIL the
        reply needed for 1-3 ms of each release call (`rpc.context.after_reply`)."""
        after_reply(self._notify)

    def _notify(self) -> None:
        with self._cond:
            self._cond.notify_all()

    # -- finishing -----------------------------------------------------------------------
    def pending(self) -> list[str]:
        """The sandboxes whose release is not finished yet."""
        try:
            names = sorted(os.listdir(self.dir))
        except FileNotFoundError:
            return []
        return [n[:-5] for n in names if n.endswith(".json") and is_valid_id(n[:-5])]

    def finish(self, sid: str) -> bool:
        """Finish the release of `sid` now, if one is pending (raises what the finisher
        raises; the record then stays for the worker). True when one was finished."""
        with self._lock:
            record = self.record_path(sid)
            if not record.exists():
                return False
            self._finisher(sid, record)
            record.unlink(missing_ok=True)
            self._retry_at.pop(sid, None)
            self._failures.pop(sid, None)
        with self._cond:
            self._cond.notify_all()
        return True

    def _try(self, sid: str) -> bool:
        try:
            done = self.finish(sid)
        except (HanabiError, OSError) as exc:
            count = self._failures.get(sid, 0) + 1
            self._failures[sid] = count
            delay = min(FIRST_RETRY_S * 2 ** (count - 1), MAX_RETRY_S)
            self._retry_at[sid] = time.monotonic() + delay
            if count == 1 or count % 10 == 0:
                message = exc.message if isinstance(exc, HanabiError) else str(exc)
                self._log.warning("release not finished yet, will retry", extra={
                    "sandbox": sid, "attempt": count, "retry_s": round(delay, 2), "error": message})
            return False
        except Exception:  # noqa: BLE001 - a bug in one release must not stop the others
            self._log.exception("release failed", extra={"sandbox": sid})
            self._retry_at[sid] = time.monotonic() + MAX_RETRY_S
            return False
        if done:
            self._log.info("release finished", extra={"sandbox": sid})
        return done

    def finish_all(self) -> list[str]:
        """Finish every pending release now (a daemon's start: what a crash interrupted);
        the ones that fail stay for the worker. Returns those finished."""
        return [sid for sid in self.pending() if self._try(sid)]

    def start(self) -> None:
        """Start the worker thread."""
        self._thread = threading.Thread(target=self._run, name=f"{self.dir.name}-releases", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            with self._cond:
                if self._closed:
                    return
                now = time.monotonic()
                due = [sid for sid in self.pending() if self._retry_at.get(sid, 0.0) <= now]
                if not due:
                    waits = [t - now for t in self._retry_at.values()]
                    self._cond.wait(timeout=max(min(waits), 0.01) if waits else 5.0)
                    continue
            for sid in due:
                self._try(sid)

    def drain(self, timeout: float) -> list[str]:
        """Wait up to `timeout` until nothing is pending (failed ones are retried at once);
        the sandboxes still pending then (empty: drained)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._retry_at.clear()
            self._cond.notify_all()
            while True:
                left = self.pending()
                remaining = deadline - time.monotonic()
                if not left or remaining <= 0 or self._closed:
                    return left
                self._cond.wait(timeout=min(remaining, 0.05))

    def close(self) -> None:
        """Stop the worker (records stay on disk for the next start)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(10)
