"""Spare clone VMMs: a clone's VMM process started ahead, waiting for its template's state.

From its exec until it answers on QMP a QEMU takes about 50 ms here (loading its libraries,
building the machine), and a clone cannot get its template's state before that. So vmmd keeps
`[vmm] spare_vmms` of them for the template it cloned last: each started with a clone's
command line (the template's RAM mapped private, `-incoming defer`) in a VM directory and
share root of its own, its threads in SCHED_IDLE (a refill must not slow the containers
running), and recorded in `<run_dir>/spares/<id>/hypervisor.json`. A clone takes one: its
threads get the normal policy back, it joins the container's cgroups, gets the template's
state and runs (`Hypervisor.load_clone`); its directories stay the spare's (recorded in the
sandbox's state, as a pooled VM's are). Then another spare is started in the background.

A spare holds no guest: no container's data, no template's pages touched. Its own memory
(QEMU's start-up, about 16 MiB anonymous here) is charged to vmmd's cgroup, as a pooled VM's is; what the clone
touches after the claim is charged to the container's.

Crashes: a claimed spare is recorded as the sandbox's VM before its spare record goes, so a
vmmd killed in between finds the sandbox's record (and re-adopts the VM) and a spare record
for the same process, which it drops. Every other recorded spare is killed when vmmd starts
(`discard_recorded`), and when it stops (`close`): spares are never re-adopted.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from hanabi_common.errors import HanabiError
from hanabi_common.state import StateStore
from hanabi_vmmd import proc, vmm_process
from hanabi_vmmd.hypervisor import Hypervisor, VmHandle, VmSpec
from hanabi_vmmd.state import STATE_NAME, HypervisorState
from hanabi_vmmd.templates import Template

log = logging.getLogger("hanabi.vmmd.spares")
SPARE_PREFIX = "spare-"


def new_spare_id() -> str:
    """A fresh spare's name (its VM directory and share root are named after it)."""
    return SPARE_PREFIX + secrets.token_hex(6)


def template_identity(template: Template) -> tuple[str, float]:
    """What a spare must match to clone `template`: its key (a hash of every parameter, the
    backend among them) and when it was built (a template rebuilt under the same key has a
    new memory file)."""
    return template.key, template.record.created_at


@dataclass
class Spare:
    """A started clone VMM, ready for `load_clone`."""

    spare_id: str
    spec: VmSpec
    handle: VmHandle
    state: HypervisorState  # its record
    template: tuple[str, float]  # template_identity of the template it clones (its backend's too)


# spare_id, template -> the started spare (recorded before it is returned)
Start = Callable[[str, Template, Hypervisor], Spare]
# a spare's record: its directories are removed (VmService._remove_vm_dirs)
RemoveDirs = Callable[[HypervisorState], None]


