"""The Firecracker backend of the Hypervisor interface.

One `firecracker --api-sock` process per VM (optionally through `jailer`), in a session of
its own so it outlives a vmmd restart, stdin from /dev/null, stdout and stderr (the guest's
serial console included) into the VM's stderr log. `start` waits for the API socket (with
a deadline), configures the VM with `boot.boot_sequence` (kernel = the image's ELF
vmlinux, initrd, cmdline with the agent on vsock, machine-config from the VmSpec, logger,
metrics, hybrid vsock on `fc-vsock.sock`, placeholder drives ph0.., the boot NICs) and
sends InstanceStart. Any failure kills and reaps the process: nothing is left running.

Firecracker has no hotplug: disks arrive by swapping a placeholder drive's backing file
(`PATCH /drives/phN`), so the hot-plug slots are the placeholder names; detaching swaps the
empty placeholder file back. NICs only come at boot (`attach_nic` is FailedPrecondition).
The guest finds a swapped disk by its virtio-blk serial, which Firecracker derives from the
backing file (`guest_serial`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import stat
import time
from pathlib import Path
from collections.abc import Callable, Collection

from hanabi_common.errors import (DeadlineExceeded, FailedPrecondition, HanabiError,
                                  InvalidArgument, Unavailable)
from hanabi_vmmd import proc, vmm_process
from hanabi_vmmd.vmm_process import stderr_tail
from hanabi_vmmd.firecracker import boot, snapshot
from hanabi_vmmd.firecracker.api import FirecrackerApi
from hanabi_vmmd.firecracker.models import LogLevel
from hanabi_vmmd.share_server import ShareServer, diod_path, listen_path
from hanabi_vmmd.firecracker.process import (AGENT_VSOCK_PORT, API_SOCK_NAME, LOG_NAME, METRICS_NAME, JailerConfig,
                                             Layout, firecracker_argv, jail_id, jailer_argv,
                                             kernel_args, layout_for, nics_netns)
from hanabi_vmmd.firecracker.serial import guest_serial
from hanabi_vmmd.firecracker.version import VersionCheck, probe_version
from hanabi_vmmd.hypervisor import Capabilities, DiskSpec, NicSpec, StopResult, VmFiles, VmHandle, VmSpec

log = logging.getLogger("hanabi.vmmd.firecracker")
DIED_GRACE_S = 1.0  # how long a dropped API connection may take to show as an exit
ELF_MAGIC = b"\x7fELF"
MACHINE = "firecracker"
SLOTS_FILE = "placeholders.json"


def fail_vm(handle: VmHandle, reason: str) -> None:
    """End a VM that cannot go on (its file share's server died: every file operation of its
    container fails with EIO). SIGKILL only; vmmd's reaper records the exit, so the sandbox
    reads as stopped and its processes as killed (137), as when a QEMU dies with its 9P
    server."""
    log.error("failing the sandbox: ending its VM", extra={"sandbox": handle.sandbox_id, "pid": handle.pid,
                                                         "reason": reason})
    proc.kill_verified(handle.pid, handle.start_time or None, signal.SIGKILL)


def check_kernel(path: Path) -> None:
    """Firecracker on x86_64 boots an uncompressed ELF vmlinux only; say so before it does."""
    try:
        with open(path, "rb") as handle:
            magic = handle.read(4)
    except OSError as exc:
        raise FailedPrecondition(f"guest kernel {path}: {exc.strerror or exc}") from None
    if magic != ELF_MAGIC:
        raise FailedPrecondition(f"guest kernel {path} is not an ELF vmlinux (Firecracker boots no "
                                 "bzImage); rebuild the guest image with `hanabi-image build`")


class FirecrackerHypervisor:
    """Boots and drives Firecracker VMs."""

    name = "firecracker"
    machine = ""  # one machine model
    files = VmFiles(control_socket=API_SOCK_NAME, pid_file="firecracker.pid", stderr_log="firecracker.stderr")

    def __init__(self, *, binary: str = "firecracker", jailer: JailerConfig | None = None,
                 start_timeout: float = 60.0, api_timeout: float = 5.0,
                 placeholder_drives: int = 4, log_level: LogLevel = "Info",
                 version: VersionCheck | None = None, diod: str = "diod") -> None:
        self.binary = binary
        # No shared-filesystem device: the share is 9P over vsock, served by diod (where it is
        # installed; without it a VM gets no share and its binds travel as copies).
        self.diod = diod_path(diod)
        self._shares: dict[str, ShareServer] = {}
        self.jailer = jailer
        self.start_timeout = start_timeout
        self.api_timeout = api_timeout
        self.placeholder_drives = placeholder_drives
        self.log_level = log_level
        self._version = version

    def capabilities(self) -> Capabilities:
        """No NIC hot-plug (NICs at boot only), so no warm pool; disks swap into placeholder
        drives; hybrid vsock; snapshots, and templates from them and spare clone VMMs (not
        under the jailer); the share is 9P over vsock where diod is installed; raw disks
        only, whose guest serial comes from the file."""
        return Capabilities(hotplug=frozenset({"disk"}), pooling=False, templates=self.jailer is None,
                            spares=self.jailer is None,
                            vsock="hybrid", pause=True, snapshots=True, share="9p-vsock" if self.diod else None,
                            share_servers=True, disk_formats=("raw",), guest_serial_from_path=True,
                            files=self.files, hotplug_slots=self.placeholder_drives)

    def problem(self) -> str | None:
        """Why Firecracker cannot run here (no binary, or older than the floor), or None."""
        return self.version_check().problem

    # -- availability ------------------------------------------------------------------

    def version_check(self) -> VersionCheck:
        """`firecracker --version`, probed once per backend object."""
        if self._version is None:
            self._version = probe_version(self.binary)
        return self._version

    def _require_binary(self) -> str:
        check = self.version_check()
        if not check.ok or check.path is None:
            raise FailedPrecondition(f"cannot use Firecracker: {check.problem}",
                                     details={"binary": self.binary})
        return check.path

    # -- lifecycle ---------------------------------------------------------------------

    def start(self, spec: VmSpec, on_spawned: Callable[[VmHandle], None] | None = None) -> VmHandle:
        """Spawn Firecracker, wait for its API socket, configure the VM and start it."""
        exec_file = self._require_binary()
        check_kernel(spec.kernel)
        nics_netns([nic.netns_path for nic in spec.nics])  # one namespace for all taps
        if len(spec.nics) > 1:
            raise InvalidArgument("hanabi gives a Firecracker VM at most one boot NIC")
        layout = layout_for(spec.vm_dir, exec_file, self.jailer)
        steps = boot.boot_sequence(self._boot_spec(spec, layout))  # bad specs fail before spawning
        return self._launch(spec, exec_file, layout, steps, on_spawned)

    # -- VM templates (snapshot.py) ----------------------------------------------------

    def save_template(self, handle: VmHandle, state_file: Path, memory_file: Path) -> int:
        """Pause a template VM and write a full snapshot: its state and its memory; the
        state's size in bytes."""
        self._no_jailer_for_templates()
        with self._api(handle, timeout=self.start_timeout) as api:
            api.replay(snapshot.snapshot_sequence(str(state_file), str(memory_file)))
        return state_file.stat().st_size

    def restore(self, spec: VmSpec, state_file: Path,
                on_spawned: Callable[[VmHandle], None] | None = None) -> VmHandle:
        """Start a clone of a template: a fresh Firecracker loads the snapshot (memory
        `spec.memory_file`, mapped private), gets its own vsock socket and placeholder files,
        then resumes. No NICs (see snapshot.py: the snapshot fixes the guest's MAC). On
        failure nothing is left running."""
        handle = self.start_clone_vmm(spec, on_spawned)
        self.load_clone(handle, spec, state_file)
        return handle

    def start_clone_vmm(self, spec: VmSpec, on_spawned: Callable[[VmHandle], None] | None = None) -> VmHandle:
        """A clone's Firecracker, its API answering, nothing configured yet (a snapshot load
        must come first)."""
        exec_file = self._require_binary()
        self._no_jailer_for_templates()
        if spec.memory_file is None:
            raise InvalidArgument("a clone needs the template's memory file")
        if spec.nics:
            raise FailedPrecondition(snapshot.NO_NIC_CLONES)
        return self._launch(spec, exec_file, layout_for(spec.vm_dir, exec_file, self.jailer), [], on_spawned)

    def load_clone(self, handle: VmHandle, spec: VmSpec, state_file: Path) -> None:
        """Load the template's snapshot into a Firecracker from `start_clone_vmm(spec)`, point
        its placeholders at the clone's own files and resume it; on failure it is killed."""
        layout = layout_for(spec.vm_dir, self._require_binary(), self.jailer)
        try:
            steps = snapshot.restore_sequence(snapshot.FcRestoreSpec(
                state_path=str(state_file), memory_path=str(spec.memory_file),
                vsock_uds_path=layout.fc(layout.vsock_socket.name),
                placeholders=tuple(layout.fc(f"{boot.placeholder_id(i)}.img") for i in range(self.placeholder_drives)),
                log_path=layout.fc(LOG_NAME), log_level=self.log_level,
                metrics_path=layout.fc(METRICS_NAME)))
            self._send_steps(handle, spec, layout, steps, time.monotonic() + self.start_timeout)
        except BaseException as exc:
            self._abort(handle, spec, layout, exc)
            raise

    def _no_jailer_for_templates(self) -> None:
        if self.jailer is not None:
            raise FailedPrecondition("VM templates do not work under Firecracker's jailer yet "
                                     "(the snapshot files would have to be inside every jail)")

    def _launch(self, spec: VmSpec, exec_file: str, layout: Layout, steps: list,
                on_spawned: Callable[[VmHandle], None] | None) -> VmHandle:
        """Spawn Firecracker for `spec`, wait for its API socket, send `steps`; on failure
        kill and reap it (nothing is left running)."""
        netns = nics_netns([nic.netns_path for nic in spec.nics])
        instance = jail_id(spec.vm_dir)
        if self.jailer is not None:
            argv = jailer_argv(self.jailer, exec_file, instance, netns)
            preexec = None
        else:
            argv = firecracker_argv(exec_file, layout, instance)
            preexec = _netns_preexec(netns)
        spec.vm_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if layout.jail_dir is not None:
            shutil.rmtree(layout.jail_dir, ignore_errors=True)  # the jailer wants a fresh one
        for stale in (layout.api_socket, layout.vsock_socket, spec.pid_file):
            stale.unlink(missing_ok=True)
        if spec.share_dir is not None and self.diod:  # listening before the guest can connect
            share = ShareServer(listen_path(layout.vsock_socket), spec.share_dir, self.diod,
                                spec.vm_dir / "diod.log")
            share.start()
            self._shares[str(spec.vm_dir)] = share
        began = time.monotonic()
        process = vmm_process.spawn(argv, spec.vm_dir, spec.stderr_log, "Firecracker", preexec_fn=preexec)
        handle = VmHandle(sandbox_id=spec.sandbox_id, hypervisor=self.name, pid=process.pid,
                          start_time=proc.start_time(process.pid) or 0,
                          control_socket=layout.api_socket, agent_socket=layout.vsock_socket,
                          vm_dir=spec.vm_dir, machine=MACHINE, hotplug_slots=self.placeholder_drives,
                          agent_transport="hybrid_vsock", agent_port=AGENT_VSOCK_PORT, process=process)
        served = self._shares.get(str(spec.vm_dir))
        if served is not None:
            served.on_failure = lambda reason: fail_vm(handle, reason)
        try:
            spec.pid_file.write_text(f"{process.pid}\n")  # recovery's orphan sweep reads it
            if on_spawned is not None:
                on_spawned(handle)
            self._wait_socket(handle, spec.stderr_log, began + self.start_timeout)
            socket_ms = (time.monotonic() - began) * 1000
            self._stage(spec, layout)
            self._send_steps(handle, spec, layout, steps, began + self.start_timeout)
        except BaseException as exc:
            self._abort(handle, spec, layout, exc)
            raise
        log.info("firecracker running", extra={
            "sandbox": spec.sandbox_id, "pid": process.pid, "api_socket_ms": round(socket_ms, 1),
            "instance_start_ms": round((time.monotonic() - began) * 1000, 1)})
        return handle

    def _send_steps(self, handle: VmHandle, spec: VmSpec, layout: Layout, steps: list, deadline: float) -> None:
        """Send API `steps` in order, each checked against a Firecracker that died."""
        if not steps:
            return
        with FirecrackerApi(str(layout.api_socket), timeout=self.api_timeout) as api:
            for method, path, body in steps:
                self._check_running(handle, spec.stderr_log)
                try:  # InstanceStart loads the kernel: allow what is left of the deadline
                    api.request(method, path, body, timeout=max(deadline - time.monotonic(), self.api_timeout))
                except (Unavailable, DeadlineExceeded):
                    # the connection dropped: if Firecracker died, say so (status, stderr)
                    vmm_process.wait_exit(handle, DIED_GRACE_S)
                    self._check_running(handle, spec.stderr_log)
                    raise

    def _abort(self, handle: VmHandle, spec: VmSpec, layout: Layout, exc: BaseException) -> None:
        """A start or a load failed: kill and reap Firecracker, end its share server and
        jail; the error gets the tail of its stderr."""
        vmm_process.kill_and_reap(handle)
        self._close_share(spec.vm_dir)
        if layout.jail_dir is not None:
            shutil.rmtree(layout.jail_dir, ignore_errors=True)
        if isinstance(exc, HanabiError) and not isinstance(exc, (DeadlineExceeded, Unavailable)):
            tail = stderr_tail(spec.stderr_log, 500)
            if tail and "stderr" not in exc.details:
                exc.details["stderr"] = tail

    def _boot_spec(self, spec: VmSpec, layout: Layout) -> boot.FcBootSpec:
        nic: NicSpec | None = spec.nics[0] if spec.nics else None
        return boot.FcBootSpec(
            kernel_image_path=layout.fc("vmlinux") if self.jailer else str(spec.kernel),
            initrd_path=layout.fc("initrd.img") if self.jailer else str(spec.initrd),
            boot_args=kernel_args(spec.cmdline, share=spec.share_dir is not None and self.diod is not None),
            vcpus=spec.vcpus, memory_mib=spec.memory_mib,
            vsock_uds_path=layout.fc(layout.vsock_socket.name),
            placeholder_drives=self.placeholder_drives, placeholder_dir=self._drive_dir(spec, layout)[1],
            tap_name=nic.tap if nic else None, guest_mac=nic.mac if nic else None,
            mtu=nic.mtu if nic and nic.mtu != 1500 else None,
            log_path=layout.fc(LOG_NAME), log_level=self.log_level,
            metrics_path=layout.fc(METRICS_NAME))

    def _stage(self, spec: VmSpec, layout: Layout) -> None:
        """Create the files Firecracker opens (placeholders, log, metrics) where it sees them;
        under the jailer also link the kernel and initrd into its root, owned by its user."""
        root = layout.root
        if self.jailer is not None:
            _link_or_copy(spec.kernel, root / "vmlinux")
            _link_or_copy(spec.initrd, root / "initrd.img")
        made = boot.make_placeholder_files(boot.FcBootSpec(
            kernel_image_path="", initrd_path=None, boot_args="", vcpus=1, memory_mib=64,
            vsock_uds_path="", placeholder_drives=self.placeholder_drives,
            placeholder_dir=str(self._drive_dir(spec, layout)[0])))
        for name in (LOG_NAME, METRICS_NAME):
            (root / name).touch()
            made.append(root / name)
        if self.jailer is not None:
            for path in made:
                os.chown(path, self.jailer.uid, self.jailer.gid)

    def _drive_dir(self, spec: VmSpec, layout: Layout) -> tuple[Path, str]:
        """Where the VM's placeholder files are, on the host and as Firecracker names it: the
        spec's drive_dir (a template's, outside its build directory) or Firecracker's root."""
        if spec.drive_dir is None:
            return layout.root, layout.inside
        if self.jailer is not None:
            raise InvalidArgument("under the jailer the placeholder drives live in the jail")
        return spec.drive_dir, str(spec.drive_dir)

    def _wait_socket(self, handle: VmHandle, stderr_log: Path, deadline: float) -> None:
        """Until the API answers GET /; Unavailable if the process dies, DeadlineExceeded
        (with its stderr) if the socket never appears."""
        while True:
            self._check_running(handle, stderr_log)
            if handle.control_socket.exists():
                try:
                    with FirecrackerApi(str(handle.control_socket), timeout=self.api_timeout) as api:
                        api.describe_instance(timeout=min(self.api_timeout, max(deadline - time.monotonic(), 0.1)))
                    return
                except (Unavailable, DeadlineExceeded):
                    pass
            if time.monotonic() >= deadline:
                tail = stderr_tail(stderr_log)
                raise DeadlineExceeded(
                    f"Firecracker's API socket {handle.control_socket} did not answer within "
                    f"{self.start_timeout:.0f}s: {tail or '(no output on stderr)'}",
                    details={"stderr": tail})
            time.sleep(0.005)

    @staticmethod
    def _check_running(handle: VmHandle, stderr_log: Path) -> None:
        assert handle.process is not None
        code = handle.process.poll()
        if code is not None:
            tail = stderr_tail(stderr_log)
            status = proc.exit_status(code)
            raise Unavailable(f"Firecracker exited with status {status} while starting: "
                              f"{tail or '(no output on stderr)'}",
                              details={"stderr": tail, "exit_status": status})

    def is_alive(self, handle: VmHandle) -> bool:
        """True while the Firecracker process runs (same pid and start time, not a zombie)."""
        return vmm_process.is_alive(handle)

    def stop(self, handle: VmHandle, timeout: float) -> StopResult:
        """SendCtrlAltDel, wait up to `timeout`, then SIGKILL; always reap our own child. A
        paused VM (a saved template, a paused sandbox) is killed at once: its guest cannot
        act on Ctrl+Alt+Del."""
        def ctrl_alt_del(seconds: float) -> None:
            with self._api(handle, seconds) as api:
                api.send_ctrl_alt_del()

        try:
            if self.is_alive(handle) and self.query_paused(handle):
                status = vmm_process.kill_and_reap(handle)
                return StopResult(was_running=True, exit_status=proc.exit_status(status), killed=True)
            return vmm_process.stop(handle, timeout, ctrl_alt_del, "firecracker")
        finally:
            self._close_share(handle.vm_dir)
            self._remove_jail(handle)

    def _close_share(self, vm_dir: Path) -> None:
        share = self._shares.pop(str(vm_dir), None)
        if share is not None:
            share.close()

    def _remove_jail(self, handle: VmHandle) -> None:
        if self.jailer is None or self.is_alive(handle):
            return
        exec_file = self.version_check().path or self.binary
        jail_dir = layout_for(handle.vm_dir, exec_file, self.jailer).jail_dir
        if jail_dir is not None and jail_dir.parent.parent == Path(self.jailer.chroot_base):
            shutil.rmtree(jail_dir, ignore_errors=True)

    # -- vCPUs -------------------------------------------------------------------------

    def _api(self, handle: VmHandle, timeout: float | None = None) -> FirecrackerApi:
        return FirecrackerApi(str(handle.control_socket), timeout=timeout or self.api_timeout)

    def pause(self, handle: VmHandle) -> None:
        """PATCH /vm Paused."""
        with self._api(handle) as api:
            api.pause()

    def resume(self, handle: VmHandle) -> None:
        """PATCH /vm Resumed."""
        with self._api(handle) as api:
            api.resume()

    def query_paused(self, handle: VmHandle) -> bool | None:
        """From GET /: True when Paused, False when Running, None if the API does not answer."""
        try:
            with self._api(handle, 2.0) as api:
                info = api.describe_instance()
        except HanabiError:
            return None
        return info.state == "Paused"

    # -- devices -----------------------------------------------------------------------

    def _root(self, handle: VmHandle) -> Path:
        """The directory Firecracker's own files are in (the jail root, or the VM dir)."""
        return handle.control_socket.parent

    def _inside(self, handle: VmHandle, host_path: Path) -> str:
        return "/" + host_path.name if self.jailer is not None else str(host_path)

    def attach_disk(self, handle: VmHandle, disk: DiskSpec, busy_slots: Collection[str]) -> str:
        """Point a free placeholder drive at `disk` (PATCH /drives/phN); return "phN"."""
        if disk.format != "raw":
            raise InvalidArgument(f"Firecracker drives are raw images; {disk.path} is {disk.format}")
        if disk.readonly:
            raise InvalidArgument("Firecracker cannot make a placeholder drive read-only after boot; "
                                  "attach it writable and mount it read-only in the guest")
        count = handle.hotplug_slots or self.placeholder_drives
        free = [i for i in range(count) if boot.placeholder_id(i) not in busy_slots]
        if not free:
            raise FailedPrecondition(f"VM {handle.sandbox_id} has no free placeholder drive "
                                     f"(all {count} are in use)")
        index = free[0]
        slot = boot.placeholder_id(index)
        target = self._expose(handle, disk, index)
        method, path, body = boot.swap_placeholder(index, target)
        with self._api(handle) as api:
            api.request(method, path, body)
        slots = read_slots(self._root(handle))
        slots[slot] = disk.device_id
        write_slots(self._root(handle), slots)
        return slot

    def _expose(self, handle: VmHandle, disk: DiskSpec, index: int) -> str:
        """The path Firecracker opens for `disk` (under the jailer: a hard link in its root)."""
        try:
            st = os.stat(disk.path)
        except OSError as exc:
            raise InvalidArgument(f"disk {disk.path}: {exc.strerror}") from None
        if self.jailer is None:
            return str(disk.path)
        if not stat.S_ISREG(st.st_mode):
            raise FailedPrecondition(f"under the jailer only regular files can be attached, not {disk.path}")
        link = self._root(handle) / f"disk{index}.img"
        link.unlink(missing_ok=True)
        try:
            os.link(disk.path, link)
        except OSError as exc:
            raise FailedPrecondition(f"cannot link {disk.path} into the jail {link.parent}: "
                                     f"{exc.strerror} (volumes must be on the jail's filesystem)") from None
        os.chown(link, self.jailer.uid, self.jailer.gid)
        return self._inside(handle, link)

    def guest_serial(self, handle: VmHandle, disk: DiskSpec) -> str:
        """The serial the guest reads for `disk` once attached (Firecracker's GET_ID)."""
        return guest_serial(disk.path)

    def detach_disk(self, handle: VmHandle, disk: DiskSpec, timeout: float) -> None:
        """Swap the empty placeholder file back into the slot `disk` took (idempotent)."""
        root = self._root(handle)
        slots = read_slots(root)
        slot = next((s for s, device in slots.items() if device == disk.device_id), None)
        if slot is None:
            return
        index = int(slot[len(boot.PLACEHOLDER_PREFIX):])
        placeholder = root / f"{slot}.img"
        with open(placeholder, "wb") as empty:
            empty.truncate(boot.PLACEHOLDER_SIZE)
        method, path, body = boot.swap_placeholder(index, self._inside(handle, placeholder))
        with self._api(handle, timeout=min(timeout, self.api_timeout)) as api:
            api.request(method, path, body)
        del slots[slot]
        write_slots(root, slots)
        if self.jailer is not None:
            (root / f"disk{index}.img").unlink(missing_ok=True)

    def attach_nic(self, handle: VmHandle, nic: NicSpec, busy_slots: Collection[str]) -> str:
        """Firecracker has no NIC hotplug: NICs are given at boot, in the VmSpec."""
        raise FailedPrecondition("Firecracker cannot hot-plug a NIC: give it in vm.create's nics")

    def detach_nic(self, handle: VmHandle, nic: NicSpec, timeout: float) -> None:
        """Firecracker has no NIC hot-unplug: the NIC stays until the VM ends."""
        raise FailedPrecondition("Firecracker cannot hot-unplug a NIC")


def read_slots(root: Path) -> dict[str, str]:
    """Which device id each swapped placeholder holds (`placeholders.json` next to the sockets)."""
    try:
        data = json.loads((root / SLOTS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def write_slots(root: Path, slots: dict[str, str]) -> None:
    tmp = root / (SLOTS_FILE + ".tmp")
    tmp.write_text(json.dumps(slots, sort_keys=True))
    os.replace(tmp, root / SLOTS_FILE)


def _link_or_copy(source: Path, target: Path) -> None:
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _netns_preexec(netns: str | None) -> Callable[[], None] | None:
    """A pre-exec hook that moves the child into `netns` (its taps live there)."""
    if netns is None:
        return None
    from hanabi_common.netns import check_netns, enter_netns

    check_netns(netns)
    return lambda: enter_netns(netns)
