"""What a (re)starting vmmd does before serving: find its VMs again, leave nothing behind.

Every `hypervisor.json` is read back. A VM whose pid is alive with the recorded start
time is re-adopted (its paused/running state is asked over the control socket); one that
is gone is marked `stopped` (its exit status is unknown: vmmd was not around to reap it).
VM directories that no state file refers to are leftovers of a crash in the middle of
`vm.create` or `vm.stop`: a VMM still running from one of them is killed, then the
directory is removed.
"""

from __future__ import annotations

import logging
import shutil
import signal
from pathlib import Path
from collections.abc import Mapping, Sequence

from hanabi_common.errors import HanabiError
from hanabi_common.state import StateStore
from hanabi_vmmd import proc
from hanabi_vmmd.hypervisor import Hypervisor, VmHandle
from hanabi_common.locks import KeyedLocks
from hanabi_vmmd.state import STATE_NAME, HypervisorState, vm_dir_for

log = logging.getLogger("hanabi.vmmd")


def recover(stores: Sequence[StateStore], backends: Mapping[str, Hypervisor], vm_root: Path,
            locks: KeyedLocks) -> list[VmHandle]:
    """Re-adopt live VMs of every store (sandboxes first, then the warm pool's), mark dead
    ones stopped, clean orphans; return handles to watch.

    A VM recorded twice (vmmd died while handing a pooled VM to a sandbox) belongs to the
    sandbox: the later store's record is dropped.
    """
    handles: list[VmHandle] = []
    referenced: set[Path] = set()
    seen: set[tuple[int, int]] = set()
    for store in stores:
        for sid in store.list_sandboxes(having=STATE_NAME):
            referenced.add(vm_dir_for(vm_root.parent, sid))
            try:
                state = store.read(sid, STATE_NAME, HypervisorState)
            except HanabiError as exc:
                log.error("unreadable state file, leaving it alone", extra={"sandbox": sid, "error": exc.message})
                continue
            if state is None:
                continue
            if (state.pid, state.start_time) in seen:
                log.warning("vm recorded twice, keeping the first record", extra={"sandbox": sid, "pid": state.pid})
                store.purge(sid)
                continue
            seen.add((state.pid, state.start_time))
            referenced.add(Path(state.vm_dir))
            with locks.hold(sid):
                handle = adopt(store, backends, state)
            if handle is not None:
                handles.append(handle)
    clean_orphans(vm_root, referenced)
    if handles:
        log.info("re-adopted running vms", extra={"count": len(handles)})
    return handles


def adopt(store: StateStore, backends: Mapping[str, Hypervisor], state: HypervisorState) -> VmHandle | None:
    """Re-adopt one VM if it still runs (returns its handle), else record it as stopped."""
    if state.state == "stopped":
        return None
    backend = backends.get(state.hypervisor)
    if backend is None:
        log.error("vm uses a hypervisor this vmmd lacks", extra={"sandbox": state.sandbox_id,
                                                                  "hypervisor": state.hypervisor})
        return None
    handle = state.handle()
    if not backend.is_alive(handle):
        state.state, state.exit_status = "stopped", None
        store.write(state.sandbox_id, STATE_NAME, state)
        log.warning("vm exited while vmmd was down", extra={"sandbox": state.sandbox_id, "pid": state.pid})
        return None
    paused = backend.query_paused(handle)
    observed = state.state if paused is None else ("paused" if paused else "running")
    if observed != state.state:
        state.state = observed
        store.write(state.sandbox_id, STATE_NAME, state)
    log.info("re-adopted vm", extra={"sandbox": state.sandbox_id, "pid": state.pid, "state": observed})
    return handle


def clean_orphans(vm_root: Path, referenced: set[Path]) -> None:
    """Kill VMMs running from unreferenced VM directories, then remove those directories."""
    if not vm_root.is_dir():
        return
    for entry in vm_root.iterdir():
        if entry in referenced or not entry.is_dir():
            continue
        pid = next((p for p in map(_pid_from, sorted(entry.glob("*.pid"))) if p is not None), None)
        if pid is not None and any(str(entry) in arg for arg in proc.cmdline(pid)):
            started = proc.start_time(pid)
            if proc.kill_verified(pid, started, signal.SIGKILL):
                proc.wait_gone(pid, started, 5.0)
                log.warning("killed an orphaned vmm", extra={"pid": pid, "vm_dir": str(entry)})
        shutil.rmtree(entry, ignore_errors=True)
        log.info("removed an orphaned vm directory", extra={"vm_dir": str(entry)})


def _pid_from(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
