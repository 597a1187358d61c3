"""PID and mount namespaces of container processes, as runc sets them up.

A container's init gets a PID namespace of its own, where it is PID 1, and a private mount
namespace with a fresh /proc of that PID namespace mounted in the rootfs (so ``ps`` inside
shows only the container's processes). An ``exec`` process joins both namespaces of the
running init (``/proc/<init pid>/ns/{pid,mnt}``).

No double fork: the agent itself switches the PID namespace its *next* child is born in
(``unshare(CLONE_NEWPID)`` for a new one, ``setns(fd, CLONE_NEWPID)`` for the init's), forks
and switches back (``setns`` to its own namespace, opened once). So every container process
stays a direct child of the agent: ``waitpid`` reports its own status, and the pid ``fork``
returns is its guest-global pid, the one ``kill`` and ``ps`` use. The mount namespace is
changed by the child itself (``Namespaces.enter_mounts``); the init then enters its rootfs
moved onto / (``Namespaces.enter_root``), an exec by joining that namespace.

Kernel rules that follow (same as under runc): the container's PID 1 gets only the signals
it has a handler for, except SIGKILL and SIGSTOP sent from outside (the agent); a
``kill -9 $$`` of the init's own shell is ignored. When PID 1 ends, the kernel SIGKILLs
every other process of its namespace. A process of the namespace has parent pid 0 there when
its parent is the agent (exec processes).

STDLIB ONLY: runs inside the guest (ctypes for unshare/setns/mount).
"""

from __future__ import annotations

import os

from .sandbox import libc, mount, umount

CLONE_NEWNS = 0x00020000
CLONE_NEWPID = 0x20000000
# The other namespaces a config may list (linuxspec.MADE_IN_GUEST): made by the init's
# child after it joined its cgroup (so a cgroup namespace is rooted there), joined by execs.
OTHER_FLAGS = {"ipc": 0x08000000, "uts": 0x04000000, "cgroup": 0x02000000, "time": 0x00000080}
MS_NOSUID, MS_NODEV, MS_NOEXEC = 2, 4, 8
MS_REC = 0x4000
MS_MOVE = 0x2000
MS_BIND = 0x1000
MS_PRIVATE = 1 << 18
MNT_DETACH = 2

_own_pid_ns: int | None = None


def _check(ret: int, what: str) -> None:
    if ret != 0:
        import ctypes

        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def unshare(flags: int) -> None:
    """unshare(2)."""
    _check(libc().unshare(flags), f"unshare({flags:#x})")


def setns(fd: int, nstype: int) -> None:
    """setns(2)."""
    _check(libc().setns(fd, nstype), f"setns({nstype:#x})")


def own_pid_ns() -> int:
    """An fd of the caller's (the agent's) PID namespace, opened once and kept."""
    global _own_pid_ns
    if _own_pid_ns is None:
        _own_pid_ns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    return _own_pid_ns


def fork_in_pid_ns(target: int | None) -> int:
    """``os.fork()`` whose child is born in a new PID namespace (``target`` None: the child
    is its PID 1) or in the PID namespace of the fd ``target``.

    Only the child moves: in the parent the namespace for children is switched back before
    this returns (or raises). An ``ENOMEM`` from fork into ``target`` means its PID 1 has
    exited and the namespace admits no new process.
    """
    own = own_pid_ns()
    libc()  # load ctypes and libc before the fork, not in the child
    if target is None:
        unshare(CLONE_NEWPID)
    else:
        setns(target, CLONE_NEWPID)
    try:
        pid = os.fork()
    except BaseException:
        setns(own, CLONE_NEWPID)
        raise
    if pid != 0:
        setns(own, CLONE_NEWPID)
    return pid


def timens_offsets_text(offsets: list[tuple[str, int, int]]) -> str:
    """What /proc/self/timens_offsets takes: one ``<clock> <secs> <nanosecs>`` line each."""
    return "".join(f"{clock} {secs} {nsecs}\n" for clock, secs, nsecs in offsets)


