"""vmmd's side of VM templates (`VmService.cloner`, a `Cloner`): which template fits a VM,
building one, starting a sandbox's VM as a clone of one, and making the clone its own machine.

A clone resumes where its template stopped, so everything the template fixed is made
different before any container runs: the guest's RNG is reseeded from fresh host
randomness, its clock set, its hostname made its own (the agent's `restored` request),
then its NICs are hot-plugged as for a pooled VM. A clone that does not get there is
killed and the VM booted cold instead, with one log line saying why.

The backend-specific parts are the `Hypervisor`'s (`save_template`, `restore`, and
`capabilities()`: whether it makes templates, whether it hot-plugs NICs); the `Cloner` is
given its collaborators explicitly (the config, the accelerator, the backends, the service's
`boot`, the NIC hot-plug) and owns the `TemplateStore`.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path

from hanabi_common.config import Config
from hanabi_common.errors import FailedPrecondition, HanabiError
from hanabi_wire import T_RESTORED
from hanabi_wire.constants import RESTORE_SEED_BYTES
from hanabi_vmmd.agent_probe import agent_request, wait_agent_ready
from hanabi_vmmd.hypervisor import Accel, Hypervisor, NicSpec, VmHandle, VmSpec
from hanabi_vmmd.qemu_cmdline import kernel_cmdline
from hanabi_vmmd.state import HypervisorState
from hanabi_vmmd.templates import (BUILD_DIR, DRIVES_DIR, MEMORY_NAME, STATE_NAME, Template, TemplateParams,
                                   TemplateStore, TemplateUnsupported, image_id, vmm_id)

log = logging.getLogger("hanabi.vmmd")
RESTORE_AGENT_TIMEOUT_S = 10.0
# (the template to clone, or None: boot cold) -> the VM's record; the service's `_boot`
Boot = Callable[[Template | None], HypervisorState]
# (the clone's record, its backend, its handle, a NIC): hot-plug it (`Devices.plug_nic`)
PlugNic = Callable[[HypervisorState, Hypervisor, VmHandle, NicSpec], object]


def clone_hostname(sid: str) -> str:
    """The VM's own hostname (a container's hostname is set at create_container anyway)."""
    return "vm-" + hashlib.sha256(sid.encode()).hexdigest()[:12]


def restore_fields(sid: str) -> dict:
    """The fields of the `restored` request: fresh randomness, the time, the hostname."""
    return {"seed": base64.b64encode(os.urandom(RESTORE_SEED_BYTES)).decode(),
            "time_ns": time.time_ns(), "hostname": clone_hostname(sid)}


def agent_port(transport: str, port: int | None) -> int | None:
    """The vsock port the agent probe CONNECTs to through a hybrid vsock socket (None: the
    agent socket is a plain stream socket)."""
    return port if transport == "hybrid_vsock" else None


def why_not_cloned(backend: Hypervisor, nics: tuple[NicSpec, ...], disks: int) -> str | None:
    """Why a VM with `nics` (and `disks` disks to hot-plug later) cannot be a clone of
    `backend` (a clone gets its NICs by hot-plug), or None when it can (pure)."""
    caps = backend.capabilities()
    if not caps.templates:
        return f"{backend.name} makes no VM templates"
    if nics and "nic" not in caps.hotplug:
        return f"{backend.name} cannot hot-plug the NICs into a clone"
    if len(nics) + disks > caps.hotplug_slots:
        return f"{len(nics)} NICs and {disks} disks need more than {caps.hotplug_slots} hot-plug slots"
    return None


class Cloner:
    """Templates: which one fits a VM, building one, cloning it (the store is `templates`)."""

    def __init__(self, config: Config, accel: Accel, backends: Mapping[str, Hypervisor],
                 plug_nic: PlugNic, *, disks_per_sandbox: int) -> None:
        self.config = config
        self.accel = accel
        self.backends = backends
        self._plug_nic = plug_nic
        self.disks_per_sandbox = disks_per_sandbox
        self.templates = TemplateStore(config.run_dir / "templates", self.build)

    # -- which template ----------------------------------------------------------------

    def params(self, backend: Hypervisor, memory_mib: int, vcpus: int) -> TemplateParams | None:
        """The template a VM of this size would be cloned from; None when it cannot be one."""
        caps = backend.capabilities()
        if not self.config.vmm.templates or not caps.templates:
            return None
        from hanabi_vmmd.service import guest_files

        vmm = self.config.vmm
        kernel, initrd = guest_files(vmm.guest_dir)
        return TemplateParams(backend=backend.name, image_id=image_id(vmm.guest_dir, kernel, initrd),
                              vmm_id=vmm_id(backend.binary),
                              memory_mib=memory_mib, vcpus=vcpus, machine=backend.machine,
                              accel=self.accel, cmdline=kernel_cmdline(vmm.kernel_cmdline_extra),
                              hotplug_slots=caps.hotplug_slots, share=caps.share is not None)

    def prune(self) -> None:
        """At start: remove the templates of images that are no longer the current one (all
        of them when the guest image is gone), so templates go with their image; or every
        template when templates are off. Builds a crash interrupted go too."""
        from hanabi_vmmd.recovery import clean_orphans

        clean_orphans(self.templates.root / BUILD_DIR, set())
        if not self.config.vmm.templates:
            self.templates.remove_all()
            return
        for name, backend in self.backends.items():
            if not backend.capabilities().templates:
                continue
            try:
                params = self.params(backend, self.config.vmm.memory_mib, self.config.vmm.vcpus)
            except HanabiError:  # no guest image (or no VMM binary): nothing can be cloned
                for template in self.templates.list():
                    if template.record.params.get("backend") == name:
                        self.templates.discard(template.key)
                continue
            if params is not None:
                self.templates.remove_stale(name, params.image_id, params.vmm_id)

    def template_for(self, backend: Hypervisor, memory_mib: int, vcpus: int,
                     nics: tuple[NicSpec, ...]) -> Template | None:
        """The template to clone for this VM (built now if missing), or None: templates off,
        a backend without them, NICs a clone could not get, or no template could be built."""
        if not self.config.vmm.templates:
            return None
        reason = why_not_cloned(backend, nics, self.disks_per_sandbox)
        if reason is not None:
            log.debug("vm not cloned", extra={"reason": reason})
            return None
        try:
            params = self.params(backend, memory_mib, vcpus)
            return self.templates.get(params) if params is not None else None
        except HanabiError as exc:
            log.warning("no vm template, booting cold", extra={"error": exc.message})
            return None

    def clone_or_boot(self, sid: str, backend: Hypervisor, memory_mib: int, vcpus: int,
                      nics: tuple[NicSpec, ...], boot: Boot) -> HypervisorState:
        """`boot` as a clone of the fitting template where there is one; a clone that does not
        start is logged once, its template discarded (rebuilt at a later use), and the VM
        booted cold. Caller holds sid's lock."""
        template = self.template_for(backend, memory_mib, vcpus, nics)
        if template is not None:
            try:
                return boot(template)
            except HanabiError as exc:
                log.warning("clone did not start, booting cold (the template is rebuilt at its next use)",
                            extra={"sandbox": sid, "template": template.key[:12], "error": exc.message})
                self.templates.discard(template.key)
        return boot(None)

    # -- building ----------------------------------------------------------------------

    def build(self, params: TemplateParams, build_dir: Path) -> float:
        """The store's builder: boot a VM (its RAM in build_dir/memory, shared, where the
        backend maps it; its placeholder drives where they outlive the build), wait for its
        agent, save it (state in build_dir/state), end the VM; boot-to-ready seconds."""
        from hanabi_vmmd.service import guest_files

        vmm = self.config.vmm
        backend = self.backends.get(params.backend)
        if backend is None:
            raise FailedPrecondition(f"hypervisor {params.backend!r} is not available in this vmmd")
        kernel, initrd = guest_files(vmm.guest_dir)
        share_dir = build_dir / "share" if params.share else None
        if share_dir is not None:
            share_dir.mkdir(mode=0o700)
        spec = VmSpec.in_dir(f"template-{params.key()[:12]}", build_dir, backend.capabilities().files,
                             memory_mib=params.memory_mib,
                             vcpus=params.vcpus, kernel=kernel, initrd=initrd, cmdline=params.cmdline,
                             accel=params.accel, hotplug_slots=params.hotplug_slots, share_dir=share_dir,
                             memory_file=build_dir / MEMORY_NAME, memory_shared=True,
                             drive_dir=self.templates.root / DRIVES_DIR)
        began = time.monotonic()
        handle = backend.start(spec)
        try:
            port = agent_port(handle.agent_transport, handle.agent_port)
            # half the boot timeout: the build runs inside the vm.create that needed it, whose
            # caller waits boot_timeout_s + 5 s for the build, the clone and its agent together
            wait_agent_ready(handle.agent_socket, vmm.boot_timeout_s / 2, port)
            ready_s = time.monotonic() - began
            try:  # an agent without `restored` could not make its clones their own machines
                agent_request(handle.agent_socket, T_RESTORED, restore_fields(spec.sandbox_id),
                              RESTORE_AGENT_TIMEOUT_S, port)
            except FailedPrecondition as exc:
                raise TemplateUnsupported(f"the guest image at {vmm.guest_dir} cannot make VM templates: "
                                          f"{exc.message} (rebuild it with `hanabi-image build`)") from None
            backend.save_template(handle, build_dir / STATE_NAME, build_dir / MEMORY_NAME)
        finally:
            backend.stop(handle, vmm.stop_timeout_s)
        return ready_s

    # -- cloning -----------------------------------------------------------------------

    @staticmethod
    def clone_spec(spec: VmSpec, template: Template) -> VmSpec:
        """`spec` as a clone of `template`: its RAM the template's file, private; no boot NICs."""
        return replace(spec, nics=(), memory_file=template.memory_file, memory_shared=False, incoming=True)

    @staticmethod
    def start_clone(backend: Hypervisor, spec: VmSpec, template: Template,
                    on_spawned: Callable[[VmHandle], None]) -> VmHandle:
        """The clone's VMM, restored from `template` and running."""
        return backend.restore(spec, template.state_file, on_spawned)

    def finish_clone(self, state: HypervisorState, backend: Hypervisor, handle: VmHandle,
                     nics: tuple[NicSpec, ...], began: float) -> None:
        """After the resume: the guest's own RNG, clock and hostname, then its NICs."""
        agent_request(Path(state.agent_socket), T_RESTORED, restore_fields(state.sandbox_id),
                      RESTORE_AGENT_TIMEOUT_S, agent_port(state.agent_transport, state.agent_port))
        ready_ms = round((time.monotonic() - began) * 1000, 1)
        for nic in nics:
            self._plug_nic(state, backend, handle, nic)
        log.info("vm cloned from a template", extra={"sandbox": state.sandbox_id, "template": state.template,
                                                     "pid": handle.pid, "agent_ready_ms": ready_ms,
                                                     "rss_kib": proc_rss_kib(handle.pid)})


def proc_rss_kib(pid: int) -> int | None:
    """The VMM's resident set (KiB), for the log line."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None
