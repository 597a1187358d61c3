"""Start one OCI process (runtime-spec ``process`` object) with pipes or a pty for its stdio.

``spawn()`` forks; the child joins the container's cgroup, becomes a session leader, enters
the container rootfs (moved onto / of its new mount namespace, the init's mount namespace
for an exec, chroot without namespaces; nothing for host-side tests), applies cwd,
rlimits, oomScoreAdj, umask, supplementary groups, gid and uid, then execs ``args`` with
``env`` (PATH looked up inside the rootfs). A failure before exec comes back through a
close-on-exec error pipe and is raised as ``SpawnError`` in the parent, with runc-like
messages (``executable file not found in $PATH``) that Docker maps to exit codes 127/126.

``spawn_held()`` forks the same child but returns at once a ``Held`` process, which stops
before its exec and waits on a pipe, as runc's init waits on its exec fifo: after its user
and capabilities (namespaces, cgroup, linux settings, rlimits, rootfs, cwd done) and the
look-up of its program (``look_path``, runc's LookPath: a missing program is start's error),
before the seccomp filter it loads last; with a filter loaded before them (no no_new_privs),
which might refuse the wait's read, before that one. ``Held.release`` lets it go on and gives
``spawn``'s result or error as soon as the child is past the wait and the look-up (it says
``STARTED``): as runc's ``start``, it does not wait for the exec, whose failure (a program
the kernel cannot run) goes to the process's stderr in runc's words, exit status 1.
``Held.discard`` kills and reaps it (through a pidfd: the agent's loop may have reaped it).

With ``terminal: true`` the caller opens a pty (``Sandbox.open_pty``) and passes its slave
as ``tty``: the child makes it stdin, stdout, stderr and, after ``setsid``, its controlling
terminal (TIOCSCTTY), and owns it (fchown to the process uid) like runc does; the caller
keeps the master. ``set_winsize`` applies ``process.consoleSize`` and later resizes.

With ``ns`` (a ``namespaces.Namespaces``) the process is forked into a PID namespace (a new
one where it is PID 1, or the container init's) and, first thing in the child, gets its
mount namespace (a new one with a fresh /proc, or the init's); it is still a direct child
of the caller, so ``waitpid`` gives its own status. With a user namespace the init is
made in runc's order (namespaces.py): the ``net.*`` sysctls are written before it, the
agent writes the maps, the other namespaces are made inside it. See namespaces.py.

Security, in runc's order (caps.py, seccomp.py, hardening.py): the init's child applies the
container's hostname, sysctls, readonlyPaths and maskedPaths (``Hardener``) in its new
namespaces before it enters its rootfs; then every process sets no_new_privs when
``noNewPrivileges``, loads the container's seccomp filter (here when it has no
no_new_privs: that needs CAP_SYS_ADMIN), drops the bounding set, keeps its capabilities
across the change of user, sets effective/permitted/inheritable and ambient, and (with
no_new_privs) loads the seccomp filter as the very last step before exec. An AppArmor
profile or SELinux label is refused by ``check_process`` (hanabi_wire.ocispec: the
process object is validated there, shared with the runtime's pre-check).

STDLIB ONLY: runs inside the guest.
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import struct

from hanabi_wire.constants import E_FAILED_PRECONDITION, E_INVALID_ARGUMENT
from hanabi_wire.ocispec.process import check_process

from .namespaces import reap

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from .caps import Applier
    from .hardening import Hardener
    from .namespaces import Namespaces
    from .seccomp import Filter

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# ioctl numbers (asm-generic, as on x86_64 and arm64): no termios module in the guest.
TIOCSCTTY = 0x540E
TIOCSWINSZ = 0x5414
TTY_GID = 5  # the group of a container's ptys (devpts gid=5, as runc and Docker mount it)


class SpawnError(Exception):
    """The process could not be started; ``code`` is a protocol error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def set_winsize(fd: int, height: int, width: int) -> None:
    """TIOCSWINSZ on a pty (master or slave): rows ``height``, columns ``width``."""
    fcntl.ioctl(fd, TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))


