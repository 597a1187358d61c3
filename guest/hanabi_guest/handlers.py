"""Request handlers of the in-guest agent (one method per request type).

A handler returns the ``result`` object of the reply, or ``PENDING`` when it replies later
(create_container waits for its disk, destroy_container for its processes to die, shutdown
powers off after the reply went out). Errors are raised (``AgentError``, ``SpawnError``,
``SandboxError``, ``OSError``, ``ValueError``) and turned into error replies by the loop.
``Handlers`` is a mixin of ``agent.Agent``, which provides the loop primitives it uses.
Every request reaches its handler checked against its definition (``hanabi_wire.messages``:
types, id patterns, ranges, defaults filled in); handlers check what depends on state.

STDLIB ONLY: runs inside the guest.
"""

from __future__ import annotations

import errno
import os
import signal
import time

import hanabi_wire as P
from hanabi_wire.ocispec.process import check_process

from .core import (AGENT_VERSION, CREATED, CREATING, DESTROYING, PENDING, RUNNING, AgentError,
                   Container, Pending, Proc, check_rootfs, log)
from .mounts import check_mounts
from .dnsrelay import DnsRelay
from .network import check_network
from .namespaces import Namespaces, plan
from .hardening import Hardener, Security, ensure_warm, freeze_for_template, prepare
from .process import Held, initial_size, make_guard, set_winsize, spawn, spawn_held
from .sandbox import Sandbox

DISK_WAIT_S = 10.0
DESTROY_WAIT_S = 5.0

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any
    from collections.abc import Callable

    Result = dict[str, Any] | Pending


def uptime() -> float:
    try:
        with open("/proc/uptime", encoding="ascii") as f:
            return float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return time.monotonic()


