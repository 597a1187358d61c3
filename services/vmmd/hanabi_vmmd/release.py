"""vmmd's half of a container's delete, off the critical path (hanabi_common.releasing).

`vm.release` (the RPC) moves `hypervisor.json` into vmmd's release queue, SIGKILLs the VMM
(no clean shutdown: the container has exited or is being force-deleted, and the guest holds
nothing that must reach the host) and reaps it: when it returns the VM cannot run any more and
is no longer in the container's cgroups. A Firecracker VM's 9P servers go at once too (they
hold the export that blockd unmounts). What is slower (the backend's own cleanup, the VM's
directory, the share root) is `finish`, run by the queue's worker, or at vmmd's next start
when vmmd died in between (it then also kills a VMM still running from the record).
"""

from __future__ import annotations

import logging
from pathlib import Path
from collections.abc import Callable, Mapping

from hanabi_vmmd import vmm_process
from hanabi_vmmd.hypervisor import Hypervisor, VmHandle
from hanabi_vmmd.share_server import stop_servers
from hanabi_vmmd.state import HypervisorState

log = logging.getLogger("hanabi.vmmd")


def kill_now(state: HypervisorState, handle: VmHandle, share_servers: bool) -> int | None:
    """SIGKILL the VMM (if it still is the same process) and reap it; its exit status when
    this vmmd is its parent. With `share_servers` (the backend's capability: a Firecracker
    VM's share is served by diod processes, QEMU serves it itself) those are ended too."""
    status = None
    if vmm_process.is_alive(handle):
        status = vmm_process.kill_and_reap(handle)
    elif handle.process is not None:
        status = handle.process.wait()
    if state.share_dir and share_servers:
        stop_servers(Path(state.share_dir))
    return status


def finish(record: Path, backends: Mapping[str, Hypervisor],
           remove_dirs: Callable[[HypervisorState], None]) -> None:
    """The slow part of one released VM, from its record: kill what still runs (a vmmd that
    died between the record and the kill), the backend's own cleanup, the directories."""
    state = HypervisorState.model_validate_json(record.read_bytes())
    handle = state.handle()
    if vmm_process.is_alive(handle):
        log.warning("killing the VMM of a released VM", extra={"sandbox": state.sandbox_id, "pid": state.pid})
        vmm_process.kill_and_reap(handle)
    backend = backends.get(state.hypervisor)
    if backend is not None:
        backend.stop(handle, 0.1)  # the process is gone: only the backend's own cleanup runs
    remove_dirs(state)
