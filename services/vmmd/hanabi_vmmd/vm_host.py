"""What the VM templates' part (`CloneOps`, still a mixin) uses of the service, declared
once for the type checker. (Hot-plug and the warm pool are parts the service holds,
`devices.Devices` and `pooling.Pooling`, each typed by a Protocol of what it uses.)

`VmService` (service.py) mixes CloneOps in and defines all of this; CloneOps inherits
`VmHost`, so mypy checks both its use and `VmService`'s definitions against these
declarations. Nothing here runs: the attributes are annotations only and the methods exist
only while type checking.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path

    from hanabi_common.config import Config
    from hanabi_common.state import StateStore
    from hanabi_vmmd.accel import AccelDecision
    from hanabi_vmmd.hypervisor import Hypervisor, NicSpec, VmHandle
    from hanabi_common.locks import KeyedLocks
    from hanabi_vmmd.devices import Devices
    from hanabi_vmmd.pool import WarmPool
    from hanabi_vmmd.reaper import Reaper
    from hanabi_vmmd.state import HypervisorState
    from hanabi_vmmd.templates import Template, TemplateStore


class VmHost:
    """The service's state and helpers its parts share (see the module docstring)."""

    config: Config
    store: StateStore
    pool_store: StateStore
    backends: dict[str, Hypervisor]
    accel: AccelDecision
    locks: KeyedLocks
    reaper: Reaper
    templates: TemplateStore
    pool: WarmPool
    devices: Devices
    _handles: dict[str, VmHandle]

    if TYPE_CHECKING:
        def _backend(self, name: str) -> Hypervisor:
            raise NotImplementedError

        def _read(self, sandbox_id: str) -> HypervisorState:
            raise NotImplementedError

        def _write(self, state: HypervisorState, store: StateStore | None = None) -> None:
            raise NotImplementedError

        def _handle(self, state: HypervisorState) -> VmHandle:
            raise NotImplementedError

        def _running(self, sandbox_id: str, *allowed: str) -> tuple[HypervisorState, Hypervisor, VmHandle]:
            raise NotImplementedError

        def _remove_vm_dirs(self, state: HypervisorState) -> None:
            raise NotImplementedError

        def _boot(self, sid: str, store: StateStore, backend: Hypervisor, memory_mib: int, vcpus: int,
                  nics: tuple[NicSpec, ...] = (), cgroups: Sequence[Path] = (),
                  template: Template | None = None) -> HypervisorState:
            raise NotImplementedError

        def _clone_or_boot(self, sid: str, store: StateStore, backend: Hypervisor, memory_mib: int, vcpus: int,
                           nics: tuple[NicSpec, ...] = (), cgroups: Sequence[Path] = ()) -> HypervisorState:
            raise NotImplementedError
