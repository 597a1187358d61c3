"""Where a container's root filesystem comes from, and the guest-wide side effects.

``GuestSandbox`` is the real thing (agent as PID 1 in the VM): it finds the virtio-blk disk
whose serial is the requested one, mounts it under /run/hanabi/c/<cid>/rootfs, mounts
/proc, /sys, a tmpfs /dev with the basic nodes, /dev/pts and /dev/shm inside it, puts the
container's processes into a cgroup v2 group, sets the hostname and powers the VM off.

``open_pty`` gives a process with ``terminal: true`` its pty: in the guest from the
container's own devpts instance (``<rootfs>/dev/pts/ptmx``, so the slave is a /dev/pts/N of
the container, as runc does it), elsewhere from ``os.openpty()``.

``use_pid_namespace`` (True here) gives every container its own PID and mount namespaces
(see namespaces.py); ``ns_hide_scope`` is where other containers' mounts live, which a new
container mount namespace detaches.

``DirSandbox`` is the host-side test double: every rootfs is one existing directory, no
mounts, no chroot, no cgroups, no namespaces, and "power off" just stops the agent loop.

STDLIB ONLY: runs inside the guest. ``ctypes`` is imported lazily (mount/reboot only).
"""

from __future__ import annotations

import errno
import os
import stat

from hanabi_wire.constants import (CMDLINE_POWEROFF, E_ALREADY_EXISTS, E_FAILED_PRECONDITION, E_INTERNAL,
                                   E_INVALID_ARGUMENT, E_NOT_FOUND, POWEROFF_REBOOT, SHARE_MOUNT_TAG, cmdline_word)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_STRICTATIME = 1 << 24
MNT_DETACH = 2
# pty ioctls (asm-generic numbers, as on x86_64 and arm64).
TIOCGPTN = 0x80045430
TIOCSPTLCK = 0x40045431
TIOCGPTPEER = 0x5441
LINUX_REBOOT_CMD_POWER_OFF = 0x4321FEDC
LINUX_REBOOT_CMD_RESTART = 0x01234567

RUN_DIR = "/run/hanabi/c"
# Where the VM's 9P file share is mounted, in the run dir: so every container's mount
# namespace detaches it (namespaces.foreign_mounts) and sees only its own binds of it.
# (Container ids start with a letter or digit: no container directory is called this.)
SHARE_DIR_NAME = ".share"
MS_BIND = 4096
MS_REC = 16384
CGROUP_ROOT = "/sys/fs/cgroup"

# (name, major, minor) of the character devices every container /dev gets.
BASIC_DEVICES = (
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
)
BASIC_SYMLINKS = (
    ("ptmx", "pts/ptmx"),
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
    ("core", "/proc/kcore"),
)


class Rootfs:
    """A prepared container root: its path and the mount points to undo (in mount order)."""

    __slots__ = ("path", "mounts", "cgroup", "readonly")

    def __init__(self, path: str) -> None:
        self.path = path
        self.mounts: list[str] = []
        self.cgroup: str | None = None
        self.readonly = False


