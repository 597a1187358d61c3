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

A user namespace (linux.namespaces type user) is made in runc's order (nsexec.c): the
agent forks a plain child (stage 1) which joins the cgroup, makes a first mount namespace
in the guest's user namespace (other containers' mounts detached, the agent's /proc of the
rootfs unmounted), writes the ``net.*`` sysctls (the VM's network namespace is owned by the
guest's user namespace), then ``unshare(CLONE_NEWUSER)`` and tells the agent, which writes
/proc/PID/uid_map and gid_map (setgroups left "allow": the writer is privileged, as root
runc); the child becomes root in it (setresgid/setresuid 0), makes the PID namespace
(owned by the user namespace, as runc's) and forks the init (stage 2), whose pid it sends
to the agent before it exits. The init is PID 1 and, once stage 1 is gone, a child of the
agent (PID 1 of the VM, or a child subreaper on the host) as every container process is.
The init then makes its mount, ipc, uts, cgroup and time namespaces inside the user
namespace, so they are owned by it as under runc: its mount namespace is a copy of a more
privileged one, so every mount made before (rootfs, /dev, binds, /sys) is locked; the rootfs
is bound onto itself (an unlocked top mount, which can be moved onto /) and a fresh /proc,
the cgroup mount and masked/read-only paths are made there, as runc makes them. An exec
joins the user namespace first, then the others.

Kernel rules that follow (same as under runc): the container's PID 1 gets only the signals
it has a handler for, except SIGKILL and SIGSTOP sent from outside (the agent); a
``kill -9 $$`` of the init's own shell is ignored. When PID 1 ends, the kernel SIGKILLs
every other process of its namespace. A process of the namespace has parent pid 0 there when
its parent is the agent (exec processes).

STDLIB ONLY: runs inside the guest (ctypes for unshare/setns/mount).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

from .sandbox import libc, mount, umount

CLONE_NEWNS = 0x00020000
CLONE_NEWPID = 0x20000000
CLONE_NEWUSER = 0x10000000
PR_SET_CHILD_SUBREAPER = 36
PR_SET_DUMPABLE = 4
PID_BYTES = 8  # stage 1 sends the init's pid as a signed 64-bit integer
# The other namespaces a config may list (hanabi_wire.ocispec.linux.MADE_IN_GUEST): made by the init's
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


IdMap = list[tuple[int, int, int]]


def id_map_text(mappings: IdMap) -> str:
    """What /proc/PID/uid_map (gid_map) takes, in one write: ``<containerID> <hostID> <size>``
    a line."""
    return "".join(f"{first} {lower} {size}\n" for first, lower, size in mappings)


def write_id_maps(pid: int, uid_map: IdMap, gid_map: IdMap, proc: str = "/proc") -> None:
    """Write the maps of ``pid``'s new user namespace (each file in one write, as the kernel
    requires); OSError naming the field."""
    for name, field, maps in (("uid_map", "linux.uidMappings", uid_map), ("gid_map", "linux.gidMappings", gid_map)):
        path = f"{proc}/{pid}/{name}"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.write(fd, id_map_text(maps).encode())
            finally:
                os.close(fd)
        except OSError as exc:
            raise OSError(exc.errno, f"{field}: writing {path}: {exc.strerror}") from None


def _read_exact(fd: int, n: int) -> bytes:
    data = b""
    while len(data) < n:
        try:
            chunk = os.read(fd, n - len(data))
        except InterruptedError:
            continue
        if not chunk:
            break
        data += chunk
    return data


class UserSync:
    """The two pipes between the agent and stage 1 of a container init with a user
    namespace (see the module docstring): ``up`` (stage 1 writes "U" once unshared, then the
    init's pid), ``down`` (the agent writes "G" once the maps are written)."""

    __slots__ = ("up_r", "up_w", "down_r", "down_w")

    def __init__(self) -> None:
        self.up_r, self.up_w = os.pipe2(os.O_CLOEXEC)
        self.down_r, self.down_w = os.pipe2(os.O_CLOEXEC)

    def close(self) -> None:
        for name in self.__slots__:
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)

    def close_ends(self, *names: str) -> None:
        for name in names:
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)

    def child(self) -> None:
        """Stage 1, after the first mount namespace: the user namespace, its maps (written by
        the agent), root in it, a PID namespace and the init forked into it. Returns in the
        init only; stage 1 exits here."""
        self.close_ends("up_r", "down_w")
        unshare(CLONE_NEWUSER)
        os.write(self.up_w, b"U")
        if _read_exact(self.down_r, 1) != b"G":
            raise OSError(32, "the agent did not write the user namespace's maps")
        os.setresgid(0, 0, 0)
        os.setresuid(0, 0, 0)
        # The change of ids made the process non-dumpable: its /proc/self files would stay
        # the guest root's, out of reach of the namespace's root (timens_offsets, ...). runc
        # sets it too; exec sets it again from the process's own ids.
        libc().prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)
        unshare(CLONE_NEWPID)
        pid = os.fork()
        if pid != 0:
            os.write(self.up_w, pid.to_bytes(PID_BYTES, "little", signed=True))
            os._exit(0)
        self.close()

    def parent(self, pid: int, uid_map: IdMap, gid_map: IdMap) -> int:
        """The agent's side: write the maps of stage 1 (``pid``) and return the init's pid,
        stage 1 reaped. When stage 1 ended before (its error is in the spawn's error pipe),
        ``pid`` itself. OSError naming the field when the kernel refuses a map (stage 1
        killed and reaped then)."""
        self.close_ends("up_w", "down_r")
        _subreaper()
        try:
            if _read_exact(self.up_r, 1) != b"U":
                return pid
            try:
                write_id_maps(pid, uid_map, gid_map)
            except OSError:
                _kill_and_reap(pid)
                raise
            os.write(self.down_w, b"G")
            raw = _read_exact(self.up_r, PID_BYTES)
            if len(raw) != PID_BYTES:
                return pid
            reap(pid)
            return int.from_bytes(raw, "little", signed=True)
        finally:
            self.close()