class Handlers:
    """Request handlers; mixed into ``Agent``."""

    sandbox: Sandbox
    dns: DnsRelay
    containers: dict[str, Container]
    running: bool
    restores = 0  # `restored` requests handled (the first one is the VM template's)

    if TYPE_CHECKING:  # provided by Agent / ProcIO (stubs here would shadow them)
        def send(self, msg: dict[str, Any]) -> None: ...
        def call_later(self, delay: float, fn: Callable[[], None]) -> None: ...
        def add_proc(self, proc: Proc) -> None: ...
        def kill_container(self, c: Container, sig: int) -> None: ...
        def flush_blocking(self, timeout: float) -> None: ...
        def drop_proc(self, proc: Proc) -> None: ...
        def stdin_progress(self, proc: Proc) -> None: ...
        def watch_oom(self, c: Container) -> None: ...
        def unwatch_oom(self, c: Container) -> None: ...

    def handlers(self) -> dict[str, Callable[[int, dict[str, Any]], Result]]:
        return {
            P.T_PING: self.h_ping,
            P.T_CREATE_CONTAINER: self.h_create_container,
            P.T_START: self.h_start,
            P.T_EXEC: self.h_exec,
            P.T_SIGNAL: self.h_signal,
            P.T_CLOSE_STDIN: self.h_close_stdin,
            P.T_RESIZE: self.h_resize,
            P.T_PS: self.h_ps,
            P.T_DESTROY_CONTAINER: self.h_destroy_container,
            P.T_SHUTDOWN: self.h_shutdown,
            P.T_SYNC: self.h_sync,
            P.T_CONFIGURE_NETWORK: self.h_configure_network,
            P.T_RESTORED: self.h_restored,
        }

    def container(self, msg: dict[str, Any]) -> Container:
        cid = msg["container_id"]
        c = self.containers.get(cid)
        if c is None:
            raise AgentError(P.E_NOT_FOUND, f"container {cid} not found")
        return c

    def h_ping(self, req_id: int, msg: dict[str, Any]) -> Result:
        mismatch = P.version_mismatch(msg["protocol"], P.PROTOCOL_VERSION)
        if mismatch is not None:
            raise AgentError(P.E_FAILED_PRECONDITION, mismatch)
        return {"agent_version": AGENT_VERSION, "kernel": os.uname().release, "uptime_s": uptime(),
                "protocol": P.PROTOCOL_VERSION}

    def h_create_container(self, req_id: int, msg: dict[str, Any]) -> Result:
        cid = msg["container_id"]
        if cid in self.containers:
            raise AgentError(P.E_ALREADY_EXISTS, f"container {cid} already exists")
        process = msg["process"]
        ensure_warm()
        try:
            check_process(process)
        except ValueError as exc:
            raise AgentError(P.E_INVALID_ARGUMENT, str(exc)) from None
        c = Container(cid, process, msg["hostname"], check_rootfs(msg["rootfs"]))
        c.mounts = check_mounts(msg["mounts"])
        c.mounts_disk = msg["mounts_disk"]
        c.share = msg["share"]
        c.security = Security.build(msg["linux"], msg["hostname"])
        c.join = self._check_join(cid, msg["join_namespaces"])
        spec = c.security.spec
        if spec is not None and spec.userns:
            from hanabi_wire.ocispec.linux import check_user_mapped

            from .mounts import tmpfs_in_user_namespace

            check_user_mapped(process, spec)
            c.mounts = tmpfs_in_user_namespace(c.mounts, spec.uid_map, spec.gid_map)
        self.containers[cid] = c
        deadline = time.monotonic() + DISK_WAIT_S
        self._poll_disk(req_id, c, deadline)
        return PENDING

    def _poll_disk(self, req_id: int, c: Container, deadline: float) -> None:
        if self.containers.get(c.cid) is not c:
            return
        try:
            source = self.sandbox.locate(c.rootfs_spec)
            if c.share is not None:  # binds live in the container's share directory
                binds: str | None = self.sandbox.share_path(c.share)
            else:
                binds = self.sandbox.locate(c.mounts_disk) if c.mounts_disk else ""
            if source is None or binds is None:
                if time.monotonic() >= deadline:
                    missing = c.rootfs_spec if source is None else (c.mounts_disk or {"share": c.share})
                    what = (f"share directory {missing['share']!r}" if missing.get("share")
                            else f"block device with serial {missing['serial']!r}")
                    raise AgentError(P.E_NOT_FOUND, f"no {what} appeared within {DISK_WAIT_S:.0f} s")
                self.call_later(0.01, lambda: self._poll_disk(req_id, c, deadline))
                return
            c.root = self.sandbox.setup(c.cid, source, c.rootfs_spec)
            self.sandbox.add_mounts(c.root, binds or None, c.mounts, shared=c.share is not None)
            if self.sandbox.use_chroot:
                prepare(c.root, c.security)
            if c.hostname:
                self.sandbox.set_hostname(c.hostname)
        except Exception as exc:  # noqa: BLE001 - every failure becomes the reply
            del self.containers[c.cid]
            c.security.release()
            if c.root is not None:
                self.sandbox.teardown(c.root)
            self.send(error_reply(req_id, exc))
            return
        c.state = CREATED
        self.watch_oom(c)
        self.send(P.reply_ok(req_id, {}))
        c.security.compile_soon()
        self.call_later(0.0, lambda: self._make_init(c))

    def _make_init(self, c: Container) -> None:
        """Once create has replied, make the container's init (``spawn_held``: forked into its
        namespaces, its linux settings applied, in its rootfs) to wait there for ``start``,
        which only lets it exec: what runc's create and start split the same way, done while
        the host goes on to start it. Any failure here is left for ``start`` to meet again and
        report as it would have (it spawns the init itself then); so is a container whose
        init shares other containers' namespaces, has a user namespace or a terminal (those
        spawn at start, as always)."""
        spec = c.security.spec
        if (self.containers.get(c.cid) is not c or c.state != CREATED or c.held is not None
                or P.INIT_EXEC_ID in c.procs or c.join or c.process.get("terminal")
                or (spec is not None and spec.userns) or not self.sandbox.use_chroot
                or not self.sandbox.use_pid_namespace):
            return
        try:
            held = self._spawn_ns(c, P.INIT_EXEC_ID, c.process, hold=True)
        except Exception:  # noqa: BLE001 - start spawns it and reports what fails
            return
        assert isinstance(held, Held)
        c.held = held

    def drop_held(self, c: Container) -> None:
        """End the init made ahead of ``start`` (destroy, or a signal before start, which
        reaches no process of a created container)."""
        held, c.held = c.held, None
        if held is not None:
            held.discard()

    def _check_join(self, cid: str, join: dict[str, Any] | None) -> dict[str, str]:
        """``join_namespaces``: each names another container of this VM (a pod's sandbox)."""
        out = {kind: other for kind, other in (join or {}).items() if other is not None}
        for kind, other in out.items():
            if other == cid or other not in self.containers:
                raise AgentError(P.E_NOT_FOUND, f"container {cid}: join_namespaces.{kind}: container {other} "
                                 "is not in this VM")
            if c_spec := self.containers[other].security.spec:
                if kind not in c_spec.namespaces:
                    raise AgentError(P.E_FAILED_PRECONDITION, f"container {cid}: join_namespaces.{kind}: "
                                     f"container {other} has no {kind} namespace of its own")
        return out

    def _joined_fds(self, c: Container) -> list[tuple[int, int]]:
        """Open the namespaces ``c``'s init joins (``join_namespaces``), from the running
        inits of the containers named; AgentError when one of them does not run."""
        from .namespaces import OTHER_FLAGS

        fds: list[tuple[int, int]] = []
        try:
            for kind, other in sorted(c.join.items()):
                target = self.containers.get(other)
                init = target.procs.get(P.INIT_EXEC_ID) if target is not None else None
                if init is None or not init.alive:
                    raise AgentError(P.E_FAILED_PRECONDITION, f"container {c.cid}: the {kind} namespace it "
                                     f"shares is container {other}'s, whose process does not run")
                fds.append((os.open(f"/proc/{init.pid}/ns/{kind}", os.O_RDONLY | os.O_CLOEXEC), OTHER_FLAGS[kind]))
        except BaseException:
            for fd, _ in fds:
                os.close(fd)
            raise
        return fds

    def _namespaces(self, c: Container, exec_id: str) -> Namespaces | None:
        """The namespaces of a new process of ``c``: new ones for its init (but those it
        joins, ``c.join``), the init's for an exec while the init runs; None (the guest's)
        without a running init or namespaces."""
        init = c.procs.get(P.INIT_EXEC_ID)
        how = plan(self.sandbox.use_pid_namespace, exec_id == P.INIT_EXEC_ID,
                   init.pid if init is not None and init.alive else None)
        spec = c.security.spec
        others = tuple(spec.namespaces) if spec is not None else ()
        uid_map, gid_map = (spec.uid_map, spec.gid_map) if spec is not None else ([], [])
        if how == "new":
            return Namespaces.new(self.sandbox.ns_hide_scope, others, spec.time_offsets if spec else None,
                                  uid_map, gid_map, joined=self._joined_fds(c))
        if how == "join":
            assert init is not None
            try:
                return Namespaces.join(init.pid, others=others + tuple(sorted(c.join)),
                                       uid_map=uid_map, gid_map=gid_map)
            except OSError:
                return None  # the init just exited (a zombie has no namespaces)
        return None

    def _spawn_ns(self, c: Container, exec_id: str, process: dict[str, Any],
                  tty: int | None = None, hold: bool = False) -> Any:
        """``spawn`` in the namespaces ``_namespaces`` picks, falling back to the guest's when
        the kernel has no PID namespaces or the init's namespace stopped taking processes
        (``hold``: ``spawn_held``, a ``Held`` process)."""
        assert c.root is not None
        check_process(process)
        sec = c.security
        filt = sec.filter()  # waits for its compilation; before any namespace fd or fork
        for other in self.containers.values():  # no other container's compilation runs at the fork
            other.security.settle()
        ns = self._namespaces(c, exec_id)
        if ns is None and sec.spec is not None and sec.spec.userns and self.sandbox.use_pid_namespace:
            raise AgentError(P.E_FAILED_PRECONDITION, f"container {c.cid} has no running init, whose user "
                             "namespace (linux.namespaces type user) a process must join")
        hardener = None
        if ns is not None and not ns.joining and sec.spec is not None:
            hardener = Hardener(sec.spec, c.hostname, c.root.cgroup)
        guard = make_guard(process, filt, hardener)
        how = spawn_held if hold else spawn
        try:
            return how(process, c.root.path, chroot=self.sandbox.use_chroot, cgroup=c.root.cgroup,
                       tty=tty, ns=ns, guard=guard)
        except OSError as exc:  # raised in the agent: unshare/setns/fork (the child's errors are SpawnError)
            if ns is None:
                raise
            if ns.joining:
                if exc.errno != errno.ENOMEM:  # ENOMEM: its PID 1 is exiting
                    raise
            elif exc.errno in (errno.EINVAL, errno.ENOSYS) and not ns.uid_map:
                log(f"no PID namespaces ({exc}): container processes share the guest's")
                self.sandbox.use_pid_namespace = False
            else:
                raise
        finally:
            if ns is not None:
                ns.close()
        return how(process, c.root.path, chroot=self.sandbox.use_chroot, cgroup=c.root.cgroup, tty=tty,
                   guard=make_guard(process, filt))

    def _spawn(self, c: Container, exec_id: str, process: dict[str, Any]) -> Proc:
        assert c.root is not None
        held, c.held = (c.held, None) if exec_id == P.INIT_EXEC_ID else (None, c.held)
        started = held.release() if held is not None else None  # None: it did not wait (or it ended)
        if started is not None:
            pid, stdin_fd, out_fd, err_fd = started
            proc = Proc(c.cid, exec_id, pid, list(process["args"]), stdin_fd, out_fd, err_fd)
        elif isinstance(process, dict) and process.get("terminal"):
            proc = self._spawn_on_pty(c, exec_id, process)
        else:
            pid, stdin_fd, out_fd, err_fd = self._spawn_ns(c, exec_id, process)
            proc = Proc(c.cid, exec_id, pid, list(process["args"]), stdin_fd, out_fd, err_fd)
        c.procs[exec_id] = proc
        self.add_proc(proc)
        return proc

    def _spawn_on_pty(self, c: Container, exec_id: str, process: dict[str, Any]) -> Proc:
        """``terminal: true``: the process gets a pty slave; its master is relayed as stdout
        (reads) and fed by stdin events (writes through a dup), a third dup takes resizes."""
        assert c.root is not None
        try:
            check_process(process)
        except ValueError as exc:
            raise AgentError(P.E_INVALID_ARGUMENT, str(exc)) from None
        master, slave = self.sandbox.open_pty(c.root)
        fds = [master]
        try:
            size = initial_size(process)
            if size is not None:
                set_winsize(master, *size)
            pid, _, _, _ = self._spawn_ns(c, exec_id, process, tty=slave)
            os.set_blocking(master, False)
            fds.append(os.dup(master))
            fds.append(os.dup(master))
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        finally:
            os.close(slave)
        return Proc(c.cid, exec_id, pid, list(process["args"]), fds[1], master, None, tty_fd=fds[2])

    def h_start(self, req_id: int, msg: dict[str, Any]) -> Result:
        c = self.container(msg)
        if c.state != CREATED:
            raise AgentError(P.E_FAILED_PRECONDITION, f"container {c.cid} is {c.state}, not created")
        proc = self._spawn(c, P.INIT_EXEC_ID, c.process)
        c.state = RUNNING
        return {"pid": proc.pid}

    def h_exec(self, req_id: int, msg: dict[str, Any]) -> Result:
        c = self.container(msg)
        exec_id = msg["exec_id"]
        if c.state in (CREATING, DESTROYING):
            raise AgentError(P.E_FAILED_PRECONDITION, f"container {c.cid} is {c.state}")
        if exec_id in c.procs or exec_id == P.INIT_EXEC_ID:
            raise AgentError(P.E_ALREADY_EXISTS, f"exec id {exec_id} is in use")
        proc = self._spawn(c, exec_id, msg["process"])
        return {"pid": proc.pid}

    def h_signal(self, req_id: int, msg: dict[str, Any]) -> Result:
        c = self.container(msg)
        sig = msg["signal"]
        if msg["all"]:
            self.drop_held(c)
            self.kill_container(c, sig)
            return {}
        exec_id = msg["exec_id"]
        proc = c.procs.get(exec_id)
        if proc is None or not proc.alive:
            raise AgentError(P.E_NOT_FOUND, f"process {exec_id} of {c.cid} is not running")
        os.kill(proc.pid, sig)
        return {}

    def h_close_stdin(self, req_id: int, msg: dict[str, Any]) -> Result:
        c = self.container(msg)
        exec_id = msg["exec_id"]
        proc = c.procs.get(exec_id)
        if proc is None:
            raise AgentError(P.E_NOT_FOUND, f"process {exec_id} of {c.cid} not found")
        proc.stdin_close = True
        self.stdin_progress(proc)
        return {}

    def h_resize(self, req_id: int, msg: dict[str, Any]) -> Result:
        c = self.container(msg)
        exec_id, height, width = msg["exec_id"], msg["height"], msg["width"]
        proc = c.procs.get(exec_id)
        if proc is None:
            raise AgentError(P.E_NOT_FOUND, f"process {exec_id} of {c.cid} not found")
        if proc.tty_fd is None:
            raise AgentError(P.E_FAILED_PRECONDITION, f"process {exec_id} of {c.cid} has no terminal")
        set_winsize(proc.tty_fd, height, width)
        return {}

    def h_ps(self, req_id: int, msg: dict[str, Any]) -> Result:
        c = self.container(msg)
        out = [{"pid": p.pid, "exec_id": p.exec_id, "args": p.args} for p in c.procs.values() if p.alive]
        known = {p.pid for p in c.procs.values()} | ({c.held.pid} if c.held is not None else set())
        if c.root is not None:
            for pid in self.sandbox.cgroup_pids(c.root):
                if pid not in known:
                    out.append({"pid": pid, "exec_id": "", "args": read_cmdline(pid)})
        return {"processes": out}

    def h_destroy_container(self, req_id: int, msg: dict[str, Any]) -> Result:
        c = self.container(msg)
        if c.state == CREATING:
            raise AgentError(P.E_FAILED_PRECONDITION, f"container {c.cid} is still being created")
        c.destroy_waiters.append(req_id)
        if c.state != DESTROYING:
            c.state = DESTROYING
            self.drop_held(c)
            self.kill_container(c, signal.SIGKILL)
            self._poll_destroy(c, time.monotonic() + DESTROY_WAIT_S)
        return PENDING

    def _poll_destroy(self, c: Container, deadline: float) -> None:
        if c.procs and time.monotonic() < deadline:
            self.call_later(0.01, lambda: self._poll_destroy(c, deadline))
            return
        for proc in list(c.procs.values()):
            self.drop_proc(proc)
        waiters, c.destroy_waiters = c.destroy_waiters, []
        self.containers.pop(c.cid, None)
        self.unwatch_oom(c)
        c.security.release()
        try:
            if c.root is not None:
                self.sandbox.teardown(c.root)
        except Exception as exc:  # noqa: BLE001
            for w in waiters:
                self.send(error_reply(w, exc))
            return
        for w in waiters:
            self.send(P.reply_ok(w, {}))

    def h_configure_network(self, req_id: int, msg: dict[str, Any]) -> Result:
        interfaces, routes, dns_relay = check_network(msg)
        self.sandbox.configure_network(interfaces, routes)
        listeners = self.dns.listen(dns_relay, self.sandbox.dns_port) if dns_relay else []
        return {"interfaces": [iface["name"] for iface in interfaces], "dns_relay": listeners}

    def h_restored(self, req_id: int, msg: dict[str, Any]) -> Result:
        """A clone of a VM template, just resumed: everything the template fixed must differ.

        vmmd sends the first ``restored`` of an agent's life to the template itself, right
        before its snapshot (``Cloner.build``): that one also ends the warm-up and freezes the
        agent's objects (``freeze_for_template``), so every clone inherits both. A clone
        (every later one: it inherits the count) then starts mounting its file share while
        the host connects and configures its network (the template cannot have it mounted:
        QEMU refuses to migrate a mounted virtio-9p device)."""
        reseed_kernel_rng(msg["seed"])
        time.clock_settime_ns(time.CLOCK_REALTIME, msg["time_ns"])
        self.sandbox.set_hostname(msg["hostname"])
        self.restores += 1
        if self.restores == 1:
            freeze_for_template()
        else:  # once the reply is out
            self.call_later(0.0, self.sandbox.mount_share_soon)
        return {}

    def h_sync(self, req_id: int, msg: dict[str, Any]) -> Result:
        """sync(2): the host's delete kills the VM next, with no shutdown."""
        os.sync()
        return {}

    def h_shutdown(self, req_id: int, msg: dict[str, Any]) -> Result:
        self.send(P.reply_ok(req_id, {}))
        self.call_later(0.0, self._power_off)
        return PENDING

    def _power_off(self) -> None:
        self.flush_blocking(2.0)
        self.sandbox.poweroff()
        self.running = False


