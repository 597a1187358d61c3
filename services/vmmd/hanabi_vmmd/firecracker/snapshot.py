"""Firecracker's snapshots as VM templates (pure: the request sequences, no I/O).

Template: a booted VM at agent-ready is paused (`PATCH /vm` Paused) and saved with a full
snapshot (`PUT /snapshot/create`: the microVM state and the guest memory, two files).

Clone: a fresh Firecracker process, unconfigured; logger and metrics first (pre-boot
requests), then `PUT /snapshot/load` with the memory as a File backend (Firecracker maps it
MAP_PRIVATE: clones share the template's pages through the page cache) and the clone's own
vsock socket (`vsock_override`: its agent and 9P share), not resumed yet. Before the vCPUs
run, every placeholder drive is pointed at the clone's own empty placeholder file (`PATCH
/drives/phN`, allowed once the VM is loaded; the snapshot names the template's, which would
otherwise be shared by every clone), then `PATCH /vm` Resumed. The template's placeholder
files must still exist at load (Firecracker reopens the snapshot's drives before the swap), so
a template's live at a path that outlives its build (`VmSpec.drive_dir`).

No NICs: v1.16.1's `network_overrides` replace only an interface's tap (`host_dev_name`), and
`PATCH /network-interfaces` only its rate limiters, so a clone's NIC would keep the template's
guest MAC. hanabi's guest finds its NICs by MAC, the MAC of the container's own interface
(netd mirrors that interface to the tap), which no template can know: a Firecracker VM with
NICs boots cold, and one without gets none later (Firecracker has no NIC hot-plug).
"""

from __future__ import annotations

from dataclasses import dataclass

from hanabi_common.errors import InvalidArgument
from hanabi_vmmd.firecracker import models as m
from hanabi_vmmd.firecracker.boot import Step, observability_steps, swap_placeholder

NO_NIC_CLONES = ("a Firecracker clone cannot take a NIC: its snapshot fixes the guest MAC "
                 "(snapshot/load's network_overrides replace only the tap); VMs with NICs boot cold")


def snapshot_sequence(state_path: str, memory_path: str) -> list[Step]:
    """Pause the VM and write a full snapshot (state and memory)."""
    return [("PATCH", "/vm", m.Vm(state="Paused")),
            ("PUT", "/snapshot/create", m.SnapshotCreateParams(
                snapshot_path=state_path, mem_file_path=memory_path, snapshot_type="Full"))]


@dataclass(frozen=True)
class FcRestoreSpec:
    """What a clone needs from Firecracker's API: the template's files, its own sockets,
    placeholders and tap."""

    state_path: str
    memory_path: str
    vsock_uds_path: str
    placeholders: tuple[str, ...]        # the clone's own ph0.img.. in placeholder order
    log_path: str | None = None
    log_level: m.LogLevel = "Info"
    metrics_path: str | None = None


def restore_sequence(spec: FcRestoreSpec) -> list[Step]:
    """(method, path, body) that turn an unconfigured Firecracker into a running clone."""
    if not spec.state_path or not spec.memory_path:
        raise InvalidArgument("a clone needs the template's state and memory files")
    steps = observability_steps(spec.log_path, spec.log_level, spec.metrics_path)
    steps.append(("PUT", "/snapshot/load", m.SnapshotLoadParams(
        snapshot_path=spec.state_path,
        mem_backend=m.MemoryBackend(backend_type="File", backend_path=spec.memory_path),
        resume_vm=False,
        vsock_override=m.VsockOverride(uds_path=spec.vsock_uds_path))))
    steps += [swap_placeholder(index, path) for index, path in enumerate(spec.placeholders)]
    steps.append(("PATCH", "/vm", m.Vm(state="Resumed")))
    return steps
