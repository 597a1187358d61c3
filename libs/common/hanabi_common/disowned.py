"""Sandboxes whose container was deleted while one of its daemons was down.

`hanabi-runtime delete` asks each daemon to remove its part (agentd, vmmd, blockd, netd).
When a daemon cannot be reached, the runtime still removes the container: it removes its
own files, leaves the state file of each daemon it could not reach, and writes
`disowned.json` (this module's `Disowned`) beside them. Each daemon, when it starts, finds
the sandboxes it still has a state file for that are disowned, removes its part (the
same teardown as its RPC), removes its state file and logs it; the last one removes the
marker and the directory. A later `delete --force` of the same id does all of it at once.

`plan` is the pure part (which sandboxes to tear down, which directories are finished);
`reconcile` runs it against a `StateStore`. The runtime's half (`disown`, the marker) is in
`hanabi_common.marker`, in the standard library only, for the lean CLI's `delete`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from collections.abc import Callable, Mapping

from hanabi_common import marker
from hanabi_common.errors import HanabiError
from hanabi_common.marker import DAEMON_STATE_NAMES, DISOWNED_NAME
from hanabi_common.state import StateStore, VersionedState

__all__ = ["DAEMON_STATE_NAMES", "DISOWNED_NAME", "Disowned", "Plan", "disown", "finish", "mark", "plan",
           "reconcile"]


class Disowned(VersionedState):
    """The marker the runtime leaves: which container, when, and who still has to clean."""

    container_id: str
    deleted_at: float
    pending: list[str]


@dataclass(frozen=True)
class Plan:
    """What one daemon does at start: tear these sandboxes down, then remove these dirs."""

    teardown: list[str]
    finished: list[str]


def plan(listing: Mapping[str, set[str]], state_name: str) -> Plan:
    """From `{sandbox id: file names in its directory}`, for the daemon whose state file
    is `<state_name>.json`: the disowned sandboxes it still has a file in, and the
    directories that hold nothing but the marker (temp files aside)."""
    marker = f"{DISOWNED_NAME}.json"
    own = f"{state_name}.json"
    teardown, finished = [], []
    for sid, files in sorted(listing.items()):
        if marker not in files:
            continue
        if own in files:
            teardown.append(sid)
        elif not {f for f in files if not f.startswith(".")} - {marker}:
            finished.append(sid)
    return Plan(teardown, finished)


def mark(store: StateStore, sandbox_id: str, pending: list[str]) -> None:
    """Write the marker for a sandbox whose daemons in `pending` could not be reached."""
    marker.mark(str(store.sandbox_dir(sandbox_id)), sandbox_id, pending)


def disown(store: StateStore, sandbox_id: str, pending: list[str]) -> bool:
    """The runtime's half (`hanabi_common.marker.disown`) on a `StateStore`."""
    return marker.disown(str(store.root), store.sandbox_dir(sandbox_id).name, pending)


def _listing(store: StateStore) -> dict[str, set[str]]:
    listing = {}
    for sid in store.list_sandboxes(having=DISOWNED_NAME):
        try:
            listing[sid] = set(os.listdir(store.sandbox_dir(sid)))
        except OSError:
            continue
    return listing


def finish(store: StateStore, sandbox_id: str, state_name: str) -> bool:
    """Remove this daemon's file of a disowned sandbox; remove the marker and the directory
    when nothing else is left. True when the directory is gone."""
    store.path(sandbox_id, state_name).unlink(missing_ok=True)
    left = plan(_listing(store), state_name)
    if sandbox_id in left.finished:
        store.path(sandbox_id, DISOWNED_NAME).unlink(missing_ok=True)
        return store.remove_dir_if_empty(sandbox_id)
    return False


def reconcile(store: StateStore, state_name: str, teardown: Callable[[str], object],
              log: logging.Logger) -> list[str]:
    """At a daemon's start: tear down its part of every disowned sandbox (logged), and
    remove finished directories. Returns the sandboxes torn down. A teardown that fails
    is logged and left for the next start (or `delete --force`)."""
    todo = plan(_listing(store), state_name)
    done = []
    for sid in todo.teardown:
        try:
            teardown(sid)
        except HanabiError as exc:
            log.error("could not remove what a deleted container left", extra={
                "sandbox": sid, "error": exc.message})
            continue
        finish(store, sid, state_name)
        done.append(sid)
        log.warning("removed what a container deleted while this daemon was down left",
                    extra={"sandbox": sid})
    for sid in todo.finished:
        finish(store, sid, state_name)
    return done
