"""The container lifecycle behind the runc-style commands: create, start, state, kill, delete.

`create` asks the daemons, in order, for a network (netd), a VM (vmmd) and, at the same
time, a root volume (blockd); then for the guest agent (agentd, which waits for the boot),
hot-plugs the volume (vmmd) and prepares the container in the guest (agentd). Last, it
starts the stand-in process that holds the container's stdio and writes the pid file.
Whatever fails on the way is undone: a failed create leaves nothing behind.
"""

from __future__ import annotations

import builtins
import logging
import os
import select
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Iterator, Sequence

from hanabi_common.config import Config
from hanabi_common.errors import (AlreadyExists, FailedPrecondition, HanabiError, Internal,
                                  InvalidArgument, NotFound, Unavailable)
from hanabi_common.ids import validate_id
from hanabi_common.state import StateStore
from hanabi_runtime import pods
from hanabi_runtime.bundle import Bundle, load_bundle
from hanabi_runtime.daemons import Daemons
from hanabi_runtime.mounts import plan_mounts
from hanabi_runtime.resolv import relayed_nameservers
from hanabi_runtime.sizing import vm_size
from hanabi_runtime.procs import START_FIFO, release_standin
from hanabi_runtime.state import (STATE_NAME, RuntimeState, is_same_process_alive,
                                  process_start_time, write_pid_file)
from hanabi_wire.constants import INIT_EXEC_ID

log = logging.getLogger("hanabi.runtime")
STANDIN_READY_TIMEOUT_S = 30.0
LATER_PHASES = ("poststart", "poststop")  # run by start and delete, from the recorded state