def initial_size(p: dict[str, Any]) -> tuple[int, int] | None:
    """``process.consoleSize`` as ``(height, width)``, or None when absent or zero."""
    size = p.get("consoleSize") or {}
    height, width = size.get("height") or 0, size.get("width") or 0
    return (height, width) if height and width else None


def _rlimits(p: dict[str, Any]) -> list[tuple[int, int, int]]:
    rl = p.get("rlimits") or []
    if not rl:
        return []
    import resource

    out = []
    for r in rl:
        res = getattr(resource, r["type"], None)
        if not isinstance(res, int):
            raise SpawnError(E_INVALID_ARGUMENT, f"unknown rlimit {r['type']}")
        inf = resource.RLIM_INFINITY
        soft, hard = r["soft"], r["hard"]
        out.append((res, inf if soft < 0 or soft >= 2**63 else soft, inf if hard < 0 or hard >= 2**63 else hard))
    return out


def _home_for(uid: int, passwd: str = "/etc/passwd") -> str:
    try:
        with open(passwd, encoding="utf-8", errors="replace") as f:
            for line in f:
                parts = line.rstrip("\n").split(":")
                if len(parts) >= 6 and parts[2] == str(uid):
                    return parts[5] or "/"
    except OSError:
        pass
    return "/"


def _build_env(p: dict[str, Any], uid: int, passwd: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for e in p.get("env") or []:
        k, _, v = e.partition("=")
        env[k] = v
    env.setdefault("PATH", DEFAULT_PATH)
    if "HOME" not in env:
        env["HOME"] = _home_for(uid, passwd)
    return env


def look_path(file: str, env: dict[str, str]) -> str:
    """The program ``file`` names, found as runc's init finds it before it waits for
    ``start`` (Go's exec.LookPath, then an access check as the process's user): with a
    slash the path itself, else the first file along $PATH that is no directory and has an
    execute bit. OSError ENOENT when there is none, EACCES when the one found may not be
    executed (no execute bit, or a noexec mount). access(2) with the real ids, which are the
    process's own by now: AT_EACCESS needs faccessat2, which an older seccomp profile loaded
    before this may refuse (runc falls back to faccessat then too). No imports (we may be
    chrooted)."""
    if "/" in file:
        st = os.stat(file)
        if st.st_mode & 0o170000 == 0o040000 or not st.st_mode & 0o111:
            raise OSError(errno.EACCES, "permission denied")
        path = file
    else:
        for d in env.get("PATH", DEFAULT_PATH).split(":"):
            path = os.path.join(d or ".", file)
            try:
                st = os.stat(path)
            except OSError:
                continue
            if st.st_mode & 0o170000 != 0o040000 and st.st_mode & 0o111:
                break
        else:
            raise OSError(errno.ENOENT, "executable file not found")
    if not os.access(path, os.X_OK):
        raise OSError(errno.EACCES, "permission denied")
    return path


class Guard:
    """What the child applies besides user and rlimits: capabilities (None: leave them, the
    agent is not root), the seccomp filter, and the init's ``Hardener``."""

    __slots__ = ("caps", "filter", "hardener", "nnp")

    def __init__(self, caps: Applier | None = None, filter_: Filter | None = None,
                 hardener: Hardener | None = None, nnp: bool = False) -> None:
        self.caps = caps
        self.filter = filter_
        self.hardener = hardener
        self.nnp = nnp


def _child(p: dict[str, Any], root: str, chroot: bool, cgroup: str | None,
           fds: tuple[int, int, int], errw: int, rlimits: list[tuple[int, int, int]],
           tty: bool = False, ns: Namespaces | None = None, guard: Guard | None = None,
           hold: int = -1) -> None:
    """Runs in the forked child; never returns.

    Nothing here may import a module that is not loaded yet: after chroot the guest's
    stdlib is out of reach. With ``hold`` (a pipe's read end, ``spawn(hold=True)``) it waits
    there, once in its rootfs, for the agent's ``Held.release``: a byte; EOF ends it unstarted.
    """
    stage, status, program = "setup", 127, p["args"][0]
    # Before any namespace: in a user namespace the agent's uid reads as another.
    privileged = os.geteuid() == 0
    try:
        if cgroup:  # first: inside the init's mount namespace (its rootfs on /) it is out of reach
            stage = "join cgroup"
            with open(os.path.join(cgroup, "cgroup.procs"), "w", encoding="ascii") as f:
                f.write("0")
        if ns is not None:
            stage = "enter mount namespace"
            ns.enter_mounts(root, chroot)
            if ns.makes_user:
                if guard is not None and guard.hardener is not None:
                    stage = "apply linux settings"
                    guard.hardener.write_sysctls(net=True)
                stage = "enter user namespace"
                ns.enter_user(root, chroot)  # from here on: the container's init (stage 2)
        stage = "setsid"
        os.setsid()
        guard = guard or Guard()
        if ns is not None:
            stage = "enter namespaces"
            ns.enter_others()
        if guard.hardener is not None:
            stage = "apply linux settings"
            guard.hardener.run(root)
        for i, fd in enumerate(fds):
            os.dup2(fd, i)
        if tty:
            stage = "set controlling terminal"
            fcntl.ioctl(0, TIOCSCTTY, 0)
        for sig in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGCHLD, signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        if p.get("oomScoreAdj") is not None:
            try:
                with open("/proc/self/oom_score_adj", "w", encoding="ascii") as f:
                    f.write(str(p["oomScoreAdj"]))
            except OSError:
                pass
        if rlimits:
            stage = "setrlimit"
            import resource

            for res, soft, hard in rlimits:
                resource.setrlimit(res, (soft, hard))
        user = p.get("user") or {}
        uid, gid = int(user.get("uid", 0)), int(user.get("gid", 0))
        cwd = p.get("cwd") or "/"
        if chroot:
            if ns is not None and ns.joining:
                os.chdir("/")  # setns into the init's mount namespace put us at its root
            elif ns is not None:
                stage = "enter the rootfs"
                ns.enter_root(root)
            else:
                stage = "chroot"
                os.chroot(root)
                os.chdir("/")
            passwd = "/etc/passwd"
        else:
            passwd = os.path.join(root, "etc/passwd")
            cwd = os.path.join(root, cwd.lstrip("/")) if os.path.isdir(os.path.join(root, cwd.lstrip("/"))) else root
        env = _build_env(p, uid, passwd)
        stage = "chdir to cwd"
        os.chdir(cwd)
        umask = user.get("umask")
        os.umask(umask if isinstance(umask, int) else 0o022)
        # runc's init waits on its exec fifo after its user and capabilities, before the
        # seccomp filter it loads last; here too, unless a filter comes before them (without
        # no_new_privs), which could refuse the wait's read: then before it.
        late = guard.filter is None or guard.nnp
        if hold >= 0 and not late:
            stage = "wait for start"
            _wait_for_start(hold, errw)
        if guard.nnp:
            stage = "set no_new_privs"
            if guard.caps is not None:
                guard.caps.no_new_privs()
            else:
                _no_new_privs()
        if guard.filter is not None and not guard.nnp:
            stage = "load seccomp filter"
            guard.filter.load()
        if guard.caps is not None:
            stage = "drop the bounding set"
            guard.caps.drop_bounding()
            guard.caps.keep_caps(True)
        stage = "set user"
        if privileged:
            if tty and not (ns is not None and ns.uid_map):  # in a user namespace: the agent did
                os.fchown(0, uid, -1)
            os.setgroups(list(user.get("additionalGids") or []))
            os.setgid(gid)
            os.setuid(uid)
        elif (uid, gid) != (os.getuid(), os.getgid()):
            raise OSError(errno.EPERM, "cannot change user when the agent is not root")
        if guard.caps is not None:
            stage = "apply capabilities"
            guard.caps.keep_caps(False)
            guard.caps.apply()
        stage = "exec"
        program = look_path(p["args"][0], env)
        if hold >= 0 and late:
            stage = "wait for start"
            _wait_for_start(hold, errw)
        if hold >= 0 and _acknowledge(errw, yield_cpu=late):
            # runc's `start` returns here, once its init wrote the exec fifo: what follows
            # is the process's own (a failure: on its stderr, exit status 1, as runc's).
            errw, status = -1, 1
        if errw < 0:
            os.closerange(3, 1 << 16)
        else:
            os.closerange(3, errw)
            os.closerange(errw + 1, 1 << 16)
        if guard.filter is not None and guard.nnp:
            stage = "load seccomp filter"
            guard.filter.load()
        stage = "exec"
        os.execve(program, p["args"], env)
    except OSError as exc:
        _report(errw, stage, exc.errno or 0, exc.strerror or str(exc), program)
    except BaseException as exc:  # noqa: BLE001 - the child must never return
        _report(errw, stage, 0, repr(exc), program)
    finally:
        os._exit(status)


def _acknowledge(errw: int, yield_cpu: bool) -> bool:
    """Tell the agent the held process is past its wait and about to exec (``STARTED`` on
    the error pipe, which it then closes); False when the write is refused (a seccomp
    filter loaded before it may): the agent then waits for the pipe's end at the exec.
    ``yield_cpu`` (no filter loaded yet, which might refuse it): sched_yield, so that the
    agent, woken by the write, sends start's reply before this exec takes the vCPU."""
    try:
        os.write(errw, STARTED)
    except OSError:
        return False
    os.close(errw)
    if yield_cpu:
        os.sched_yield()
    return True


def _report(errw: int, stage: str, num: int, text: str, program: str) -> None:
    """A failure of the child: to the agent (``errw``: ``stage\\0errno\\0text``), or after
    ``start`` returned (``errw`` -1) on its stderr in runc's words (``exec /bad: exec
    format error``)."""
    try:
        if errw >= 0:
            os.write(errw, f"{stage}\0{num}\0{text}".encode("utf-8", "replace")[:4096])
        else:
            what = f"exec {program}" if stage == "exec" else stage
            os.write(2, f"{what}: {text[:1].lower()}{text[1:]}\n".encode("utf-8", "replace")[:4096])
    except OSError:
        pass


def _wait_for_start(hold: int, errw: int) -> None:
    """The held child's wait for ``Held.release``: its byte, or EOF (ended unstarted). Every
    descriptor but its stdio, ``errw`` and ``hold`` is closed first (what it inherited from
    the agent: other containers' stdin pipes and terminals would not see their end while it
    waits)."""
    lo, hi = sorted((hold, errw))
    os.closerange(3, lo)
    os.closerange(lo + 1, hi)
    os.closerange(hi + 1, 1 << 16)
    while True:
        try:
            go = os.read(hold, 1)
            break
        except InterruptedError:
            continue
    if go != GO:
        os._exit(0)  # ended unstarted (the container is being destroyed)


def _no_new_privs() -> None:
    from .caps import PR_SET_NO_NEW_PRIVS
    from .sandbox import libc

    if libc().prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(errno.EPERM, "prctl(PR_SET_NO_NEW_PRIVS)")


def make_guard(p: dict[str, Any], filter_: Filter | None = None, hardener: Hardener | None = None) -> Guard:
    """The ``Guard`` of process ``p`` (validated): capabilities only when the agent is root."""
    from hanabi_wire.ocispec.caps import parse

    from .caps import Applier, last_cap

    caps = Applier(parse(p), last_cap()) if os.geteuid() == 0 else None
    if filter_ is not None or p.get("noNewPrivileges"):
        from .sandbox import libc

        libc()
    return Guard(caps, filter_, hardener, bool(p.get("noNewPrivileges")))


def _chown_tty(tty: int, p: dict[str, Any], ns: Namespaces) -> None:
    """The pty of a process in a user namespace, owned by its uid (and the tty group, 5) as
    the ids they are outside it: the child cannot chown an inode whose owner (the agent's
    root) is not mapped in its namespace."""
    from hanabi_wire.ocispec.linux import host_id

    uid = int((p.get("user") or {}).get("uid", 0))
    outside_uid, outside_gid = host_id(uid, ns.uid_map), host_id(TTY_GID, ns.gid_map)
    os.fchown(tty, -1 if outside_uid is None else outside_uid, -1 if outside_gid is None else outside_gid)


def _spawn_error(data: bytes, args: list[str]) -> SpawnError:
    stage, _, rest = data.decode("utf-8", "replace").partition("\0")
    num_s, _, text = rest.partition("\0")
    num = int(num_s) if num_s.isdigit() else 0
    if stage == "exec":
        if num == errno.ENOENT:
            if "/" in args[0]:
                return SpawnError(E_FAILED_PRECONDITION, f'exec: "{args[0]}": stat {args[0]}: no such file or directory')
            return SpawnError(E_FAILED_PRECONDITION, f'exec: "{args[0]}": executable file not found in $PATH')
        if num in (errno.EACCES, errno.EPERM):
            return SpawnError(E_FAILED_PRECONDITION, f'exec: "{args[0]}": permission denied')
    if stage == "chdir to cwd" and num == errno.ENOENT:
        return SpawnError(E_FAILED_PRECONDITION, f"chdir to cwd: no such file or directory: {text}")
    return SpawnError(E_FAILED_PRECONDITION, f"{stage}: {text} (errno {num})")


GO = b"G"
STARTED = b"\x06"  # a held child, past its wait: what follows is its exec (no error starts so)


class Held:
    """A process ``spawn(hold=True)`` made, which waits, set up in its namespaces and rootfs,
    before its user, capabilities, seccomp filter and exec: ``release`` lets it go on (as
    ``spawn`` would have), ``discard`` ends it. The caller owns it (and its descriptors)."""

    __slots__ = ("pid", "args", "ours", "errors", "go", "tty", "pidfd")

    def __init__(self, pid: int, args: list[str], ours: tuple[int, ...], errors: int, go: int,
                 tty: bool) -> None:
        self.pid, self.args, self.ours, self.errors, self.go, self.tty = pid, args, ours, errors, go, tty
        # Signalled and waited for through a pidfd: the agent's loop may have reaped it (it
        # ended while it waited) and its pid may be another process's by then.
        self.pidfd = os.pidfd_open(pid) if go >= 0 else -1

    def release(self) -> tuple[int, int, int, int] | None:
        """Let it go on to exec: ``spawn``'s result once it is past its wait (or the
        SpawnError ``spawn`` would raise, a failure of its setup or its program's look-up
        included), or None when it ended before without one (killed while it waited:
        nothing of it is left; spawn it again)."""
        try:
            os.write(self.go, GO)
            gone = False
        except BrokenPipeError:
            gone = True
        os.close(self.go)
        self.go = -1
        errors, self.errors = self.errors, -1
        try:
            data = _read_errors(errors, until_started=True)
        except BaseException:
            self._close_ours()
            raise
        if data or gone:
            self._close_ours()
            self._reap()
            if data:
                raise _spawn_error(data, self.args)
            return None
        self._close_pidfd()
        return _result(self.pid, self.ours, self.tty)

    def discard(self) -> None:
        """End it unstarted (SIGKILL, reaped) and close its descriptors."""
        if self.pidfd >= 0:
            try:
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
            except ProcessLookupError:  # ended (and maybe reaped) already
                pass
            self._reap()
        for fd in (self.go, self.errors):
            if fd >= 0:
                os.close(fd)
        self.go = self.errors = -1
        self._close_ours()

    def _reap(self) -> None:
        """Wait for it to end (unless the agent's loop reaped it already), pidfd closed."""
        while self.pidfd >= 0:
            try:
                os.waitid(os.P_PIDFD, self.pidfd, os.WEXITED)
            except InterruptedError:
                continue
            except ChildProcessError:
                pass
            self._close_pidfd()

    def _close_pidfd(self) -> None:
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1

    def _close_ours(self) -> None:
        for fd in self.ours:
            os.close(fd)
        self.ours = ()


def _read_errors(ep_r: int, until_started: bool = False) -> bytes:
    """The child's error pipe read to its end, and closed: empty once the child exec'ed
    (``until_started``, a held child: or once it said ``STARTED``, before its exec)."""
    chunks: list[bytes] = []
    try:
        while True:
            try:
                chunk = os.read(ep_r, 4096)
            except InterruptedError:
                continue
            if not chunk or (until_started and not chunks and chunk == STARTED):
                break
            chunks.append(chunk)
    finally:
        os.close(ep_r)
    return b"".join(chunks)


def _result(pid: int, ours: tuple[int, ...], tty: bool) -> tuple[int, int, int, int]:
    if tty:
        return pid, -1, -1, -1
    for fd in ours:
        os.set_blocking(fd, False)
    in_w, out_r, err_r = ours
    return pid, in_w, out_r, err_r


def spawn(p: dict[str, Any], root: str, *, chroot: bool = True,
          cgroup: str | None = None, tty: int | None = None,
          ns: Namespaces | None = None, guard: Guard | None = None) -> tuple[int, int, int, int]:
    """Start process ``p`` in rootfs ``root``.

    Returns ``(pid, stdin_w, stdout_r, stderr_r)``; the three pipe ends are non-blocking and
    close-on-exec, owned by the caller. With ``tty`` (a pty slave, which the caller still
    owns and closes) the process runs on that terminal and the three fds are -1. With
    ``ns`` it runs in those namespaces (the caller keeps and closes ``ns``); ``pid`` is
    its pid in the caller's (the guest's) PID namespace.
    """
    held = _fork(p, root, chroot, cgroup, tty, ns, guard, hold=False)
    assert isinstance(held, Held)
    errors, held.errors = held.errors, -1
    data = _read_errors(errors)
    if data:
        held._close_ours()
        reap(held.pid)
        raise _spawn_error(data, p["args"])
    return _result(held.pid, held.ours, held.tty)


def spawn_held(p: dict[str, Any], root: str, *, chroot: bool = True,
               cgroup: str | None = None, tty: int | None = None,
               ns: Namespaces | None = None, guard: Guard | None = None) -> Held:
    """``spawn``, but the process waits before its user, capabilities, seccomp filter and
    exec until ``Held.release`` (a container's init made at create, as runc's waits on its
    exec fifo, and let go at start); returns at once after the fork."""
    return _fork(p, root, chroot, cgroup, tty, ns, guard, hold=True)


def _fork(p: dict[str, Any], root: str, chroot: bool, cgroup: str | None, tty: int | None,
          ns: Namespaces | None, guard: Guard | None, hold: bool) -> Held:
    """The fork of ``spawn`` and ``spawn_held``: the child's pipes made, the child started."""
    check_process(p)
    rlimits = _rlimits(p)
    if guard is None:
        guard = make_guard(p)
    if tty is not None:
        ours: tuple[int, ...] = ()
        theirs: tuple[int, ...] = ()
        child_fds = (tty, tty, tty)
    else:
        in_r, in_w = os.pipe2(os.O_CLOEXEC)
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        ours, theirs = (in_w, out_r, err_r), (in_r, out_w, err_w)
        child_fds = (in_r, out_w, err_w)
    ep_r, ep_w = os.pipe2(os.O_CLOEXEC)
    go_r, go_w = os.pipe2(os.O_CLOEXEC) if hold else (-1, -1)
    gos = (go_r, go_w) if hold else ()
    if tty is not None and ns is not None and ns.uid_map and os.geteuid() == 0:
        _chown_tty(tty, p, ns)
    try:
        pid = os.fork() if ns is None else ns.fork()
    except BaseException:
        for fd in (*ours, *theirs, ep_r, ep_w, *gos):
            os.close(fd)
        raise
    if pid == 0:
        _child(p, root, chroot, cgroup, child_fds, ep_w, rlimits, tty is not None, ns, guard, go_r)
    for fd in (*theirs, ep_w):
        os.close(fd)
    if hold:
        os.close(go_r)
    return Held(pid, list(p["args"]), ours, ep_r, go_w, tty is not None)