class SandboxError(Exception):
    """A sandbox operation failed; ``code`` is a protocol error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


_libc: Any = None


def libc() -> Any:
    """The C library through ctypes (loaded on first use)."""
    global _libc
    if _libc is None:
        import ctypes

        _libc = ctypes.CDLL("libc.so.6", use_errno=True)
    return _libc


def _check(ret: int, what: str) -> None:
    if ret != 0:
        import ctypes

        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mount(source: str, target: str, fstype: str, flags: int = 0, data: str = "") -> None:
    """mount(2)."""
    _check(
        libc().mount(source.encode(), target.encode(), fstype.encode(), flags, data.encode() or None),
        f"mount {fstype} on {target}",
    )


def umount(target: str, flags: int = 0) -> None:
    """umount2(2)."""
    _check(libc().umount2(target.encode(), flags), f"umount {target}")


def poweroff_command(cmdline: str) -> int:
    """The reboot(2) command that ends this VM: POWER_OFF, or RESTART when the kernel
    command line says ``hanabi.poweroff=reboot`` (Firecracker has no power-off device; a
    guest restart, with ``reboot=k``, ends the Firecracker process)."""
    if cmdline_word(CMDLINE_POWEROFF, POWEROFF_REBOOT) in cmdline.split():
        return LINUX_REBOOT_CMD_RESTART
    return LINUX_REBOOT_CMD_POWER_OFF


def poweroff() -> None:
    """sync, then reboot(2) with ``poweroff_command`` (QEMU runs with -no-reboot)."""
    os.sync()
    try:
        with open("/proc/cmdline", encoding="utf-8") as f:
            cmdline = f.read()
    except OSError:
        cmdline = ""
    _check(libc().reboot(poweroff_command(cmdline)), "reboot(POWER_OFF)")


def find_sysfs_entry(base: str, attribute: str, value: str) -> str | None:
    """The first entry of sysfs directory ``base`` whose ``attribute`` file reads ``value``."""
    try:
        names = sorted(os.listdir(base))
    except OSError:
        return None
    for name in names:
        try:
            with open(os.path.join(base, name, attribute), encoding="utf-8", errors="replace") as f:
                if f.read().strip() == value:
                    return name
        except OSError:
            continue
    return None


def find_block_device(serial: str, sysfs: str = "/sys") -> str | None:
    """Return the name (e.g. ``vdb``) of the block device whose virtio serial is ``serial``."""
    return find_sysfs_entry(os.path.join(sysfs, "block"), "serial", serial)


def ensure_dev_node(name: str, sysfs_dir: str, file_type: int) -> str:
    """Return /dev/<name>, making the node from ``<sysfs_dir>/<name>/dev`` if devtmpfs
    lacks it (there is no udev in the guest)."""
    path = "/dev/" + name
    if not os.path.exists(path):
        with open(os.path.join(sysfs_dir, name, "dev"), encoding="utf-8") as f:
            major, minor = (int(x) for x in f.read().strip().split(":"))
        os.mknod(path, 0o600 | file_type, os.makedev(major, minor))
    return path


def ensure_block_node(name: str, sysfs: str = "/sys") -> str:
    """Return /dev/<name>, creating the block node if devtmpfs does not have it."""
    return ensure_dev_node(name, os.path.join(sysfs, "block"), stat.S_IFBLK)


def open_pty_in(pts_dir: str) -> tuple[int, int]:
    """Open a pty pair in the devpts mounted at ``pts_dir``; return ``(master, slave)``
    (close-on-exec; the slave is opened without becoming anyone's controlling tty)."""
    import fcntl
    import struct

    flags = os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC
    master = os.open(os.path.join(pts_dir, "ptmx"), flags)
    try:
        fcntl.ioctl(master, TIOCSPTLCK, struct.pack("i", 0))
        try:
            slave = fcntl.ioctl(master, TIOCGPTPEER, flags)
        except OSError:  # kernel < 4.13: open the slave by its number
            (num,) = struct.unpack("I", fcntl.ioctl(master, TIOCGPTN, bytes(4)))
            slave = os.open(os.path.join(pts_dir, str(num)), flags)
    except BaseException:
        os.close(master)
        raise
    return master, slave


class Sandbox:
    """Interface the agent uses for everything that needs root in the guest."""

    use_chroot = True
    use_pid_namespace = False
    dns_port = 53  # where the DNS relay listens (host-side tests use an ephemeral port)
    ns_hide_scope: str | None = None

    def open_pty(self, root: Rootfs) -> tuple[int, int]:
        """A ``(master, slave)`` pty pair for a process of the container at ``root``."""
        return os.openpty()

    def locate(self, rootfs: dict[str, Any]) -> str | None:
        """The device (or directory) holding ``rootfs``; None while it has not appeared."""
        raise NotImplementedError

    def share_path(self, rel: str) -> str | None:
        """The path of ``rel`` (checked by the caller) in the VM's file share, mounting the
        share on first use; None while it has not appeared."""
        raise SandboxError(E_FAILED_PRECONDITION, "this sandbox has no file share")

    def mount_share_soon(self) -> None:
        """Start mounting the VM's file share in the background, ahead of the first create
        that needs it (a clone of a VM template, whose own share appeared with it); nothing
        where there is no share or it cannot be mounted yet (``share_path`` mounts it then)."""

    def setup(self, cid: str, source: str, rootfs: dict[str, Any]) -> Rootfs:
        raise NotImplementedError

    def teardown(self, root: Rootfs) -> None:
        raise NotImplementedError

    def add_mounts(self, root: Rootfs, binds_source: str | None, mounts: list[dict[str, Any]],
                   shared: bool = False) -> None:
        """Make the container's bind and tmpfs mounts: binds come from the container's share
        directory (``shared``: ``binds_source`` is that directory) or the binds disk."""
        if mounts:
            raise SandboxError(E_INVALID_ARGUMENT, "this sandbox cannot make mounts")

    def set_hostname(self, name: str) -> None:
        raise NotImplementedError

    def configure_network(self, interfaces: list[dict[str, Any]], routes: list[dict[str, Any]]) -> None:
        """Bring up loopback and configure the NICs (validated by ``network.check_network``)."""
        raise NotImplementedError

    def cgroup_pids(self, root: Rootfs) -> list[int]:
        return []

    def kill_cgroup(self, root: Rootfs) -> bool:
        return False

    def poweroff(self) -> None:
        """Power the VM off; returns only where that is not possible (host-side tests)."""
        raise NotImplementedError


class GuestSandbox(Sandbox):
    """The real sandbox: mounts inside the VM, chroot, namespaces, cgroup v2, power off."""

    use_pid_namespace = True

    def __init__(self, run_dir: str = RUN_DIR, cgroup_root: str = CGROUP_ROOT) -> None:
        self.run_dir = run_dir
        self.share_mount_point = os.path.join(run_dir, SHARE_DIR_NAME)
        self.ns_hide_scope = run_dir
        self.cgroup_root: str | None = self._init_cgroups(cgroup_root)

    @staticmethod
    def _init_cgroups(root: str) -> str | None:
        try:
            if not os.path.exists(os.path.join(root, "cgroup.procs")):
                os.makedirs(root, exist_ok=True)
                mount("cgroup2", root, "cgroup2", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        except OSError:
            return None
        from .cgroups import enable_controllers

        # For every container's group from the start (as on a host with systemd): its
        # memory.events exists, so its OOM kills are watched without a memory limit too.
        enable_controllers(root)
        return root

    def locate(self, rootfs: dict[str, Any]) -> str | None:
        if rootfs.get("share"):
            return self.share_path(rootfs["share"])
        name = find_block_device(rootfs["serial"])
        if name is None:
            return None
        node = ensure_block_node(name)
        # A disk swapped into a Firecracker placeholder: not before its new size shows.
        from .blkswap import settled

        return node if settled(name, node) else None

    def share_path(self, rel: str) -> str | None:
        point = self.share_mount_point
        if not os.path.ismount(point) and not self._mount_share(point):
            return None
        path = os.path.join(point, rel)
        return path if os.path.isdir(path) else None

    def mount_share_soon(self) -> None:
        """virtio-9p only (QEMU): the share over vsock (Firecracker) needs the host's server,
        which may not listen yet. Joined by ``hardening.ensure_warm`` (every create)."""
        from . import share
        from .hardening import run_soon

        try:
            with open("/proc/cmdline", encoding="utf-8") as f:
                if share.share_aname(f.read()) is not None:
                    return
        except OSError:
            return
        point = self.share_mount_point
        run_soon(lambda: os.path.ismount(point) or self._mount_share(point))

    @staticmethod
    def _mount_share(point: str) -> bool:
        """Mount the share at ``point`` (see share.py); False while it cannot be yet."""
        from . import share

        try:
            with open("/proc/cmdline", encoding="utf-8") as f:
                aname = share.share_aname(f.read())
        except OSError:
            aname = None
        if not share.modules_loaded(share.FD_MODULES if aname else share.VIRTIO_MODULES):
            return False
        os.makedirs(point, mode=0o700, exist_ok=True)
        if aname is None:
            try:
                mount(SHARE_MOUNT_TAG, point, "9p", 0, share.VIRTIO_OPTIONS)
            except OSError as exc:
                if exc.errno == errno.ENOENT:  # no device with that tag (yet)
                    return False
                raise
            return True
        fd = share.connect_host()
        if fd is None:
            return False
        try:
            mount(SHARE_MOUNT_TAG, point, "9p", 0, share.fd_options(fd, aname))
        except BaseException:
            os.close(fd)
            raise
        return True  # the fd stays open: the mount's transport

    def setup(self, cid: str, source: str, rootfs: dict[str, Any]) -> Rootfs:
        path = os.path.join(self.run_dir, cid, "rootfs")
        os.makedirs(path, exist_ok=True)
        root = Rootfs(path)
        root.readonly = bool(rootfs.get("readonly"))
        try:
            # Read-write until add_mounts has made the mount points; then read-only if asked.
            if rootfs.get("share"):  # the host's rootfs directory itself, from the share
                mount(source, path, "", MS_BIND | MS_REC)
            else:
                mount(source, path, rootfs.get("fstype", "ext4"), 0)
            root.mounts.append(path)
            nsd = MS_NOSUID | MS_NODEV | MS_NOEXEC
            self._mount_in(root, "proc", "proc", "proc", nsd)
            self._mount_in(root, "sys", "sysfs", "sysfs", nsd | MS_RDONLY)
            self._mount_in(root, "dev", "tmpfs", "tmpfs", MS_NOSUID | MS_STRICTATIME, "mode=755,size=65536k")
            dev = os.path.join(path, "dev")
            for name, major, minor in BASIC_DEVICES:
                os.mknod(os.path.join(dev, name), 0o666 | stat.S_IFCHR, os.makedev(major, minor))
                os.chmod(os.path.join(dev, name), 0o666)
            for name, target in BASIC_SYMLINKS:
                os.symlink(target, os.path.join(dev, name))
            self._mount_in(root, "dev/pts", "devpts", "devpts", MS_NOSUID | MS_NOEXEC,
                           "newinstance,ptmxmode=0666,mode=0620,gid=5")
            self._mount_in(root, "dev/shm", "shm", "tmpfs", nsd, "mode=1777,size=65536k")
        except BaseException:
            self.teardown(root)
            raise
        if self.cgroup_root is not None:
            cg = os.path.join(self.cgroup_root, "hanabi-" + cid)
            try:
                os.makedirs(cg, exist_ok=True)
                root.cgroup = cg
            except OSError:
                root.cgroup = None
        return root

    def add_mounts(self, root: Rootfs, binds_source: str | None, mounts: list[dict[str, Any]],
                   shared: bool = False) -> None:
        from .mounts import MS_REMOUNT, make_mounts

        try:
            binds_dir = binds_source if shared else None
            if binds_source is not None and not shared:
                binds_dir = os.path.join(os.path.dirname(root.path), "binds")
                os.makedirs(binds_dir, exist_ok=True)
                mount(binds_source, binds_dir, "ext4", 0)
                root.mounts.append(binds_dir)
            make_mounts(root, binds_dir, mounts, mount)
            if root.readonly:
                # Per mount (MS_BIND): a share root's superblock is also its binds'.
                mount("", root.path, "", MS_BIND | MS_REMOUNT | MS_RDONLY)
        except BaseException:
            self.teardown(root)
            raise

    def open_pty(self, root: Rootfs) -> tuple[int, int]:
        pts = os.path.join(root.path, "dev/pts")
        if os.path.ismount(pts):
            return open_pty_in(pts)
        return os.openpty()

    @staticmethod
    def _mount_in(root: Rootfs, rel: str, source: str, fstype: str, flags: int, data: str = "") -> None:
        target = os.path.join(root.path, rel)
        if not os.path.isdir(target):
            os.makedirs(target, mode=0o755, exist_ok=True)
        mount(source, target, fstype, flags, data)
        root.mounts.append(target)

    def teardown(self, root: Rootfs) -> None:
        for target in reversed(root.mounts):
            try:
                umount(target)
            except OSError:
                try:
                    umount(target, MNT_DETACH)
                except OSError:
                    pass
        root.mounts.clear()
        if root.cgroup:
            try:
                os.rmdir(root.cgroup)
            except OSError:
                pass
        for d in (root.path, os.path.join(os.path.dirname(root.path), "binds"), os.path.dirname(root.path)):
            try:
                os.rmdir(d)
            except OSError:
                pass
        os.sync()

    def configure_network(self, interfaces: list[dict[str, Any]], routes: list[dict[str, Any]]) -> None:
        from .network import apply

        apply(interfaces, routes)

    def set_hostname(self, name: str) -> None:
        import socket

        socket.sethostname(name)

    def cgroup_pids(self, root: Rootfs) -> list[int]:
        if not root.cgroup:
            return []
        try:
            with open(os.path.join(root.cgroup, "cgroup.procs"), encoding="ascii") as f:
                return [int(x) for x in f.read().split()]
        except OSError:
            return []

    def kill_cgroup(self, root: Rootfs) -> bool:
        if not root.cgroup:
            return False
        try:
            with open(os.path.join(root.cgroup, "cgroup.kill"), "w", encoding="ascii") as f:
                f.write("1")
            return True
        except OSError:
            return False

    def poweroff(self) -> None:
        poweroff()


class DirSandbox(Sandbox):
    """Host-side test double: every rootfs is ``directory``; nothing is mounted."""

    use_chroot = False
    use_pid_namespace = False
    dns_port = 0

    def __init__(self, directory: str, share_root: str | None = None) -> None:
        self.directory = directory
        self.share_root = share_root  # stands for the VM's file share
        self.hostname: str | None = None
        self.network: tuple[list[dict[str, Any]], list[dict[str, Any]]] | None = None
        self.powered_off = False

    def locate(self, rootfs: dict[str, Any]) -> str | None:
        return self.directory if os.path.isdir(self.directory) else None

    def share_path(self, rel: str) -> str | None:
        if self.share_root is None:
            return super().share_path(rel)
        path = os.path.join(self.share_root, rel)
        return path if os.path.isdir(path) else None

    def setup(self, cid: str, source: str, rootfs: dict[str, Any]) -> Rootfs:
        return Rootfs(source)

    def teardown(self, root: Rootfs) -> None:
        pass

    def set_hostname(self, name: str) -> None:
        self.hostname = name

    def configure_network(self, interfaces: list[dict[str, Any]], routes: list[dict[str, Any]]) -> None:
        self.network = (interfaces, routes)  # recorded: the host's own network is not touched

    def poweroff(self) -> None:
        self.powered_off = True


def errno_code(exc: OSError) -> str:
    """Map an OSError to a protocol error code."""
    if exc.errno in (errno.ENOENT, errno.ENXIO, errno.ESRCH):
        return E_NOT_FOUND
    if exc.errno in (errno.EINVAL, errno.ENAMETOOLONG):
        return E_INVALID_ARGUMENT
    if exc.errno == errno.EEXIST:
        return E_ALREADY_EXISTS
    return E_INTERNAL