class SpareVmms:
    """The spares of one vmmd: `take` one for a clone, `want` them for a template (refilled in
    a background thread), `close` kills them."""

    def __init__(self, store: StateStore, count: int, start: Start, remove_dirs: RemoveDirs) -> None:
        self.store = store
        self.count = count
        self._start = start
        self._remove_dirs = remove_dirs
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._pending = 0  # refills submitted and not finished
        self._ready: list[Spare] = []
        self._wanted: tuple[Template, Hypervisor] | None = None
        self._closed = False
        self._refill = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vmmd-spares")

    # -- use -------------------------------------------------------------------------

    def take(self, template: Template, backend: Hypervisor) -> Spare | None:
        """A ready spare for `template` on `backend`, now the caller's (record it, then
        `forget` it); None when there is none. Spares of anything else stay."""
        identity = template_identity(template)
        while True:
            with self._lock:
                spare = next((s for s in self._ready if s.template == identity), None)
                if spare is None:
                    return None
                self._ready.remove(spare)
            if not backend.is_alive(spare.handle):
                log.warning("a spare vmm died while waiting", extra={"spare": spare.spare_id, "pid": spare.handle.pid})
            else:
                try:
                    proc.set_idle_priority(spare.handle.pid, False)
                    return spare
                except OSError as exc:  # it would run as SCHED_IDLE: not a VM to hand out
                    log.warning("a spare vmm's scheduling policy could not be restored, not using it",
                                extra={"spare": spare.spare_id, "error": str(exc)})
            self._discard(spare)

    def forget(self, spare: Spare) -> None:
        """Drop a taken spare's record (the caller recorded the process as a sandbox's VM)."""
        self.store.purge(spare.spare_id)

    def want(self, template: Template, backend: Hypervisor) -> None:
        """Keep `count` spares for `template` (the one cloned last): spares of any other
        template are killed, the missing ones started in the background."""
        if self.count <= 0 or not backend.capabilities().spares:
            return
        identity = template_identity(template)
        with self._lock:
            if self._closed:
                return
            stale = [s for s in self._ready if s.template != identity]
            for spare in stale:
                self._ready.remove(spare)
            self._wanted = (template, backend)
            self._pending += 1
        for spare in stale:
            self._discard(spare)
        try:
            self._refill.submit(self._fill)
        except RuntimeError:  # closed meanwhile
            with self._idle:
                self._pending -= 1
                self._idle.notify_all()

    def settle(self, timeout: float) -> bool:
        """Wait until no refill is running or queued (vm.drain); False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    def ready(self) -> int:
        """How many spares are ready (a gauge)."""
        with self._lock:
            return len(self._ready)

    # -- the refill thread -------------------------------------------------------------

    def _fill(self) -> None:
        try:
            self._fill_up()
        finally:
            with self._idle:
                self._pending -= 1
                self._idle.notify_all()

    def _fill_up(self) -> None:
        while True:
            with self._lock:
                if self._closed or self._wanted is None:
                    return
                template, backend = self._wanted
                identity = template_identity(template)
                have = sum(1 for s in self._ready if s.template == identity)
                if have >= self.count:
                    return
            began = time.monotonic()
            try:
                spare = self._start(new_spare_id(), template, backend)
            except HanabiError as exc:
                log.warning("a spare vmm did not start (clones start their own)", extra={"error": exc.message})
                return
            with self._lock:
                keep = not self._closed and self._wanted is not None and \
                    template_identity(self._wanted[0]) == spare.template
                if keep:
                    self._ready.append(spare)
            if not keep:
                self._discard(spare)
                return
            log.info("spare vmm ready", extra={"spare": spare.spare_id, "pid": spare.handle.pid,
                                               "template": spare.template[0][:12],
                                               "ms": round((time.monotonic() - began) * 1000, 1)})

    # -- ending ----------------------------------------------------------------------

    def _discard(self, spare: Spare) -> None:
        vmm_process.kill_and_reap(spare.handle)
        self._remove_dirs(spare.state)
        self.store.purge(spare.spare_id)

    def discard_recorded(self, owned: set[tuple[int, int]]) -> None:
        """At start: every recorded spare goes (killed unless `owned`: a sandbox's record has
        the same pid and start time, a claim a crash interrupted), its directories with it."""
        for spare_id in self.store.list_sandboxes(having=STATE_NAME):
            try:
                state = self.store.read(spare_id, STATE_NAME, HypervisorState)
            except HanabiError as exc:
                log.error("unreadable spare record, removing it", extra={"spare": spare_id, "error": exc.message})
                state = None
            if state is not None and (state.pid, state.start_time) not in owned:
                handle = state.handle()
                if vmm_process.is_alive(handle):
                    vmm_process.kill_and_reap(handle)
                    log.info("killed a spare vmm of an earlier vmmd", extra={"spare": spare_id, "pid": state.pid})
                self._remove_dirs(state)
            self.store.purge(spare_id)

    def close(self) -> None:
        """Stop refilling and kill every spare (they are never re-adopted)."""
        with self._lock:
            self._closed = True
            spares, self._ready = self._ready, []
        self._refill.shutdown(wait=True)
        with self._lock:
            spares += self._ready
            self._ready = []
        for spare in spares:
            self._discard(spare)