class StandinProcess:
    """A stand-in this process started, by pid alone.

    Not a subprocess.Popen on purpose: a Popen object polls (and so may reap) its child
    when it is garbage-collected, and the exit of a detached stand-in belongs to
    containerd's shim, its subreaper, which waits for it to report the container's exit.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def kill(self) -> None:
        """SIGKILL it (gone already is fine)."""
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def wait(self, forward_signals: bool = False) -> int:
        """Reap it; its exit code, or -N when signal N killed it (like Popen.returncode).
        `forward_signals`: SIGINT, SIGTERM, SIGHUP and SIGQUIT received meanwhile go to it."""
        from hanabi_runtime import spawner

        return spawner.current().wait(self.pid, forward_signals)


class PendingStandin(StandinProcess):
    """A stand-in launched early (`Runtime.launch_standin`): its interpreter starts and
    imports while the daemons make the VM; it attaches only once `attach` says go."""

    def __init__(self, pid: int, go_w: int, ready_r: int, cid: str) -> None:
        super().__init__(pid)
        self.cid = cid
        self._go_w: int | None = go_w
        self._ready_r: int | None = ready_r
        self.reaped = False  # by attach(), which failed

    def attach(self) -> None:
        """Let it attach to its process's io stream and wait until it says it is attached;
        Internal (the stand-in killed and reaped) if it says otherwise."""
        assert self._go_w is not None and self._ready_r is not None  # attach() is called once
        try:
            os.write(self._go_w, b"g")
        except BrokenPipeError:
            pass  # it ended already: its ready pipe says why
        finally:
            os.close(self._go_w)
            self._go_w = None
        try:
            message = _read_ready(self._ready_r, STANDIN_READY_TIMEOUT_S)
        finally:
            os.close(self._ready_r)
            self._ready_r = None
        if message != "ok":
            self.kill()
            self.wait()
            self.reaped = True
            raise Internal(f"the stand-in process for {self.cid} failed to start: {message or 'no answer'}")

    def abandon(self) -> None:
        """Close our ends of its pipes (a stand-in whose go pipe ends without a word exits)."""
        for fd in (self._go_w, self._ready_r):
            if fd is not None:
                os.close(fd)
        self._go_w = self._ready_r = None


@dataclass
class Created:
    """What `create` made: the recorded state and the stand-in process."""

    state: RuntimeState
    standin: StandinProcess


class Runtime:
    """The lifecycle operations on the containers of one configuration."""

    def __init__(self, config: Config, root: str | None = None, hypervisor: str | None = None) -> None:
        if hypervisor not in (None, "auto", "qemu", "firecracker"):
            raise InvalidArgument(f"unknown hypervisor {hypervisor!r}: use auto, qemu or firecracker")
        self.config = config
        self.root = root
        self.hypervisor = hypervisor
        self.store = StateStore(config.sandboxes_dir)
        self.daemons = Daemons(config)

    # -- create ------------------------------------------------------------------------
    def create(self, cid: str, bundle_path: str, pid_file: str | None = None,
               *, detach_standin: bool = True, console_socket: str | None = None) -> Created:
        """Create container `cid` from a bundle; on return the stand-in runs and the pid file exists
        (with `console_socket`, the pty master of a terminal: true process has been sent there)."""
        from hanabi_runtime.console import standin_args

        validate_id(cid)
        bundle = load_bundle(bundle_path, cid)
        console = standin_args(bool(bundle.process.get("terminal")), console_socket, detach_standin)
        pod = pods.pod_of(self, cid, bundle) if bundle.pod_sandbox else None
        self._reserve(cid, bundle)
        standin: PendingStandin | None = None
        try:
            fifo = self.store.sandbox_dir(cid) / START_FIFO
            os.mkfifo(fifo, 0o600)
            # Launched first: its interpreter starts while the daemons make the VM (about
            # as long, on a loaded host); it attaches once the container exists in the guest.
            standin = self.launch_standin(cid, fifo, detach_standin, console=console,
                                          args=bundle.process["args"], sandbox=bundle.pod_sandbox)
            if pod is not None:
                timings, cgroup_dirs = pods.provision(self, cid, bundle, pod)
            else:
                timings, cgroup_dirs = self._provision(cid, bundle)
            with _phase(timings, "standin_s"):
                standin.attach()
            from hanabi_runtime import cgroups
            cgroups.join(cgroup_dirs, standin.pid)  # the VM joined them when it was spawned
            state = RuntimeState(id=cid, bundle=str(bundle.path), rootfs=str(bundle.rootfs),
                                 created_at=time.time(), standin_pid=standin.pid,
                                 standin_start_time=process_start_time(standin.pid),
                                 annotations=bundle.annotations, root=self.root, timings=timings,
                                 cgroups=cgroup_dirs, oci_version=bundle.oci_version,
                                 hooks={phase: hooks for phase, hooks in (bundle.config.get("hooks") or {}).items()
                                        if phase in LATER_PHASES and hooks},
                                 sandbox=bundle.pod_sandbox)
            self.store.write(cid, STATE_NAME, state)
            if pid_file:
                write_pid_file(pid_file, standin.pid)
        except BaseException as exc:
            log.warning("create failed, undoing", extra={"container": cid, "error": str(exc)})
            live = standin is not None and not standin.reaped
            self._teardown(cid, standin_pid=standin.pid if standin is not None and live else None,
                           cgroup_dirs=self._cgroup_dirs(bundle), sandbox=bundle.pod_sandbox)
            if standin is not None and live:
                standin.abandon()
                standin.wait()
            raise
        return Created(state=state, standin=standin)

    def _reserve(self, cid: str, bundle: Bundle) -> None:
        directory = self.store.sandbox_dir(cid)
        directory.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            directory.mkdir(mode=0o700)
        except FileExistsError:
            raise AlreadyExists(f"container {cid} already exists (if it is a leftover, "
                                f"`hanabi-runtime delete --force {cid}` removes it)") from None
        self.store.write(cid, STATE_NAME, RuntimeState(
            id=cid, bundle=str(bundle.path), rootfs=str(bundle.rootfs), created_at=time.time(),
            annotations=bundle.annotations, root=self.root, sandbox=bundle.pod_sandbox))

    @staticmethod
    def _cgroup_dirs(bundle: Bundle) -> list[str]:
        from hanabi_runtime import cgroups

        path = bundle.config.get("linux", {}).get("cgroupsPath")
        try:
            relative = cgroups.normalize(path) if path else None
        except HanabiError:
            return []
        return [str(h / relative) for h in cgroups.hierarchies()] if relative else []

    @staticmethod
    def _make_cgroups(bundle: Bundle) -> list[str]:
        """The container's host cgroups, made before its VM: vmmd puts the VM in them as it
        spawns it, the stand-in joins after (for `docker stats`)."""
        from hanabi_runtime import cgroups

        path = bundle.config.get("linux", {}).get("cgroupsPath")
        return cgroups.place(cgroups.normalize(path), []) if path else []

    def _network(self, cid: str, bundle: Bundle):
        """The container's network namespace (joined, or made by netd when the config asks
        for a new one), the prestart/createRuntime hooks run with a thread of ours parked in
        it (Docker's hook puts the endpoint there), then netd's wiring of what is inside."""
        from hanabi_common.netns import NetnsHolder
        from hanabi_runtime.hooks import CREATE_PHASES, hook_state, run_phase

        netd = self.daemons.netd
        netns_path = bundle.netns_path
        if netns_path is None and bundle.new_netns:
            netns_path = netd.create_netns(cid).path
        if any((bundle.config.get("hooks") or {}).get(phase) for phase in CREATE_PHASES):
            with NetnsHolder(netns_path) if netns_path else nullcontext() as holder:
                state = hook_state(cid, str(bundle.path), holder.tid if holder else os.getpid(), "creating",
                                   bundle.annotations, bundle.oci_version)
                for phase in CREATE_PHASES:
                    run_phase(bundle.config, phase, state, must_succeed=True)
        return netd.attach(cid, netns_path)

    def _resolved_hypervisor(self):
        """vmmd's choice for the flag, else the config: the backend (`auto` is decided by
        vmmd, the one place that decides it) and its disk formats."""
        return self.daemons.vmmd.backend(self.hypervisor or self.config.vmm.hypervisor)

    def _provision(self, cid: str, bundle: Bundle):
        """Ask the daemons for network, VM, volume, agent and container; return phase timings
        and the container's host cgroups (the VM is in them already)."""
        from hanabi_common.models.agentd import (ConfigureNetwork, CreateContainer, DiskSpec, GuestMount,
                                                 RootfsSpec)
        from hanabi_common.models.vmmd import VmNic
        from hanabi_runtime.guest_linux import guest_linux

        d = self.daemons
        timings: dict[str, float] = {}
        plan = plan_mounts(bundle.config.get("mounts"))
        # Firecracker opens raw disks only; QEMU takes a qcow2 layer over a shared base.
        # `auto` is resolved here, so the disk format and the VM's backend agree.
        choice = self._resolved_hypervisor()
        hypervisor, formats = choice.backend, list(choice.disk_formats)
        cgroup_dirs = self._make_cgroups(bundle)

        def nics_of(network) -> list[VmNic]:
            return [VmNic(tap=i.tap, mac=i.mac, mtu=i.mtu, netns_path=network.netns_path)
                    for i in network.interfaces]
        with ThreadPoolExecutor(max_workers=2) as pool:
            # QEMU hot-plugs NICs (a clone gets its NICs hot-plugged in any case), so the
            # network (netd, and the prestart hooks: Docker's is a run of dockerd's binary,
            # 0.06-0.1 s) is made while vmmd makes the VM; Firecracker takes NICs at boot only.
            network_future = pool.submit(_timed, timings, "network_s", self._network, cid, bundle) \
                if hypervisor == "qemu" else None
            if network_future is None:
                with _phase(timings, "network_s"):
                    network = self._network(cid, bundle)

            def provision(share_root: str | None = None):
                return pool.submit(_timed, timings, "volume_s", d.blockd.provision,
                                   cid, str(bundle.rootfs), bundle.readonly, plan.binds, formats,
                                   share_root, cid)
            # A block rootfs is built while the VM boots; a shared one needs the VM's share.
            want_share = self.config.block.rootfs == "share"
            volume_future = None if want_share else provision()
            try:
                with _phase(timings, "vm_start_s"):
                    size = vm_size(bundle.config.get("linux", {}).get("resources"))
                    vm = d.vmmd.create(cid, memory_mib=size.memory_mib, vcpus=size.vcpus, hypervisor=hypervisor,
                                       nics=nics_of(network) if network_future is None else [],
                                       cgroup_dirs=cgroup_dirs)
                if network_future is not None:
                    network = network_future.result()
                    with _phase(timings, "nic_hotplug_s"):
                        for nic in nics_of(network):
                            d.vmmd.attach_nic(cid, nic)
                if volume_future is None:
                    if vm.share_dir is None:
                        log.info("the VM has no file share: binds are copies, root-fs writes stay "
                                 "in its layer", extra={"container": cid, "hypervisor": vm.hypervisor})
                    volume_future = provision(vm.share_dir)
                with _phase(timings, "agent_ready_s"):
                    d.agentd.connect(cid, vm.agent_socket, transport=vm.agent_transport, port=vm.agent_port)
                with _phase(timings, "guest_network_s"):
                    relay = relayed_nameservers(bundle.config.get("mounts")) if network.netns_path else []
                    d.agentd.configure_network(ConfigureNetwork(
                        sandbox_id=cid, interfaces=network.interfaces, routes=network.routes,
                        dns_relay=relay, dns_netns=network.netns_path if relay else None))
            finally:
                volume = volume_future.result() if volume_future is not None else None
        assert volume is not None  # provisioned above (a failure there raised)
        guest_serials: dict[str, str] = {}
        with _phase(timings, "disk_hotplug_s"):
            # Attached writable even for a read-only root: the image is this container's own
            # copy, and the guest makes mount points before it remounts the root read-only.
            disks = [v for v in (volume, volume.binds) if v is not None and v.layout != "share"]
            for disk in disks:
                attached = d.vmmd.attach_disk(cid, disk.path, disk.serial, disk.format, False)
                guest_serials[disk.serial] = attached.guest_serial or disk.serial  # Firecracker's differ
        linux = guest_linux(bundle.config, seccomp=self.config.agent.seccomp)
        if not self.config.agent.seccomp and (bundle.config.get("linux") or {}).get("seccomp"):
            log.warning("guest seccomp is off ([agent] seccomp = false): the container runs without "
                        "its seccomp profile", extra={"container": cid})
        if volume.layout == "share":
            rootfs = RootfsSpec(share=f"{volume.share}/rootfs", fstype="9p", readonly=bundle.readonly)
        else:
            rootfs = RootfsSpec(serial=guest_serials[volume.serial], fstype=volume.fstype,
                                readonly=bundle.readonly)
        with _phase(timings, "container_create_s"):
            d.agentd.create_container(CreateContainer(
                sandbox_id=cid, container_id=cid, rootfs=rootfs,
                process=bundle.process, hostname=bundle.hostname,
                mounts=[GuestMount(**m) for m in plan.guest], share=volume.share,
                mounts_disk=DiskSpec(serial=guest_serials[volume.binds.serial], fstype=volume.binds.fstype)
                if volume.binds else None, linux=linux))
        return timings, cgroup_dirs

    def spawn_standin(self, cid: str, fifo: Path | None, detach: bool, exec_id: str = INIT_EXEC_ID,
                      console: list[str] | None = None, args: Sequence[str] = (),
                      sandbox: str | None = None) -> StandinProcess:
        """Start a stand-in for one process of `cid` and wait until it is attached.
        `console`: its terminal arguments, from `console.standin_args`; `args`: the command
        it stands for (its process title, which host ps and `docker top` show); `sandbox`:
        the pod sandbox whose VM runs it (default: its own)."""
        proc = self.launch_standin(cid, fifo, detach, exec_id, console, args, sandbox)
        proc.attach()
        return proc

    def launch_standin(self, cid: str, fifo: Path | None, detach: bool, exec_id: str = INIT_EXEC_ID,
                       console: list[str] | None = None, args: Sequence[str] = (),
                       sandbox: str | None = None) -> PendingStandin:
        """Start a stand-in (as `spawn_standin`) that waits, its imports done, for
        `attach()` to let it attach: `create` launches it before the VM is made."""
        ready_r, ready_w = os.pipe()
        go_r, go_w = os.pipe()
        argv = [sys.executable, "-m", "hanabi_runtime.standin", "--sandbox", sandbox or cid,
                "--container", cid, "--exec-id", exec_id, "--ready-fd", str(ready_w),
                "--go-fd", str(go_r), "--title", " ".join(args)[:512]]
        if fifo is not None:
            argv += ["--start-fifo", str(fifo)]
        if self.config.source:
            argv += ["--config", str(self.config.source)]
        argv += console or []
        try:
            from hanabi_runtime import spawner

            pid = spawner.current().spawn(argv, {ready_w: ready_w, go_r: go_r}, setsid=detach)
        except BaseException:
            os.close(go_w)
            os.close(ready_r)
            raise
        finally:
            os.close(ready_w)
            os.close(go_r)
        return PendingStandin(pid, go_w, ready_r, cid)

    # -- start -------------------------------------------------------------------------
    def start(self, cid: str) -> None:
        """Start the container's process (it must be `created`)."""
        state = self.load(cid)
        status = self.status(state)
        if status != "created":
            raise FailedPrecondition(f"container {cid} is {status}, not created: cannot start it")
        self.daemons.agentd.start(state.vm_id, cid)
        self.store.write(cid, STATE_NAME, state.model_copy(update={"started": True}))
        release_standin(self.store.sandbox_dir(cid) / START_FIFO, cid)
        self._run_later_hooks(state, "poststart", "running")

    @staticmethod
    def _run_later_hooks(state: RuntimeState, phase: str, status: str) -> None:
        """poststart/poststop hooks recorded at create; a failure is logged, not raised."""
        if state.hooks.get(phase):
            from hanabi_runtime.hooks import hook_state, run_phase

            run_phase({"hooks": state.hooks}, phase,
                      hook_state(state.id, state.bundle, state.standin_pid or 0, status, state.annotations,
                                 state.oci_version), must_succeed=False)

    # -- state -------------------------------------------------------------------------
    def load(self, cid: str) -> RuntimeState:
        """The recorded state of a container; NotFound if there is none."""
        validate_id(cid)
        state = self.store.read(cid, STATE_NAME, RuntimeState)
        if state is None:
            raise NotFound(f"container {cid} does not exist")
        return state

    def status(self, state: RuntimeState) -> str:
        """creating, created, running or stopped."""
        if state.standin_pid is None:
            return "creating"
        standin_alive = is_same_process_alive(state.standin_pid, state.standin_start_time)
        if not state.started:
            return "created" if standin_alive else "stopped"
        try:
            status = self.daemons.agentd.state(state.vm_id, state.id).status
        except (Unavailable, NotFound) as exc:
            log.debug("agentd could not tell the status", extra={"error": str(exc)})
            status = "running" if standin_alive else "stopped"
        return "paused" if status == "running" and state.paused else status

    def exec_records(self, cid: str) -> list:
        """The exec'd processes recorded for a container."""
        from hanabi_runtime.execs import EXEC_PREFIX, ExecRecord

        directory = self.store.sandbox_dir(cid)
        if not directory.is_dir():
            return []
        records = []
        for path in sorted(directory.glob(f"{EXEC_PREFIX}*.json")):
            try:
                record = self.store.read(cid, path.stem, ExecRecord)
            except HanabiError:
                continue
            if record is not None:
                records.append(record)
        return records

    def list(self) -> list[tuple[RuntimeState, str]]:
        """Every container with its status."""
        result = []
        for cid in self.store.list_sandboxes(having=STATE_NAME):
            try:
                state = self.load(cid)
            except HanabiError:
                continue
            result.append((state, self.status(state)))
        return result

    # -- pause / resume -----------------------------------------------------------------
    def pause(self, cid: str) -> None:
        """Freeze the container: its whole VM stops running (QMP stop)."""
        state = self.load(cid)
        status = self.status(state)
        if status != "running":
            raise FailedPrecondition(f"container {cid} is {status}, not running: cannot pause it")
        self._refuse_pod_member(state, "pause")
        self.daemons.vmmd.pause(cid)
        self.store.write(cid, STATE_NAME, state.model_copy(update={"paused": True}))

    def resume(self, cid: str) -> None:
        """Let a paused container's VM run again."""
        state = self.load(cid)
        status = self.status(state)
        if status != "paused":
            raise FailedPrecondition(f"container {cid} is {status}, not paused: cannot resume it")
        self._refuse_pod_member(state, "resume")
        self.daemons.vmmd.resume(cid)
        self.store.write(cid, STATE_NAME, state.model_copy(update={"paused": False}))

    @staticmethod
    def _refuse_pod_member(state: RuntimeState, verb: str) -> None:
        """pause/resume freeze the whole VM: not for one container of a pod."""
        if state.sandbox is not None:
            raise FailedPrecondition(f"cannot {verb} container {state.id} alone: it runs in the VM of pod "
                                     f"sandbox {state.sandbox}, and {verb} acts on the whole VM")

    # -- kill --------------------------------------------------------------------------
    def kill(self, cid: str, signum: int, all_processes: bool = False) -> None:
        """Send a signal to the container's process (or all of them)."""
        state = self.load(cid)
        status = self.status(state)
        if status == "created":
            # Nothing runs in the guest yet: the stand-in stands for the process.
            assert state.standin_pid is not None  # "created" means its stand-in is alive
            os.kill(state.standin_pid, signum)
            return
        if status == "stopped" and all_processes:
            return  # as runc: none of its processes is left to signal
        if status != "running":
            # "container not running": runc's words, which containerd's shim reads as "gone"
            raise FailedPrecondition(f"container {cid} is {status} (container not running): cannot send it a signal")
        self.daemons.agentd.signal(state.vm_id, cid, signum, all_processes=all_processes)

    # -- delete ------------------------------------------------------------------------
    def delete(self, cid: str, force: bool = False) -> None:
        """Remove the container: a running one only with force. Returns once the container
        cannot run and what it held is recorded in the daemons' release queues; they finish
        the removal in the background (`hanabi_runtime.teardown`, which the lean CLI runs too)."""
        validate_id(cid)
        state = self.store.read(cid, STATE_NAME, RuntimeState)
        if state is None and not self.store.sandbox_dir(cid).exists():
            if force:
                return
            raise NotFound(f"container {cid} does not exist")
        if state is not None and not force:
            status = self.status(state)
            if status in ("running", "creating"):
                raise FailedPrecondition(f"cannot delete container {cid} that is {status}: "
                                         "stop it first or use --force")
        if state is None or state.sandbox is None:
            # A pod's sandbox goes last: its app containers (containerd removes them first;
            # whatever is left is removed here) before the VM they run in.
            for member in pods.members(self.store, cid):
                try:
                    self.delete(member, force=True)
                except HanabiError as exc:
                    log.warning("app container of the pod not removed cleanly",
                                extra={"container": member, "sandbox": cid, "error": exc.message})
        try:
            self._teardown(cid, standin_pid=state.standin_pid if state else None,
                           standin_start=state.standin_start_time if state else None,
                           cgroup_dirs=state.cgroups if state else [],
                           sandbox=state.sandbox if state else None, paused=bool(state and state.paused))
        finally:
            if state is not None:
                self._run_later_hooks(state, "poststop", "stopped")

    def _call(self, daemon: str, method: str, body: dict) -> object:
        return getattr(self.daemons, daemon).rpc.call(method, body, idempotent=True)

    def _teardown(self, cid: str, standin_pid: int | None, standin_start: int | None = None,
                  cgroup_dirs: builtins.list[str] | None = None, sandbox: str | None = None,
                  paused: bool = False) -> None:
        """One release RPC per daemon, the stand-ins, the state (`hanabi_runtime.teardown`).
        A daemon that is down keeps its state file and the sandbox is marked disowned:
        that daemon finishes the job when it starts (`hanabi_common.disowned`). An app
        container of a pod (`sandbox`: the pod's) has only its container in the pod's VM
        and its share entries: the VM and the network are the pod's."""
        from hanabi_runtime.teardown import teardown

        def standins() -> list:
            return [(standin_pid, standin_start)] + [
                (record.standin_pid, record.standin_start_time) for record in self.exec_records(cid)]
        teardown(cid, self._call, str(self.store.root), standins, cgroup_dirs, sandbox=sandbox, paused=paused)