_is_subreaper = False


def _subreaper() -> None:
    """Make the agent the reaper of the init once stage 1 exits (PID 1 of the VM is already;
    host-side tests need it)."""
    global _is_subreaper
    if not _is_subreaper and os.getpid() != 1:
        libc().prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    _is_subreaper = True


def reap(pid: int) -> None:
    """waitpid `pid`, retried on EINTR; one reaped already (the agent's loop reaps every child) is fine."""
    while True:
        try:
            os.waitpid(pid, 0)
            return
        except InterruptedError:
            continue
        except ChildProcessError:
            return


def _kill_and_reap(pid: int) -> None:
    import signal

    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    reap(pid)


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
    return _deepest_first(p for p in mount_points(mountinfo)
                          if p.startswith(scope) and p != keep and not p.startswith(keep + "/"))


def outside_mounts(mountinfo: str, root: str) -> list[str]:
    """Mount points that are neither ``root``, nor under it, nor /: deepest first."""
    root = root.rstrip("/")
    return _deepest_first(p for p in mount_points(mountinfo)
                          if p != "/" and p != root and not p.startswith(root + "/"))


def mount_points(mountinfo: str) -> Iterator[str]:
    """The mount point of each well-formed line of a mountinfo text, unescaped."""
    for line in mountinfo.splitlines():
        fields = line.split(" ")
        if len(fields) >= 5:
            yield unescape_mount_path(fields[4])


