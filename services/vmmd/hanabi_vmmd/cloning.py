"""vmmd's side of VM templates (a mixin of VmService): build a template, start a sandbox's
VM as a clone of one, and make the clone its own machine.

A clone resumes where its template stopped, so everything the template fixed is made
different before any container runs: the guest's RNG is reseeded from fresh host
randomness, its clock set, its hostname made its own (the agent's `restored` request),
then its NICs are hot-plugged as for a pooled VM. A clone that does not get there is
killed and the VM booted cold instead, with one log line saying why.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

from hanabi_common.errors import FailedPrecondition, HanabiError
from hanabi_common.state import StateStore
from hanabi_wire import T_RESTORED
from hanabi_wire.constants import RESTORE_SEED_BYTES
from hanabi_vmmd.agent_probe import agent_request, wait_agent_ready
from hanabi_vmmd.hypervisor import Hypervisor, NicSpec, VmHandle, VmSpec
from hanabi_vmmd.qemu_cmdline import kernel_cmdline
from hanabi_vmmd.vm_host import VmHost
from hanabi_vmmd.state import HypervisorState
from hanabi_vmmd.templates import (MEMORY_NAME, STATE_NAME, Template, TemplateParams, TemplateUnsupported,
                                   image_id, vmm_id)

log = logging.getLogger("hanabi.vmmd")
RESTORE_AGENT_TIMEOUT_S = 10.0


def clone_hostname(sid: str) -> str:
    """The VM's own hostname (a container's hostname is set at create_container anyway)."""
    return "vm-" + hashlib.sha256(sid.encode()).hexdigest()[:12]


def restore_fields(sid: str) -> dict:
    """The fields of the `restored` request: fresh randomness, the time, the hostname."""
    return {"seed": base64.b64encode(os.urandom(RESTORE_SEED_BYTES)).decode(),
            "time_ns": time.time_ns(), "hostname": clone_hostname(sid)}


class CloneOps(VmHost):
    """Templates: which one fits a VM, building one, cloning it."""

    def _template_params(self, backend: Hypervisor, memory_mib: int, vcpus: int) -> TemplateParams | None:
        """The template a VM of this size would be cloned from; None when it cannot be one."""
        if not self.config.vmm.templates or not backend.capabilities().templates:
            return None
        from hanabi_vmmd.service import HOTPLUG_SLOTS, guest_files

        vmm = self.config.vmm
        kernel, initrd = guest_files(vmm.guest_dir)
        return TemplateParams(backend=backend.name, image_id=image_id(vmm.guest_dir, kernel, initrd),
                              vmm_id=vmm_id(backend.binary),
                              memory_mib=memory_mib, vcpus=vcpus, machine=backend.machine,
                              accel=self.accel.accel, cmdline=kernel_cmdline(vmm.kernel_cmdline_extra),
                              hotplug_slots=HOTPLUG_SLOTS, share=backend.capabilities().share is not None)

    def _prune_templates(self) -> None:
        """At start: remove the templates of images that are no longer the current one (all
        of them when the guest image is gone), so templates go with their image."""
        for name, backend in self.backends.items():
            if not backend.capabilities().templates:
                continue
            try:
                params = self._template_params(backend, self.config.vmm.memory_mib, self.config.vmm.vcpus)
            except HanabiError:  # no guest image (or no VMM binary): nothing can be cloned
                for template in self.templates.list():
                    if template.record.params.get("backend") == name:
                        self.templates.discard(template.key)
                continue
            if params is not None:
                self.templates.remove_stale(name, params.image_id, params.vmm_id)

    def _template_for(self, backend: Hypervisor, memory_mib: int, vcpus: int,
                      nics: tuple[NicSpec, ...]) -> Template | None:
        """The template to clone for this VM (built now if missing), or None: templates off,
        a backend without them, too many NICs to hot-plug, or no template could be built."""
        from hanabi_vmmd.service import DISKS_PER_SANDBOX, HOTPLUG_SLOTS

        if len(nics) + DISKS_PER_SANDBOX > HOTPLUG_SLOTS:
            return None
        try:
            params = self._template_params(backend, memory_mib, vcpus)
            return self.templates.get(params) if params is not None else None
        except HanabiError as exc:
            log.warning("no vm template, booting cold", extra={"error": exc.message})
            return None

    def _clone_or_boot(self, sid: str, store: StateStore, backend: Hypervisor, memory_mib: int, vcpus: int,
                       nics: tuple[NicSpec, ...] = (), cgroups: Sequence[Path] = ()) -> HypervisorState:
        """`_boot` as a clone of the fitting template where there is one; a clone that does
        not start is logged once, its template discarded (rebuilt at the next use), and the
        VM booted cold. Caller holds sid's lock."""
        template = self._template_for(backend, memory_mib, vcpus, nics)
        if template is not None:
            try:
                return self._boot(sid, store, backend, memory_mib, vcpus, nics, cgroups, template)
            except HanabiError as exc:
                log.warning("clone did not start, booting cold (the template is rebuilt at its next use)",
                            extra={"sandbox": sid, "template": template.key[:12], "error": exc.message})
                self.templates.discard(template.key)
        return self._boot(sid, store, backend, memory_mib, vcpus, nics, cgroups)

    def _build_template(self, params: TemplateParams, build_dir: Path) -> float:
        """The store's builder: boot a VM with its RAM in build_dir/memory (shared), wait for
        its agent, save the device state to build_dir/state, end the VM; boot-to-ready s."""
        from hanabi_vmmd.service import guest_files

        vmm = self.config.vmm
        backend = self._backend(params.backend)
        kernel, initrd = guest_files(vmm.guest_dir)
        share_dir = build_dir / "share" if params.share else None
        if share_dir is not None:
            share_dir.mkdir(mode=0o700)
        spec = VmSpec.in_dir(f"template-{params.key()[:12]}", build_dir, backend.capabilities().files,
                             memory_mib=params.memory_mib,
                             vcpus=params.vcpus, kernel=kernel, initrd=initrd, cmdline=params.cmdline,
                             accel=params.accel, hotplug_slots=params.hotplug_slots, share_dir=share_dir,
                             memory_file=build_dir / MEMORY_NAME, memory_shared=True)
        began = time.monotonic()
        handle = backend.start(spec)
        try:
            # half the boot timeout: the build runs inside the vm.create that needed it, whose
            # caller waits boot_timeout_s + 5 s for the build, the clone and its agent together
            wait_agent_ready(spec.agent_socket, vmm.boot_timeout_s / 2)
            ready_s = time.monotonic() - began
            try:  # an agent without `restored` could not make its clones their own machines
                agent_request(spec.agent_socket, T_RESTORED, restore_fields(spec.sandbox_id),
                              RESTORE_AGENT_TIMEOUT_S)
            except FailedPrecondition as exc:
                raise TemplateUnsupported(f"the guest image at {vmm.guest_dir} cannot make VM templates: "
                                          f"{exc.message} (rebuild it with `hanabi-image build`)") from None
            backend.save_template(handle, build_dir / STATE_NAME, build_dir / MEMORY_NAME)  # type: ignore[attr-defined]  # not in Hypervisor: template backends only
        finally:
            backend.stop(handle, vmm.stop_timeout_s)
        return ready_s

    def _clone_spec(self, spec: VmSpec, template: Template) -> VmSpec:
        """`spec` as a clone of `template`: its RAM the template's file, private; no boot NICs."""
        from dataclasses import replace

        return replace(spec, nics=(), memory_file=template.memory_file, memory_shared=False, incoming=True)

    def _start_clone(self, backend: Hypervisor, spec: VmSpec, template: Template, on_spawned) -> VmHandle:
        return backend.restore(spec, template.state_file, on_spawned)  # type: ignore[attr-defined]  # not in Hypervisor: template backends only

    def _finish_clone(self, state: HypervisorState, backend: Hypervisor, handle: VmHandle,
                      nics: tuple[NicSpec, ...], began: float) -> None:
        """After `cont`: the guest's own RNG, clock and hostname, then its NICs."""
        agent_request(Path(state.agent_socket), T_RESTORED, restore_fields(state.sandbox_id),
                      RESTORE_AGENT_TIMEOUT_S)
        ready_ms = round((time.monotonic() - began) * 1000, 1)
        for nic in nics:
            self.devices.plug_nic(state, backend, handle, nic)
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