def write_time_offsets(offsets: list[tuple[str, int, int]]) -> None:
    """Set the offsets of the caller's new time namespace (before anything entered it)."""
    fd = os.open("/proc/self/timens_offsets", os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, timens_offsets_text(offsets).encode())
    finally:
        os.close(fd)


def enter_time_for_children() -> None:
    """Move the (single-threaded) caller into the time namespace of its children."""
    fd = os.open("/proc/self/ns/time_for_children", os.O_RDONLY | os.O_CLOEXEC)
    try:
        setns(fd, OTHER_FLAGS["time"])
    finally:
        os.close(fd)


def unescape_mount_path(field: str) -> str:
    r"""A path from /proc/self/mountinfo: ``\040``-style octal escapes (space, tab, \n, \\)."""
    if "\\" not in field:
        return field
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def foreign_mounts(mountinfo: str, scope: str, keep: str) -> list[str]:
    """Mount points under ``scope`` but not under ``keep`` (other containers' mounts),
    deepest first, each once: what a new container mount namespace detaches so that it
    does not pin other containers' filesystems."""
    scope, keep = scope.rstrip("/") + "/", keep.rstrip("/")
    found: list[str] = []
    for line in mountinfo.splitlines():
        fields = line.split(" ")
        if len(fields) < 5:
            continue
        point = unescape_mount_path(fields[4])
        if not point.startswith(scope) or point == keep or point.startswith(keep + "/"):
            continue
        if point not in found:
            found.append(point)
    found.sort(key=lambda p: p.count("/"), reverse=True)
    return found


def outside_mounts(mountinfo: str, root: str) -> list[str]:
    """Mount points that are neither ``root``, nor under it, nor /: deepest first."""
    root = root.rstrip("/")
    found: list[str] = []
    for line in mountinfo.splitlines():
        fields = line.split(" ")
        if len(fields) < 5:
            continue
        point = unescape_mount_path(fields[4])
        if point == "/" or point == root or point.startswith(root + "/") or point in found:
            continue
        found.append(point)
    found.sort(key=lambda p: p.count("/"), reverse=True)
    return found


def plan(enabled: bool, is_init: bool, init_pid: int | None) -> str:
    """Which namespaces a new container process gets: ``"new"`` (the init), ``"join"`` (an
    exec while the init, ``init_pid``, has not been reaped) or ``"none"`` (the guest's:
    namespaces are off, or an exec before start or after the init ended, which runc would
    refuse and the agent allows)."""
    if not enabled:
        return "none"
    if is_init:
        return "new"
    return "join" if init_pid is not None else "none"