def _deepest_first(points: Iterable[str]) -> list[str]:
    """Each point once, in first-seen order among equals, the deepest first."""
    found = list(dict.fromkeys(points))
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
    ``<rootfs>/proc``; with ``uid_map`` and ``gid_map`` a user namespace first, which owns
    the others. ``join(pid)``: the PID and mount namespaces of process ``pid`` (and its
    user namespace first, with ``user``).
    """

    __slots__ = ("pid_fd", "mnt_fd", "hide_scope", "others", "other_fds", "time_offsets",
                 "uid_map", "gid_map", "user_fd", "sync")

    def __init__(self, pid_fd: int | None = None, mnt_fd: int | None = None,
                 hide_scope: str | None = None, others: tuple[str, ...] = (),
                 time_offsets: list[tuple[str, int, int]] | None = None,
                 uid_map: IdMap | None = None, gid_map: IdMap | None = None) -> None:
        self.pid_fd = pid_fd
        self.mnt_fd = mnt_fd
        self.hide_scope = hide_scope
        self.others = others  # new ones to make (init) or joined through other_fds (exec)
        self.other_fds: list[tuple[int, int]] = []
        self.time_offsets = time_offsets or []
        # The container's user namespace maps (new and join: the agent chowns a pty by them).
        self.uid_map: IdMap = uid_map or []
        self.gid_map: IdMap = gid_map or []
        self.user_fd: int | None = None
        self.sync: UserSync | None = None

    @classmethod
    def new(cls, hide_scope: str | None = None, others: tuple[str, ...] = (),
            time_offsets: list[tuple[str, int, int]] | None = None,
            uid_map: IdMap | None = None, gid_map: IdMap | None = None,
            joined: list[tuple[int, int]] | None = None) -> Namespaces:
        """New namespaces; ``time_offsets`` for a new time namespace; ``uid_map``/``gid_map``
        for a new user namespace; ``joined``: (fd, CLONE_ flag) of namespaces of other
        containers the init enters instead (a pod's IPC and UTS), owned (closed) by this object."""
        ns = cls(hide_scope=hide_scope, others=others, time_offsets=time_offsets,
                 uid_map=uid_map, gid_map=gid_map)
        ns.other_fds = list(joined or [])
        return ns

    @classmethod
    def join(cls, pid: int, proc: str = "/proc", others: tuple[str, ...] = (),
             uid_map: IdMap | None = None, gid_map: IdMap | None = None) -> Namespaces:
        """The namespaces of ``pid`` (its user namespace too with maps); OSError once it has
        exited (zombies have none)."""
        flags = os.O_RDONLY | os.O_CLOEXEC
        pid_fd = os.open(f"{proc}/{pid}/ns/pid", flags)
        ns = cls(pid_fd, None, others=others, uid_map=uid_map, gid_map=gid_map)
        try:
            if ns.uid_map:
                ns.user_fd = os.open(f"{proc}/{pid}/ns/user", flags)
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

    @property
    def makes_user(self) -> bool:
        """A new user namespace is made (the init of a container that has one)."""
        return bool(self.uid_map) and not self.joining

    def fork(self) -> int:
        """Fork the process in its PID namespace (see ``fork_in_pid_ns``). With a new user
        namespace a plain fork, whose stage 1 makes the PID namespace: the agent writes the
        maps here and gets the init's pid (``UserSync.parent``); a map the kernel refuses
        is a ValueError naming the field."""
        if not self.makes_user:
            return fork_in_pid_ns(self.pid_fd)
        libc()
        self.sync = UserSync()
        try:
            pid = os.fork()
        except BaseException:
            self.sync.close()
            raise
        if pid == 0:
            return 0
        try:
            return self.sync.parent(pid, self.uid_map, self.gid_map)
        except OSError as exc:
            raise ValueError(str(exc)) from None

    def enter_mounts(self, root: str, chroot: bool) -> None:
        """In the forked child, before chroot: join or make its mount namespace (with a new
        user namespace: the first one, without the fresh proc, which ``enter_user`` mounts)."""
        if self.mnt_fd is not None:
            if self.user_fd is not None:
                setns(self.user_fd, CLONE_NEWUSER)
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
            if not self.makes_user:
                mount("proc", target, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)

    def enter_user(self, root: str, chroot: bool) -> None:
        """Stage 1 (see the module docstring): the user and PID namespaces; returns in the
        init, which then gets its mount namespace inside the user namespace: the rootfs
        bound onto itself (its mounts are locked there) and a fresh proc."""
        assert self.sync is not None
        self.sync.child()
        unshare(CLONE_NEWNS)
        mount("none", "/", "", MS_REC | MS_PRIVATE)
        if chroot:
            mount(root, root, "", MS_BIND | MS_REC)
            mount("proc", os.path.join(root, "proc"), "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)

    def enter_root(self, root: str) -> None:
        """In the forked init, instead of a bare chroot: detach every mount outside ``root``
        in this new mount namespace, move ``root`` onto / and chroot there (runc's
        ``msMoveRoot``; pivot_root is impossible while the agent's root is the initramfs).
        The container's root is then the top mount of the namespace: ``..`` never leads
        out of it (a chroot alone can be left by a process with CAP_SYS_CHROOT), the kernel
        does not count the process as chrooted (it may make user namespaces, as under
        runc), and an exec that joins the namespace starts at this root (setns puts it there).
        In a user namespace the mounts outside are locked (they stay, out of reach and out
        of the container's mountinfo) and ``root`` is the unlocked bind ``enter_user`` made."""
        if not os.path.ismount(root):  # a plain directory (host-side tests): runc binds it too
            mount(root, root, "", MS_BIND | MS_REC)
        if not self.uid_map:
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
        for fd in (self.pid_fd, self.mnt_fd, self.user_fd, *(fd for fd, _ in self.other_fds)):
            if fd is not None:
                os.close(fd)
        self.pid_fd = self.mnt_fd = self.user_fd = None
        self.other_fds = []
        if self.sync is not None:
            self.sync.close()
            self.sync = None
