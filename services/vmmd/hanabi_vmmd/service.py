"""vmmd's domain: one VM per sandbox and its lifecycle (hot-plug: `devices`; warm pool: `pooling`).

Every operation on a sandbox holds that sandbox's lock. `hypervisor.json` is written as
soon as the VMM process exists (state `booting`) and again once its control channel
answers (`running`), so a vmmd killed at any point finds its VMs again: on start it reads
every state file back, re-adopts the VMs whose pid is alive with the recorded start time,
and marks the others `stopped` (see `recovery.py`). A reaper thread marks VMs that exit on
their own `stopped`, with their exit status when vmmd is their parent.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import replace
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from hanabi_common.config import Config
from hanabi_common.errors import (AlreadyExists, FailedPrecondition, HanabiError, Internal,
                                  NotFound)
from hanabi_common.metrics import Gauges, LabelledGauge
from hanabi_common import disowned
from hanabi_common.models.base import Drain, Drained, NoArgs, Removed, SandboxRef
from hanabi_common.models.vmmd import (BackendChoice, ChooseBackend, CreateVm, StopVm, VmInfo, VmList)
from hanabi_common.releasing import Releases
from hanabi_common.rpc.server import RpcServer
from hanabi_common.state import StateStore
from hanabi_vmmd import accel as accel_mod
from hanabi_vmmd import cgroup
from hanabi_vmmd import hostmem
from hanabi_vmmd import proc
from hanabi_vmmd import release as release_mod
from hanabi_vmmd.hypervisor import Hypervisor, NicSpec, VmHandle, VmSpec
from hanabi_vmmd.cloning import Cloner
from hanabi_vmmd.contract import VMMD
from hanabi_vmmd.devices import Devices, nic_spec
from hanabi_common.locks import KeyedLocks
from hanabi_vmmd.pooling import Pooling, pool_backend
from hanabi_vmmd.pool import WarmPool
from hanabi_vmmd.qemu import QemuHypervisor
from hanabi_vmmd.vmm_process import stderr_tail
from hanabi_vmmd.qemu_cmdline import kernel_cmdline
from hanabi_vmmd.reaper import Reaper
from hanabi_vmmd.selection import Choice, decide_auto
from hanabi_vmmd.share_server import stop_servers
from hanabi_vmmd.shares import clean_orphan_shares, make_share_dir, remove_share_dir, share_dir_for
from hanabi_vmmd.spares import Spare, SpareVmms, template_identity
from hanabi_vmmd import vmm_process
from hanabi_vmmd.recovery import recover
from hanabi_vmmd.templates import Template
from hanabi_vmmd.state import (STATE_NAME, SUN_PATH_MAX, HypervisorState, NicRecord,
                               vm_dir_for)

log = logging.getLogger("hanabi.vmmd")
HOTPLUG_SLOTS = 4
DISKS_PER_SANDBOX = 2  # root and binds: with the NICs they must fit a pooled VM's root ports
KERNEL_NAMES = ("vmlinux", "vmlinuz")
INITRD_NAME = "initrd.img"


def default_backends(config: Config) -> dict[str, Hypervisor]:
    """The VMM backends this build offers: QEMU and Firecracker (probed when first used)."""
    from hanabi_vmmd.firecracker.backend import FirecrackerHypervisor
    from hanabi_vmmd.firecracker.process import JailerConfig

    qemu = QemuHypervisor(binary=config.vmm.qemu_binary, machine=config.vmm.machine,
                          start_timeout=config.vmm.boot_timeout_s, hotplug_slots=HOTPLUG_SLOTS,
                          mem_merge=config.vmm.ksm)
    fc = config.vmm.firecracker
    jailer = JailerConfig(binary=fc.jailer_binary, uid=fc.jailer_uid, gid=fc.jailer_gid,
                          chroot_base=fc.chroot_base, cgroup_version=fc.cgroup_version) if fc.jailer else None
    firecracker = FirecrackerHypervisor(binary=fc.binary, jailer=jailer, start_timeout=config.vmm.boot_timeout_s,
                                        placeholder_drives=fc.placeholder_drives, log_level=fc.log_level,
                                        diod=fc.diod)
    return {"qemu": qemu, "firecracker": firecracker}


def guest_files(guest_dir: Path) -> tuple[Path, Path]:
    """(kernel, initrd) of the guest image; FailedPrecondition naming what is missing."""
    kernel = next((guest_dir / n for n in KERNEL_NAMES if (guest_dir / n).is_file()), None)
    initrd = guest_dir / INITRD_NAME
    missing = ([] if kernel else [f"{guest_dir}/vmlinux"]) + ([] if initrd.is_file() else [str(initrd)])
    if missing:
        raise FailedPrecondition(
            f"guest image incomplete: {', '.join(missing)} missing "
            f"(build it with `hanabi-image build`, or set vmm.guest_dir)",
            details={"guest_dir": str(guest_dir), "missing": missing})
    assert kernel is not None
    return kernel, initrd


class VmService:
    """Owns the VMs of this host (device hot-plug in `devices`, the warm pool in `pooling`,
    VM templates in `cloner`)."""

    def __init__(self, config: Config, *, backends: dict[str, Hypervisor] | None = None,
                 accel: accel_mod.AccelDecision | None = None) -> None:
        self.config = config
        self.store = StateStore(config.sandboxes_dir)
        self.vm_root = config.run_dir / "vm"
        self.vm_root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.backends = backends if backends is not None else default_backends(config)
        self.accel = accel or accel_mod.resolve(config.vmm.accel)
        self._auto: Choice | None = None  # what `auto` maps to, decided at the first use
        self.locks = KeyedLocks()
        self._handles: dict[str, VmHandle] = {}
        self._events = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vmmd-exit")
        self.reaper = Reaper(self._on_exit)
        self.pool_store = StateStore(config.run_dir / "pool")
        # Released VMs a crash left unfinished: done before anything else looks at the VM dirs.
        self.releases = Releases(config.run_dir, "vmmd", self._finish_release, log)
        self.releases.finish_all()
        self.devices = Devices(self)
        self.pooling = Pooling(self)
        adopted = recover([self.store, self.pool_store], self.backends, self.vm_root, self.locks)
        for handle in adopted:
            self.reaper.watch(handle)
            if self.pooling._is_pooled(handle.sandbox_id):
                self._handles[handle.sandbox_id] = handle
        self.spares = SpareVmms(StateStore(config.run_dir / "spares"), config.vmm.spare_vmms,
                                self._start_spare, self._remove_vm_dirs)
        self.spares.discard_recorded({(h.pid, h.start_time) for h in adopted})
        # Containers deleted while vmmd was down: their VMs go now.
        disowned.reconcile(self.store, STATE_NAME, lambda sid: self.release(SandboxRef(sandbox_id=sid)), log)
        clean_orphan_shares(config.shares_dir, {
            Path(state.share_dir) for store in (self.store, self.pool_store)
            for sid in store.list_sandboxes(having=STATE_NAME)
            if (state := store.read(sid, STATE_NAME, HypervisorState)) is not None and state.share_dir})
        self.cloner = Cloner(config, self.accel.accel, self.backends, self.devices.plug_nic,
                             disks_per_sandbox=DISKS_PER_SANDBOX)
        self.templates = self.cloner.templates
        self.cloner.prune()
        self.pool = self.pooling.pool = WarmPool(config.vmm.pool_size, self.pooling._boot_pooled)
        self.pool.start(self.pooling._pooled_after_restart())
        self.releases.start()

    def register(self, server: RpcServer) -> None:
        """Serve the vm.* methods (the table in hanabi_vmmd.contract)."""
        VMMD.register(server, self)

    def close(self) -> None:
        """Stop watching; the VMs keep running and are re-adopted by the next vmmd (the
        spare VMMs are killed)."""
        self.pool.close()
        self.spares.close()
        self.releases.close()
        self.reaper.close()
        self._events.shutdown(wait=True)

    # -- helpers -----------------------------------------------------------------------

    def _backend(self, name: str) -> Hypervisor:
        backend = self.backends.get(name)
        if backend is None:
            raise FailedPrecondition(f"hypervisor {name!r} is not available in this vmmd "
                                     f"(available: {', '.join(sorted(self.backends))})")
        return backend

    def _read(self, sandbox_id: str) -> HypervisorState:
        state = self.store.read(sandbox_id, STATE_NAME, HypervisorState)
        if state is None:
            raise NotFound(f"sandbox {sandbox_id} has no VM")
        return state

    def _write(self, state: HypervisorState, store: StateStore | None = None) -> None:
        (store or self.store).write(state.sandbox_id, STATE_NAME, state)

    def _handle(self, state: HypervisorState) -> VmHandle:
        """The live handle (with its Popen) if this vmmd spawned the VM, else one from state."""
        handle = self._handles.get(state.sandbox_id)
        if handle is not None and handle.pid == state.pid and handle.start_time == state.start_time:
            return handle
        return state.handle()

    def _running(self, sandbox_id: str, *allowed: str) -> tuple[HypervisorState, Hypervisor, VmHandle]:
        state = self._read(sandbox_id)
        backend = self._backend(state.hypervisor)
        handle = self._handle(state)
        alive = backend.is_alive(handle)
        if not alive or state.state not in allowed:
            now = state.state if alive else "stopped"
            raise FailedPrecondition(f"VM of sandbox {sandbox_id} is {now}; "
                                     f"this needs it {' or '.join(allowed)}")
        return state, backend, handle

    def _remove_vm_dirs(self, state: HypervisorState) -> None:
        """The VM directory of an ended VM, and its share root once blockd emptied it."""
        self._remove_vm_dir(Path(state.vm_dir))
        if state.share_dir:
            stop_servers(Path(state.share_dir))  # a Firecracker VM's diod, even from before a restart
        remove_share_dir(Path(state.share_dir) if state.share_dir else None)

    def _remove_spec_dirs(self, spec: VmSpec) -> None:
        """The VM directory and share root `_spec` made, of a VM that did not start."""
        self._remove_vm_dir(spec.vm_dir)
        remove_share_dir(spec.share_dir)

    def _remove_vm_dir(self, vm_dir: Path) -> None:
        if vm_dir.parent != self.vm_root:
            log.error("refusing to remove a VM directory outside the run dir", extra={"path": str(vm_dir)})
            return
        shutil.rmtree(vm_dir, ignore_errors=True)

    # -- lifecycle ---------------------------------------------------------------------

    def create(self, request: CreateVm) -> VmInfo:
        """Boot a VM for the sandbox (or take a pooled one of its size); returns once the
        VMM runs and answers (not the agent)."""
        sid = request.sandbox_id
        hv_name = request.hypervisor or self.config.vmm.hypervisor
        backend = self._backend(self._auto_backend() if hv_name == "auto" else hv_name)
        vmm = self.config.vmm
        hostmem.note_backend(vmm.ksm, backend.name, backend.capabilities().mergeable_memory)
        memory_mib, vcpus = request.memory_mib or vmm.memory_mib, request.vcpus or vmm.vcpus
        nics = tuple(nic_spec(f"nic{index}", nic) for index, nic in enumerate(request.nics))
        cgroups = cgroup.checked_dirs(request.cgroup_dirs)
        with self.locks.hold(sid):
            self.releases.finish(sid)  # an earlier VM of this id: its dirs are named after the id
            if self.store.read(sid, STATE_NAME, HypervisorState) is not None:
                raise AlreadyExists(f"sandbox {sid} already has a VM (vm.stop it first)")
            if (backend is pool_backend(self.backends) and (memory_mib, vcpus) == (vmm.memory_mib, vmm.vcpus)
                    and len(nics) + DISKS_PER_SANDBOX <= HOTPLUG_SLOTS):
                state = self.pooling._claim_pooled(sid, nics)
                if state is not None:
                    cgroup.join(state.pid, cgroups)  # booted earlier: its memory stays charged to vmmd
                    return state.info()
            state = self._clone_or_boot(sid, self.store, backend, memory_mib, vcpus, nics, cgroups)
        return state.info()

    def _spec(self, sid: str, backend: Hypervisor, memory_mib: int, vcpus: int,
              nics: tuple[NicSpec, ...] = (), template: Template | None = None) -> VmSpec:
        """The spec of a VM named `sid` (a clone's when `template`), its VM directory made
        fresh and its share root made."""
        vmm = self.config.vmm
        kernel, initrd = guest_files(vmm.guest_dir)
        vm_dir = vm_dir_for(self.config.run_dir, sid)
        if len(str(vm_dir / "agent.sock")) > SUN_PATH_MAX:
            raise FailedPrecondition(f"run_dir {self.config.run_dir} is too long: VM socket paths "
                                     f"would exceed {SUN_PATH_MAX} bytes")
        self._remove_vm_dir(vm_dir)  # a leftover of a crash: no state file refers to it
        share_dir = (make_share_dir(share_dir_for(self.config.shares_dir, sid))
                     if backend.capabilities().share is not None else None)
        spec = VmSpec.in_dir(sid, vm_dir, backend.capabilities().files, memory_mib=memory_mib, vcpus=vcpus,
                             kernel=kernel, initrd=initrd, cmdline=kernel_cmdline(vmm.kernel_cmdline_extra),
                             accel=self.accel.accel, hotplug_slots=HOTPLUG_SLOTS, nics=nics,
                             share_dir=share_dir)
        return spec if template is None else self.cloner.clone_spec(spec, template)

    def _boot(self, sid: str, store: StateStore, backend: Hypervisor, memory_mib: int, vcpus: int,
              nics: tuple[NicSpec, ...] = (), cgroups: Sequence[Path] = (),
              template: Template | None = None) -> HypervisorState:
        """Boot a VM recorded in `store` (the sandboxes' or the pool's), or start it as a
        clone of `template` (a spare VMM of it where one is ready; its NICs hot-plugged after);
        caller holds sid's lock."""
        if template is not None:
            spare = self.spares.take(template, backend)
            if spare is not None:
                try:
                    return self._boot_spare(sid, store, backend, nics, cgroups, template, spare)
                except HanabiError as exc:
                    log.warning("the spare vmm did not take the clone, starting another",
                                extra={"sandbox": sid, "spare": spare.spare_id, "error": exc.message})
        spec = self._spec(sid, backend, memory_mib, vcpus, nics, template)
        record: dict = {}

        def on_spawned(handle: VmHandle) -> None:
            cgroup.join(handle.pid, list(cgroups))  # before the guest touches its memory
            record["state"] = self._state_for(spec, handle, backend.name, template)
            self._write(record["state"], store)

        began = time.monotonic()
        try:
            if template is None:
                handle = backend.start(spec, on_spawned)
            else:
                handle = self.cloner.start_clone(backend, spec, template, on_spawned)
            state = record.get("state") or self._state_for(spec, handle, backend.name, template)
            if template is not None:
                try:
                    self.cloner.finish_clone(state, backend, handle, nics, began)
                except BaseException:
                    backend.stop(handle, self.config.vmm.stop_timeout_s)
                    raise
        except BaseException as exc:
            store.remove(sid, STATE_NAME)
            self._remove_spec_dirs(spec)
            if isinstance(exc, HanabiError) and template is None:  # a clone's caller logs it
                log.warning("vm start failed", extra={"sandbox": sid, "error": exc.message})
            raise
        return self._now_running(store, state, handle, template, began)

    def _boot_spare(self, sid: str, store: StateStore, backend: Hypervisor, nics: tuple[NicSpec, ...],
                    cgroups: Sequence[Path], template: Template, spare: Spare) -> HypervisorState:
        """`_boot` of a clone with a spare VMM: it becomes the sandbox's VM (its directories
        stay the spare's), joins the sandbox's cgroups, gets the template's state and runs."""
        began = time.monotonic()
        spec, handle = replace(spare.spec, sandbox_id=sid), spare.handle
        handle.sandbox_id = sid
        state = self._state_for(spec, handle, backend.name, template)
        self._write(state, store)  # the sandbox's record first: a crash now keeps the VM
        self.spares.forget(spare)
        try:
            cgroup.join(handle.pid, list(cgroups))  # before the guest touches its memory
            backend.load_clone(handle, spec, template.state_file)
            self.cloner.finish_clone(state, backend, handle, nics, began)
        except BaseException:
            vmm_process.kill_and_reap(handle)  # (load_clone killed it already when it failed)
            store.remove(sid, STATE_NAME)
            self._remove_vm_dirs(state)
            raise
        return self._now_running(store, state, handle, template, began, spare=spare.spare_id)

    def _now_running(self, store: StateStore, state: HypervisorState, handle: VmHandle,
                     template: Template | None, began: float, spare: str | None = None) -> HypervisorState:
        """Record a started VM as running and watch it; a clone's template gets its spares."""
        sid = state.sandbox_id
        state.state = "running"
        self._write(state, store)
        self._handles[sid] = handle
        self.reaper.watch(handle)
        log.info("vm created", extra={"sandbox": sid, "pid": handle.pid, "accel": state.accel,
                                      "template": template.key[:12] if template is not None else None,
                                      "spare": spare, "ms": round((time.monotonic() - began) * 1000, 1)})
        if template is not None:
            self.spares.want(template, self._backend(state.hypervisor))
        return state

    def _start_spare(self, spare_id: str, template: Template, backend: Hypervisor) -> Spare:
        """The spares' start (their refill thread): a clone's VMM of `template`, waiting for
        its state in SCHED_IDLE, recorded in the spares' store."""
        params = template.record.params
        spec = self._spec(spare_id, backend, int(params["memory_mib"]), int(params["vcpus"]), (), template)
        record: dict = {}

        def on_spawned(handle: VmHandle) -> None:
            try:
                proc.set_idle_priority(handle.pid, True)
            except OSError as exc:  # it then waits at the normal policy
                log.warning("a spare vmm could not be put in SCHED_IDLE", extra={"error": str(exc)})
            record["state"] = self._state_for(spec, handle, backend.name, template)
            self.spares.store.write(spare_id, STATE_NAME, record["state"])

        try:
            handle = backend.start_clone_vmm(spec, on_spawned)
        except BaseException:
            self.spares.store.purge(spare_id)
            self._remove_spec_dirs(spec)
            raise
        return Spare(spare_id=spare_id, spec=spec, handle=handle, state=record["state"],
                     template=template_identity(template))

    def _clone_or_boot(self, sid: str, store: StateStore, backend: Hypervisor, memory_mib: int, vcpus: int,
                       nics: tuple[NicSpec, ...] = (), cgroups: Sequence[Path] = ()) -> HypervisorState:
        """`_boot`, as a clone of the fitting template where there is one (`Cloner.clone_or_boot`:
        a clone that does not start is logged and the VM booted cold). Caller holds sid's lock."""
        return self.cloner.clone_or_boot(
            sid, backend, memory_mib, vcpus, nics,
            lambda template: self._boot(sid, store, backend, memory_mib, vcpus, nics, cgroups, template))

    def _auto_backend(self) -> str:
        """`auto`: Firecracker where its binary and KVM work, else QEMU (decided once, logged)."""
        if self._auto is None:
            self._auto = decide_auto(self.backends)
        return self._auto.backend

    def choose_backend(self, request: ChooseBackend) -> BackendChoice:
        """The backend vm.create would use for `request.hypervisor` (auto decided here, the
        one place that decides it), with its disk formats and share device."""
        asked = request.hypervisor or self.config.vmm.hypervisor
        name = self._auto_backend() if asked == "auto" else asked
        backend = self._backend(name)
        caps = backend.capabilities()
        reason = self._auto.reason if asked == "auto" and self._auto is not None else f"{asked} asked for"
        return BackendChoice(backend=name, reason=reason, disk_formats=list(caps.disk_formats), share=caps.share)

    def _state_for(self, spec: VmSpec, handle: VmHandle, hypervisor: str,
                   template: Template | None = None) -> HypervisorState:
        return HypervisorState(
            sandbox_id=spec.sandbox_id, hypervisor=hypervisor, accel=spec.accel,
            machine=handle.machine, hotplug_slots=handle.hotplug_slots, state="booting",
            pid=handle.pid, start_time=handle.start_time, memory_mib=spec.memory_mib,
            vcpus=spec.vcpus, vm_dir=str(spec.vm_dir), agent_socket=str(handle.agent_socket),
            agent_transport=handle.agent_transport, agent_port=handle.agent_port,
            control_socket=str(handle.control_socket), console_log=str(spec.console_log),
            stderr_log=str(spec.stderr_log), created_at=time.time(),
            nics=[NicRecord.of(n) for n in spec.nics],
            share_dir=str(spec.share_dir) if spec.share_dir else None,
            template=template.key if template is not None else None)

    def get(self, request: SandboxRef) -> VmInfo:
        """The VM of one sandbox."""
        return self._observed(self._read(request.sandbox_id)).info()

    def list(self, _: NoArgs | None = None) -> VmList:
        """Every VM vmmd owns, stopped ones included until vm.stop removes them."""
        vms = []
        for sid in self.store.list_sandboxes(having=STATE_NAME):
            try:
                state = self.store.read(sid, STATE_NAME, HypervisorState)
            except HanabiError as exc:
                log.error("unreadable state file", extra={"sandbox": sid, "error": exc.message})
                continue
            if state is not None:
                vms.append(self._observed(state).info())
        return VmList(vms=vms)

    def metrics(self) -> Gauges:
        """Gauges for Prometheus: VMs by state and hypervisor, the warm pool, templates and spares."""
        vms = self.list().vms
        states = {state: sum(vm.state == state for vm in vms) for state in ("booting", "running", "paused", "stopped")}
        return {
            "hanabi_vms": ("VMs of sandboxes by state", LabelledGauge("state", states)),
            "hanabi_vms_memory_mib": ("Guest memory of the sandboxes' VMs (MiB)", sum(vm.memory_mib for vm in vms)),
            "hanabi_pool_free": ("Pooled VMs ready to be taken", len(self.pool.free())),
            "hanabi_pool_size": ("Configured size of the warm pool", self.pool.size),
            "hanabi_vm_templates": ("VM templates on disk", len(self.templates.list())),
            "hanabi_spare_vmms_ready": ("Spare clone VMMs ready to be taken", self.spares.ready()),
            "hanabi_vm_releases_pending": ("Released VMs whose cleanup is not finished", len(self.releases.pending())),
        }

    def _observed(self, state: HypervisorState) -> HypervisorState:
        """`state`, shown as stopped if its process is gone and the reaper has not caught up."""
        handle = self._handle(state)
        if state.state != "stopped" and not self._backend(state.hypervisor).is_alive(handle):
            status = proc.reap(handle.process, 1.0) if handle.process is not None else None
            return state.model_copy(update={"state": "stopped", "exit_status": status})
        return state

    def stop(self, request: StopVm) -> Removed:
        """Stop the VM (clean shutdown, then SIGKILL) and remove its state and socket dir."""
        sid = request.sandbox_id
        timeout = request.timeout_s or self.config.vmm.stop_timeout_s
        with self.locks.hold(sid):
            state = self.store.read(sid, STATE_NAME, HypervisorState)
            if state is None:
                self._remove_vm_dir(vm_dir_for(self.config.run_dir, sid))
                return Removed(existed=False)
            self.reaper.unwatch(sid)
            backend = self._backend(state.hypervisor)
            handle = self._handle(state)
            result = backend.stop(handle, timeout)
            if backend.is_alive(handle):
                raise Internal(f"VM of sandbox {sid} (pid {state.pid}) survived SIGKILL")
            self.store.remove(sid, STATE_NAME)
            self._remove_vm_dirs(state)
            self._handles.pop(sid, None)
        log.info("vm stopped", extra={"sandbox": sid, "pid": state.pid, "was_running": result.was_running,
                                      "killed": result.killed, "exit_status": result.exit_status})
        return Removed(existed=True)

    def release(self, request: SandboxRef) -> Removed:
        """A container's delete: record the VM as to be released, SIGKILL and reap its VMM,
        return; its directories go in the background (`release.py`; idempotent)."""
        sid = request.sandbox_id
        with self.locks.hold(sid):
            state = self.store.read(sid, STATE_NAME, HypervisorState)
            if state is None:
                return Removed(existed=self.releases.record_path(sid).exists())
            self.reaper.unwatch(sid)
            handle = self._handle(state)
            self._handles.pop(sid, None)
            self.releases.take(self.store.path(sid, STATE_NAME), sid)
            self.store.remove_dir_if_empty(sid)
            backend = self.backends.get(state.hypervisor)
            status = release_mod.kill_now(state, handle, backend is None or backend.capabilities().share_servers)
        self.releases.wake()
        log.info("vm released", extra={"sandbox": sid, "pid": state.pid, "exit_status": proc.exit_status(status)})
        return Removed(existed=True)

    def _finish_release(self, sid: str, record: Path) -> None:
        release_mod.finish(record, self.backends, self._remove_vm_dirs)

    def drain(self, request: Drain) -> Drained:
        """Wait until the released VMs are all cleaned up and no spare VMM is being started
        (or the timeout passed)."""
        pending = self.releases.drain(request.timeout_s)
        self.spares.settle(request.timeout_s)  # a spare being started is not recorded yet
        return Drained(pending=pending)

    def pause(self, request: SandboxRef) -> VmInfo:
        """Stop the VM's vCPUs (idempotent)."""
        return self._set_paused(request.sandbox_id, True)

    def resume(self, request: SandboxRef) -> VmInfo:
        """Restart the VM's vCPUs (idempotent)."""
        return self._set_paused(request.sandbox_id, False)

    def _set_paused(self, sid: str, paused: bool) -> VmInfo:
        with self.locks.hold(sid):
            state, backend, handle = self._running(sid, "running", "paused")
            if paused:
                backend.pause(handle)
            else:
                backend.resume(handle)
            state.state = "paused" if paused else "running"
            self._write(state)
        log.info("vm paused" if paused else "vm resumed", extra={"sandbox": sid})
        return state.info()

    # -- exits -------------------------------------------------------------------------

    def _on_exit(self, handle: VmHandle, status: int | None) -> None:
        """Reaper callback (reaper thread): record the exit without blocking the reaper."""
        try:
            self._events.submit(self._mark_exited, handle, status)
        except RuntimeError:
            pass  # shutting down; the next vmmd notices on recovery

    def _mark_exited(self, handle: VmHandle, status: int | None) -> None:
        sid = handle.sandbox_id
        if self.pooling._is_pooled(sid):
            with self.locks.hold(sid):
                log.warning("pooled vm exited", extra={"pool_id": sid, "exit_status": status})
                self.pool.forget(sid)
                self.pooling._discard_pooled(sid, self.pool_store.read(sid, STATE_NAME, HypervisorState))
            return
        with self.locks.hold(sid):
            try:
                state = self.store.read(sid, STATE_NAME, HypervisorState)
            except HanabiError:
                return
            if state is None or state.pid != handle.pid or state.start_time != handle.start_time:
                return  # stopped and removed already, or a newer VM
            if state.state == "stopped":
                return
            state.state, state.exit_status = "stopped", status
            self._write(state)  # the handle stays until vm.stop: readers may still poll it
        log.warning("vm exited on its own", extra={
            "sandbox": sid, "pid": handle.pid, "exit_status": status,
            "stderr": stderr_tail(Path(state.stderr_log), 500)})