class Namespaces:
    """How one container process gets its namespaces (see the module docstring).

    ``new()``: a new PID namespace (the process is its PID 1) and a new mount namespace with
    propagation made private, other containers' mounts detached (those under ``hide_scope``
    but not under the container's own directory) and, with chroot, a fresh proc on
    ``<rootfs>/proc``. ``join(pid)``: the PID and mount namespaces of process ``pid``.
    """

    __slots__ = ("pid_fd", "mnt_fd", "hide_scope", "others", "other_fds", "time_offsets")

    def __init__(self, pid_fd: int | None = None, mnt_fd: int | None = None,
                 hide_scope: str | None = None, others: tuple[str, ...] = (),
                 time_offsets: list[tuple[str, int, int]] | None = None) -> None:
        self.pid_fd = pid_fd
        self.mnt_fd = mnt_fd
        self.hide_scope = hide_scope
        self.others = others  # new ones to make (init) or joined through other_fds (exec)
        self.other_fds: list[tuple[int, int]] = []
        self.time_offsets = time_offsets or []

    @classmethod
    def new(cls, hide_scope: str | None = None, others: tuple[str, ...] = (),
            time_offsets: list[tuple[str, int, int]] | None = None,
            joined: list[tuple[int, int]] | None = None) -> Namespaces:
        """New namespaces; ``time_offsets`` for a new time namespace; ``joined``: (fd, CLONE_
        flag) of namespaces of other containers the init enters instead (a pod's IPC and
        UTS), owned (closed) by this object."""
        ns = cls(hide_scope=hide_scope, others=others, time_offsets=time_offsets)
        ns.other_fds = list(joined or [])
        return ns

    @classmethod
    def join(cls, pid: int, proc: str = "/proc", others: tuple[str, ...] = ()) -> Namespaces:
        """The namespaces of ``pid``; OSError once it has exited (zombies have none)."""
        flags = os.O_RDONLY | os.O_CLOEXEC
        pid_fd = os.open(f"{proc}/{pid}/ns/pid", flags)
        ns = cls(pid_fd, None, others=others)
        try:
            ns.mnt_fd = os.open(f"{proc}/{pid}/ns/mnt", flags)
            for kind in others:
                ns.other_fds.append((os.open(f"{proc}/{pid}/ns/{kind}", flags), OTHER_FLAGS[kind]))
        except BaseException:
            ns.close()
            raise
        return ns

    @property
    def joining(self) -> bool:
        return self.pid_fd is not None

    def fork(self) -> int:
        """Fork the process in its PID namespace (see ``fork_in_pid_ns``)."""
        return fork_in_pid_ns(self.pid_fd)

    def enter_mounts(self, root: str, chroot: bool) -> None:
        """In the forked child, before chroot: join or make its mount namespace."""
        if self.mnt_fd is not None:
            setns(self.mnt_fd, CLONE_NEWNS)
            return
        unshare(CLONE_NEWNS)
        mount("none", "/", "", MS_REC | MS_PRIVATE)  # nothing propagates back to the agent
        if self.hide_scope:
            with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
                info = f.read()
            for point in foreign_mounts(info, self.hide_scope, os.path.dirname(root.rstrip("/"))):
                try:
                    umount(point, MNT_DETACH)
                except OSError:
                    pass  # already gone with a parent detached before it
        if chroot:
            target = os.path.join(root, "proc")
            try:
                umount(target, MNT_DETACH)  # the agent's proc (the guest's PID namespace)
            except OSError:
                pass
            os.makedirs(target, mode=0o555, exist_ok=True)
            mount("proc", target, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)

    def enter_root(self, root: str) -> None:
        """In the forked init, instead of a bare chroot: detach every mount outside ``root``
        in this new mount namespace, move ``root`` onto / and chroot there (runc's
        ``msMoveRoot``; pivot_root is impossible while the agent's root is the initramfs).
        The container's root is then the top mount of the namespace: ``..`` never leads
        out of it (a chroot alone can be left by a process with CAP_SYS_CHROOT), the kernel
        does not count the process as chrooted (it may make user namespaces, as under
        runc), and an exec that joins the namespace starts at this root (setns puts it there)."""
        if not os.path.ismount(root):  # a plain directory (host-side tests): runc binds it too
            mount(root, root, "", MS_BIND | MS_REC)
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            info = f.read()
        for point in outside_mounts(info, root):
            try:
                umount(point, MNT_DETACH)
            except OSError:
                pass  # gone with a parent detached before it
        os.chdir(root)
        mount(".", "/", "", MS_MOVE)
        os.chroot(".")
        os.chdir("/")

    def enter_others(self) -> None:
        """In the forked child, after it joined its cgroup: make (init) or join (exec) the
        ipc, uts, cgroup and time namespaces the config lists, after entering those it shares
        with other containers (an exec's, or a pod's IPC and UTS for a new init). unshare
        makes a new time namespace the one of the caller's children only: its offsets are
        written first, before any process is in it (as runc 1.2 does), then the init enters
        it itself (setns; not every kernel moves a process in at execve)."""
        for fd, flag in self.other_fds:
            setns(fd, flag)
        if self.joining:
            return
        flags = 0
        for kind in self.others:
            flags |= OTHER_FLAGS[kind]
        if flags:
            unshare(flags)
        if "time" in self.others:
            if self.time_offsets:
                write_time_offsets(self.time_offsets)
            enter_time_for_children()

    def close(self) -> None:
        for fd in (self.pid_fd, self.mnt_fd, *(fd for fd, _ in self.other_fds)):
            if fd is not None:
                os.close(fd)
        self.pid_fd = self.mnt_fd = None
        self.other_fds = []
