"""The QEMU backend of the Hypervisor interface.

QEMU runs in a session of its own (it outlives a vmmd restart), stdin from /dev/null,
stdout and stderr into `qemu.stderr` in the VM's directory. `start` returns once QMP
answered; a QEMU that dies first is reported with the tail of its stderr and nothing is
left running. Every QMP exchange is a short session of its own (connect, negotiate,
execute, close), so a restarted vmmd needs nothing but the socket path to reach a VM.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import time
from pathlib import Path
from collections.abc import Callable, Collection

from hanabi_common.errors import (DeadlineExceeded, FailedPrecondition, HanabiError,
                                  InvalidArgument, NotFound, Unavailable)
from hanabi_vmmd import proc, qemu_snapshot, vmm_process
from hanabi_vmmd.vmm_process import stderr_tail
from hanabi_vmmd.hypervisor import Capabilities, DiskSpec, NicSpec, StopResult, VmFiles, VmHandle, VmSpec
from hanabi_vmmd.qemu_cmdline import build_argv, pick_slot
from hanabi_vmmd.qmp import QmpClient
from hanabi_vmmd.tap import open_tap

log = logging.getLogger("hanabi.vmmd.qemu")


class QemuHypervisor:
    """Boots and drives QEMU VMs."""

    name = "qemu"
    files = VmFiles(control_socket="qmp.sock", pid_file="qemu.pid", stderr_log="qemu.stderr")

    def __init__(self, *, binary: str = "qemu-system-x86_64", machine: str = "q35",
                 start_timeout: float = 60.0, qmp_timeout: float = 5.0,
                 hotplug_slots: int = 4, sandbox: bool = True, mem_merge: bool = False) -> None:
        self.binary = binary
        self.mem_merge = mem_merge  # guest RAM mergeable by KSM (vmm.ksm)
        self.machine = machine
        self.start_timeout = start_timeout
        self.qmp_timeout = qmp_timeout
        self.hotplug_slots = hotplug_slots
        self.sandbox = sandbox

    def capabilities(self) -> Capabilities:
        """Disks and NICs hot-plug (PCIe root ports), so it pools and clones templates
        (shared file-backed RAM; a clone's QEMU can be started ahead, a spare); the agent on
        virtio-serial; virtio-9p shares; qcow2 layers."""
        return Capabilities(hotplug=frozenset({"disk", "nic"}), pooling=True, templates=True, spares=True, vsock=None,
                            pause=True, snapshots=False, share="virtio-9p", share_servers=False,
                            disk_formats=("qcow2", "raw"),
                            guest_serial_from_path=False, files=self.files,
                            hotplug_slots=self.hotplug_slots if self.machine == "q35" else 0,
                            mergeable_memory=True)

    def problem(self) -> str | None:
        """None when the QEMU binary is there (KVM or not: TCG is the fallback, accel.py)."""
        return None if shutil.which(self.binary) else f"no {self.binary} on PATH"

    def guest_serial(self, handle: VmHandle, disk: DiskSpec) -> str:
        """The guest reads the serial it was given (virtio-blk serial=)."""
        return ""

    # -- lifecycle ---------------------------------------------------------------------

    def start(self, spec: VmSpec, on_spawned: Callable[[VmHandle], None] | None = None) -> VmHandle:
        """Spawn QEMU for `spec` and wait until QMP answers."""
        nic_fds: list[int] = []
        try:
            for nic in spec.nics:
                nic_fds.append(open_tap(nic.tap, nic.netns_path))
            try:
                argv = build_argv(spec, binary=self.binary, machine=self.machine, sandbox=self.sandbox,
                                  nic_fds=nic_fds, mem_merge=self.mem_merge)
            except ValueError as exc:
                raise InvalidArgument(str(exc)) from None
            spec.vm_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            for stale in (spec.agent_socket, spec.control_socket, spec.pid_file):
                stale.unlink(missing_ok=True)
            began = time.monotonic()
            process = vmm_process.spawn(argv, spec.vm_dir, spec.stderr_log, "QEMU", pass_fds=nic_fds)
        finally:
            for fd in nic_fds:  # QEMU holds its own copies now
                os.close(fd)
        handle = VmHandle(sandbox_id=spec.sandbox_id, hypervisor=self.name, pid=process.pid,
                          start_time=proc.start_time(process.pid) or 0,
                          control_socket=spec.control_socket, agent_socket=spec.agent_socket,
                          vm_dir=spec.vm_dir, machine=self.machine,
                          hotplug_slots=spec.hotplug_slots if self.machine == "q35" else 0,
                          process=process)
        try:
            if on_spawned is not None:
                on_spawned(handle)
            self._wait_qmp(handle, spec.stderr_log, began + self.start_timeout)
        except BaseException:
            vmm_process.kill_and_reap(handle)
            raise
        log.info("qemu running", extra={"sandbox": spec.sandbox_id, "pid": process.pid,
                                        "qmp_ready_ms": round((time.monotonic() - began) * 1000, 1)})
        return handle

    # -- VM templates (qemu_snapshot) --------------------------------------------------

    def save_template(self, handle: VmHandle, state_file: Path, memory_file: Path) -> int:
        """Stop a template VM and save its device state; bytes. Its RAM is `memory_file`
        already (the spec's, mapped shared), so only the devices are written."""
        return qemu_snapshot.save_state(handle.control_socket, state_file, self.start_timeout)

    def restore(self, spec: VmSpec, state_file: Path,
                on_spawned: Callable[[VmHandle], None] | None = None) -> VmHandle:
        """Start a clone (`spec.incoming`, its RAM the template's file mapped private), load
        the template's device state and let it run; on failure nothing is left running."""
        handle = self.start_clone_vmm(spec, on_spawned)
        self.load_clone(handle, spec, state_file)
        return handle

    def start_clone_vmm(self, spec: VmSpec, on_spawned: Callable[[VmHandle], None] | None = None) -> VmHandle:
        """A clone's QEMU, waiting for its device state (`-incoming defer`): `start` of a
        clone's spec, checked as one."""
        if not spec.incoming or spec.memory_file is None or spec.nics:
            raise InvalidArgument("a clone needs the template's memory file, -incoming and no boot NICs")
        return self.start(spec, on_spawned)

    def load_clone(self, handle: VmHandle, spec: VmSpec, state_file: Path) -> None:
        """Load a template's device state into a QEMU from `start_clone_vmm(spec)` and let it
        run; on failure the QEMU is killed and reaped, the error ends with its stderr."""
        try:
            qemu_snapshot.load_state(handle.control_socket, state_file, self.start_timeout)
        except BaseException as exc:
            vmm_process.kill_and_reap(handle)
            if isinstance(exc, HanabiError) and (tail := stderr_tail(spec.stderr_log)):
                exc.message = f"{exc.message} (QEMU: {tail[-500:]})"
            raise

    def _wait_qmp(self, handle: VmHandle, stderr_log: Path, deadline: float) -> None:
        assert handle.process is not None
        while True:
            code = handle.process.poll()
            if code is not None:
                tail = stderr_tail(stderr_log)
                raise Unavailable(
                    f"QEMU exited with status {proc.exit_status(code)} while starting: "
                    f"{tail or '(no output on stderr)'}",
                    details={"stderr": tail, "exit_status": proc.exit_status(code)})
            if handle.control_socket.exists():
                try:
                    with QmpClient(handle.control_socket, timeout=self.qmp_timeout) as qmp:
                        qmp.execute("query-status")
                    return
                except Unavailable:
                    pass
            if time.monotonic() >= deadline:
                raise DeadlineExceeded(
                    f"QEMU did not answer on QMP within {self.start_timeout:.0f}s: "
                    f"{stderr_tail(stderr_log) or '(no output on stderr)'}")
            time.sleep(0.01)

    def is_alive(self, handle: VmHandle) -> bool:
        """True while the QEMU process runs (same pid and start time, not a zombie)."""
        return vmm_process.is_alive(handle)

    def stop(self, handle: VmHandle, timeout: float) -> StopResult:
        """QMP `quit`, wait up to `timeout`, then SIGKILL; always reap our own child."""
        def quit_(seconds: float) -> None:
            with QmpClient(handle.control_socket, timeout=seconds) as qmp:
                qmp.execute("quit")

        return vmm_process.stop(handle, timeout, quit_, "qemu")

    # -- vCPUs -------------------------------------------------------------------------

    def _qmp(self, handle: VmHandle, timeout: float | None = None) -> QmpClient:
        return QmpClient(handle.control_socket, timeout=timeout or self.qmp_timeout)

    def pause(self, handle: VmHandle) -> None:
        """QMP `stop`: the vCPUs halt, the QEMU process stays."""
        with self._qmp(handle) as qmp:
            qmp.execute("stop")

    def resume(self, handle: VmHandle) -> None:
        """QMP `cont`."""
        with self._qmp(handle) as qmp:
            qmp.execute("cont")

    def query_paused(self, handle: VmHandle) -> bool | None:
        """True if the vCPUs are stopped, False if running, None if QMP does not answer."""
        try:
            with self._qmp(handle, timeout=2.0) as qmp:
                status = qmp.execute("query-status")
        except HanabiError:
            return None
        return not bool(status.get("running")) if isinstance(status, dict) else None

    # -- disks -------------------------------------------------------------------------

    def attach_disk(self, handle: VmHandle, disk: DiskSpec, busy_slots: Collection[str]) -> str:
        """blockdev-add the image, then device_add a virtio-blk-pci on a free root port."""
        machine = handle.machine or self.machine
        slot = pick_slot(machine, handle.hotplug_slots or self.hotplug_slots, busy_slots)
        if slot is None:
            raise FailedPrecondition(f"VM {handle.sandbox_id} has no free hot-plug slot "
                                     f"(all {handle.hotplug_slots} root ports are in use)")
        try:
            mode = os.stat(disk.path).st_mode
        except OSError as exc:
            raise InvalidArgument(f"disk {disk.path}: {exc.strerror}") from None
        file_node: dict = {"driver": "host_device" if stat.S_ISBLK(mode) else "file",
                           "filename": str(disk.path)}
        node: dict = {"driver": disk.format, "node-name": disk.node_name, "read-only": disk.readonly,
                      "file": file_node}
        if not disk.readonly:
            node["discard"] = "unmap"
        with self._qmp(handle) as qmp:
            qmp.execute("blockdev-add", node)
            try:
                qmp.execute("device_add", {"driver": "virtio-blk-pci", "id": disk.device_id,
                                           "drive": disk.node_name, "bus": slot, "serial": disk.serial})
            except HanabiError:
                try:
                    self._blockdev_del(qmp, disk.node_name)
                except HanabiError as exc:
                    log.warning("rollback of blockdev-add failed", extra={"error": exc.message})
                raise
        return slot

    def attach_nic(self, handle: VmHandle, nic: NicSpec, busy_slots: Collection[str]) -> str:
        """Pass the tap's fd (QMP getfd), netdev_add it, device_add a virtio-net-pci with
        the NIC's MAC on a free root port; undo the netdev if the device is refused."""
        machine = handle.machine or self.machine
        slot = pick_slot(machine, handle.hotplug_slots or self.hotplug_slots, busy_slots)
        if slot is None:
            raise FailedPrecondition(f"VM {handle.sandbox_id} has no free hot-plug slot for a NIC")
        fd = open_tap(nic.tap, nic.netns_path)
        netdev, fdname = f"{nic.device_id}-net", f"{nic.device_id}-fd"
        try:
            with self._qmp(handle) as qmp:
                qmp.execute_with_fd("getfd", {"fdname": fdname}, fd)
                try:
                    qmp.execute("netdev_add", {"type": "tap", "id": netdev, "fd": fdname, "vhost": False})
                except HanabiError:
                    qmp.execute("closefd", {"fdname": fdname})
                    raise
                try:
                    qmp.execute("device_add", {"driver": "virtio-net-pci", "id": nic.device_id, "netdev": netdev,
                                               "mac": nic.mac, "bus": slot, "romfile": ""})
                except HanabiError:
                    qmp.execute("netdev_del", {"id": netdev})
                    raise
        finally:
            os.close(fd)
        return slot

    def detach_disk(self, handle: VmHandle, disk: DiskSpec, timeout: float) -> None:
        """device_del, wait for DEVICE_DELETED (the guest lets go), then blockdev-del."""
        with self._qmp(handle) as qmp:
            self._unplug(qmp, handle, disk.device_id, timeout)
            self._blockdev_del(qmp, disk.node_name)

    def detach_nic(self, handle: VmHandle, nic: NicSpec, timeout: float) -> None:
        """device_del the NIC, wait until the guest let go, then netdev_del its tap backend."""
        with self._qmp(handle) as qmp:
            self._unplug(qmp, handle, nic.device_id, timeout)
            try:
                qmp.execute("netdev_del", {"id": f"{nic.device_id}-net"})
            except (NotFound, FailedPrecondition):
                pass  # gone already (or a boot NIC whose netdev QEMU removed with it)

    def _unplug(self, qmp: QmpClient, handle: VmHandle, device_id: str, timeout: float) -> None:
        """device_del and wait for DEVICE_DELETED; idempotent."""
        if not self._device_exists(qmp, device_id):
            return
        try:
            qmp.execute("device_del", {"id": device_id})
        except NotFound:
            pass
        except FailedPrecondition as exc:  # e.g. an unplug already in progress
            log.info("device_del refused, waiting anyway", extra={"error": exc.message})
        try:
            qmp.wait_event("DEVICE_DELETED", timeout, match=lambda data: data.get("device") == device_id)
        except DeadlineExceeded:
            if self._device_exists(qmp, device_id):
                raise DeadlineExceeded(f"the guest of {handle.sandbox_id} did not release {device_id} "
                                       f"within {timeout:.0f}s") from None

    @staticmethod
    def _device_exists(qmp: QmpClient, device_id: str) -> bool:
        children = qmp.execute("qom-list", {"path": "/machine/peripheral"})
        return any(isinstance(c, dict) and c.get("name") == device_id for c in children or [])

    @staticmethod
    def _blockdev_del(qmp: QmpClient, node_name: str) -> None:
        nodes = qmp.execute("query-named-block-nodes", {"flat": True})
        if any(isinstance(n, dict) and n.get("node-name") == node_name for n in nodes or []):
            qmp.execute("blockdev-del", {"node-name": node_name})