def open_runtime(config: str | os.PathLike | None, root: str | None, hypervisor: str | None) -> Runtime:
    """The Runtime of a CLI call (`--config`, `--root`, `--hypervisor`); the config file's
    text is stamped as validated for the lean paths (`lean.records`) when it was read whole."""
    from hanabi_common.config import config_path, load_config

    explicit = Path(config) if config is not None else None
    path = config_path(explicit)
    text = _config_text(path)
    runtime = Runtime(load_config(explicit), root=root, hypervisor=hypervisor)
    if text is not None and text == _config_text(path):  # the text the models accepted
        from hanabi_runtime.lean.records import stamp_config
        stamp_config(runtime.config.run_dir, path, text)
    return runtime


def _config_text(path: Path | None) -> str | None:
    try:
        return path.read_bytes().decode() if path is not None else None
    except (OSError, UnicodeDecodeError):
        return None


def refuse_preserve_fds(container_id: str, count: int) -> None:
    """Extra file descriptors cannot cross into the VM: refuse them instead of dropping them."""
    if count:
        raise InvalidArgument(f"container {container_id}: --preserve-fds {count} is not supported: "
                              "file descriptors of the host cannot be passed into the container's VM")


@contextmanager
def _phase(timings: dict[str, float], name: str) -> Iterator[None]:
    """Record how long the block took, in seconds, under `name`."""
    started = time.monotonic()
    try:
        yield
    finally:
        timings[name] = round(time.monotonic() - started, 4)


def _timed(timings: dict[str, float], name: str, func, *args):
    """Call `func(*args)`, recording its duration (for work handed to a thread)."""
    with _phase(timings, name):
        return func(*args)


def _read_ready(fd: int, timeout: float) -> str:
    """Read the stand-in's one-line readiness message."""
    deadline = time.monotonic() + timeout
    data = b""
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0:
            return "timed out waiting for it"
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace").strip()