RNDADDENTROPY = 0x40085203  # _IOW('R', 0x03, int[2]): add bytes, credit them
RNDRESEEDCRNG = 0x5207      # _IO('R', 0x07): reseed the CRNG from the input pool now


def reseed_kernel_rng(seed: bytes) -> None:
    """Mix `seed` into the kernel's input pool (credited as entropy) and force the CRNG to
    reseed from it, so getrandom() in a clone differs from the template's and its siblings'."""
    import fcntl
    import struct

    info = struct.pack("ii", len(seed) * 8, len(seed)) + seed
    fd = os.open("/dev/urandom", os.O_WRONLY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, RNDADDENTROPY, info)
        fcntl.ioctl(fd, RNDRESEEDCRNG)
    finally:
        os.close(fd)


def read_cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read(65536)
    except OSError:
        return []
    return [a.decode("utf-8", "replace") for a in raw.split(b"\0") if a]


def error_reply(req_id: int, exc: BaseException) -> dict[str, Any]:
    """Map an exception raised while handling a request to its error reply."""
    code = getattr(exc, "code", None)
    if isinstance(code, str) and code in P.ERROR_CODES:
        return P.reply_error(req_id, code, str(exc))
    if isinstance(exc, ValueError):
        return P.reply_error(req_id, P.E_INVALID_ARGUMENT, str(exc))
    if isinstance(exc, OSError):
        from .sandbox import errno_code

        return P.reply_error(req_id, errno_code(exc), str(exc))
    return P.reply_error(req_id, P.E_INTERNAL, f"{type(exc).__name__}: {exc}")
