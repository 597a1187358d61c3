"""The container's linux settings applied in the guest, runc's way (validated by
hanabi_wire.ocispec.linux).

``Security`` is what a container keeps from create to destroy: its ``LinuxSpec`` and its
seccomp ``Filter`` (built at create, so a bad profile fails there). ``prepare(root, sec,
ncpus)`` runs once after the container's mounts are made: linux.devices are made in its
/dev (mknod with type, major, minor, mode, uid, gid; an existing node is replaced, as
runc's bind/mknod over the default ones) and linux.resources are written to its cgroup.
When the device cgroup allows every device (Docker's --privileged) the container's /dev
gets every device node of the VM instead (``vm_devices``: never a host device, the VM
cannot reach them) and linux.devices, which names the host's nodes, is not made; its /sys
is writable and its cgroup2 mount read-write.

``Hardener`` runs in the forked child of the container's *init*, in its new mount and
other namespaces, before chroot, in runc's order: a read-only cgroup2 on /sys/fs/cgroup
(where nothing is mounted yet), hostname and domainname (a new UTS
namespace), sysctls (written to /proc/sys of the container's namespaces), readonlyPaths
(a recursive bind onto itself remounted read-only), maskedPaths (/dev/null bound over a
file, a read-only tmpfs over a directory; a path that does not exist is skipped, as runc).
Paths are resolved inside the rootfs (``secure_join``): a symlink in the image never leads
out of it. Exec processes join the init's namespaces and so see all of it.

STDLIB ONLY: runs inside the guest.
"""

from __future__ import annotations

import os
import stat

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from hanabi_wire.ocispec.linux import LinuxSpec

    from .sandbox import Rootfs
    from .seccomp import Filter

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC = 32, 4096, 16384
ST_NOSUID, ST_NODEV, ST_NOEXEC = 2, 4, 8
MAX_SYMLINKS = 40
DEVICE_KINDS = {"c": stat.S_IFCHR, "u": stat.S_IFCHR, "b": stat.S_IFBLK, "p": stat.S_IFIFO}


class Background:
    """``fn()`` run in a thread of its own (``_thread``: threading is not in the image);
    ``join()`` waits and returns its result or raises its exception. ctypes calls release
    the GIL, so libseccomp work runs while the agent's loop waits for requests. Anything
    that forks must join first (a fork while the thread holds a libc lock could deadlock
    the child)."""

    __slots__ = ("_lock", "_result", "_error")

    def __init__(self, fn: Any) -> None:
        import _thread

        self._result: Any = None
        self._error: BaseException | None = None
        self._lock = _thread.allocate_lock()
        self._lock.acquire()
        _thread.start_new_thread(self._run, (fn,))

    def _run(self, fn: Any) -> None:
        try:
            self._result = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to join()
            self._error = exc
        finally:
            self._lock.release()

    def join(self) -> Any:
        with self._lock:
            pass
        if self._error is not None:
            raise self._error
        return self._result


class Security:
    """A container's validated linux settings and its seccomp filter (or None).

    ``build`` validates everything at create (``plan`` checks the whole profile); once
    create has replied, ``compile_soon`` compiles the libseccomp context in the background
    (about 0.13 s for Docker's default profile under TCG) while the host goes on to start
    the container. ``filter()`` waits for it: every spawn asks for it before forking, so
    a profile libseccomp itself rejects fails the container's start (INVALID_ARGUMENT
    naming linux.seccomp)."""

    __slots__ = ("spec", "_filter", "_building", "_plan", "_failed")

    def __init__(self, spec: LinuxSpec | None, filter_: Filter | None = None) -> None:
        self.spec = spec
        self._filter = filter_
        self._building: Background | None = None
        self._plan: Any = None
        self._failed: BaseException | None = None  # the compilation's error, raised by every filter()

    @classmethod
    def build(cls, linux: Any, hostname: str | None) -> Security:
        """Validate the create_container ``linux`` field; ValueError naming the field."""
        from hanabi_wire.ocispec.linux import check_linux

        ensure_warm()
        spec = check_linux(linux, hostname)
        if spec is not None and spec.time_offsets:
            import time

            from hanabi_wire.ocispec.linux import check_offsets_fit

            check_offsets_fit(spec.time_offsets, {"monotonic": time.clock_gettime(time.CLOCK_MONOTONIC),
                                                  "boottime": time.clock_gettime(time.CLOCK_BOOTTIME)})
        sec = cls(spec)
        if spec is not None and spec.seccomp is not None:
            from hanabi_wire.ocispec.seccomp import plan

            sec._plan = plan(spec.seccomp)
        return sec

    def compile_soon(self) -> None:
        """Start compiling the filter in the background (once create has replied: the VM
        may have a single vCPU, which the mounts of create need)."""
        if self._plan is not None:
            from .seccomp import Filter

            p, self._plan = self._plan, None
            self._building = Background(lambda: Filter(p))

    def filter(self) -> Filter | None:
        """The compiled seccomp filter (waiting for it), or None without a profile; a
        compilation that failed raises its error at every call (a process never runs
        without the container's filter because an earlier call already reported it)."""
        self.compile_soon()
        self.settle()
        if self._failed is not None:
            raise self._failed
        return self._filter

    def settle(self) -> None:
        """Wait for a compilation that is running (its result or error kept for
        ``filter``): before any fork, as ``Background`` requires."""
        if self._building is not None:
            building, self._building = self._building, None
            try:
                self._filter = building.join()
            except BaseException as exc:  # noqa: BLE001 - raised by filter()
                self._failed = exc

    def release(self) -> None:
        try:
            filt = self.filter()
        except Exception:  # noqa: BLE001 - it failed: nothing to release
            filt = None
        if filt is not None:
            filt.release()
        self._filter = None


_warm: Background | None = None
_soon: list[Background] = []  # other head starts (``run_soon``), joined by ``ensure_warm`` too
_frozen = False
WARM_PROFILE = {"defaultAction": "SCMP_ACT_ERRNO", "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86"],
                "syscalls": [{"names": ["read", "write", "clone"], "action": "SCMP_ACT_ALLOW",
                              "args": [{"index": 0, "value": 1, "op": "SCMP_CMP_MASKED_EQ"}]}]}
WARM_PROCESS = {"args": ["true"], "noNewPrivileges": True, "user": {"uid": 0, "gid": 0},
                "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
                "capabilities": {"bounding": ["CAP_KILL"], "effective": ["CAP_KILL"], "permitted": ["CAP_KILL"]}}


def start_warm_up() -> None:
    """Import and run once, in a thread while the agent still waits for its channel, what
    create_container and start need (these modules, libseccomp, a small filter, the
    validators, a process's capability applier): under TCG the first run of any code is
    slow (translation): about 0.1 s less for every container create. ``ensure_warm`` joins
    it (before any create, so before any fork)."""
    global _warm
    try:
        _warm = Background(_warm_up)
    except Exception:  # noqa: BLE001 - PID 1 must start regardless
        _warm = None


def run_soon(fn: Any) -> None:
    """Run ``fn()`` in a thread now, as a head start whose result nobody needs (its errors
    are dropped: the code that needs its effect does it again if it did not happen);
    ``ensure_warm`` joins it, so every create (and so every fork) waits for it first."""
    try:
        _soon.append(Background(fn))
    except Exception:  # noqa: BLE001 - a head start only
        pass


def ensure_warm() -> None:
    """Wait until the warm-up thread and the ``run_soon`` head starts have ended (at once
    when there are none)."""
    global _warm
    pending = [_warm] if _warm is not None else []
    _warm = None
    pending += _soon
    _soon.clear()
    for warm in pending:
        try:
            warm.join()
        except Exception:  # noqa: BLE001 - only a head start; create reports real errors
            pass


def freeze_for_template() -> None:
    """Before a VM template's snapshot (its first ``restored``): the warm-up done, every
    object the agent has made so far moved out of the garbage collector's sight
    (``gc.freeze``). A clone's collections then never walk the template's objects: they
    neither spend its vCPU on them nor write to (and so copy) the template's pages they live
    on. Once per agent (a clone inherits that it was done)."""
    global _frozen
    ensure_warm()
    if _frozen:
        return
    import gc

    from .network import link_up

    try:  # loopback is up in every VM (configure_network makes sure): its clones inherit it
        link_up("lo")
    except Exception:  # noqa: BLE001 - configure_network reports it
        pass
    gc.collect()
    gc.freeze()
    _frozen = True


def _warm_up() -> None:
    import resource  # noqa: F401 - process rlimits

    from hanabi_wire.ocispec.linux import check_linux
    from hanabi_wire.ocispec.process import check_process
    from hanabi_wire.ocispec.seccomp import plan

    from . import oom, share  # noqa: F401 - imported by create on first use
    from .rtnl import encode
    from .cgroups import plan_files
    from .process import make_guard
    from .seccomp import Filter

    check_process(WARM_PROCESS)
    make_guard(WARM_PROCESS)
    spec = check_linux({"namespaces": [{"type": "uts"}, {"type": "ipc"}], "maskedPaths": ["/proc/kcore"],
                        "sysctl": {"kernel.shmmax": "1"}, "resources": {"memory": {"limit": 1 << 20}},
                        "devices": [{"path": "/dev/x", "type": "c", "major": 1, "minor": 3}]}, "h")
    assert spec is not None
    plan_files(spec.resources, 1)
    Filter(plan(WARM_PROFILE)).release()
    for argv in (["ip", "link", "set", "dev", "x", "mtu", "1500", "up"], ["ip", "-4", "addr", "replace", "10.0.0.2/24", "dev", "x"],
                 ["ip", "-4", "route", "replace", "default", "via", "10.0.0.1", "dev", "x"]):
        encode(argv, lambda name: 1, 1)


def secure_join(root: str, path: str) -> str:
    """``root`` + ``path`` with every symlink resolved as if ``root`` were / (never out of it)."""
    root = root.rstrip("/") or "/"
    parts = [p for p in path.split("/") if p not in ("", ".")]
    done: list[str] = []
    links = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if done:
                done.pop()
            continue
        here = os.path.join(root, *done, part)
        try:
            target = os.readlink(here)
        except OSError:
            done.append(part)
            continue
        links += 1
        if links > MAX_SYMLINKS:
            raise OSError(40, f"too many levels of symbolic links in {path}")
        if target.startswith("/"):
            done = []
        parts = [p for p in target.split("/") if p not in ("", ".")] + parts
    return os.path.join(root, *done)


def make_devices(dev_root: str, devices: list[dict[str, Any]], root: str) -> None:
    """mknod each device (path inside ``root``), replacing what is there."""
    for d in devices:
        path = secure_join(root, d["path"])
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        try:
            if not os.path.isdir(path):
                os.unlink(path)
        except FileNotFoundError:
            pass
        kind = DEVICE_KINDS[d["type"]]
        rdev = 0 if d["type"] == "p" else os.makedev(d["major"], d["minor"])
        try:
            os.mknod(path, kind | (d["mode"] & 0o7777), rdev)
        except OSError as exc:
            raise ValueError(f"linux.devices {d['path']!r}: mknod: {exc.strerror}") from None
        os.chmod(path, d["mode"] & 0o7777)
        os.chown(path, d["uid"], d["gid"])


def vm_devices(dev: str = "/dev") -> list[dict[str, Any]]:
    """Every character and block node of the VM's /dev (devtmpfs), as linux.devices entries;
    not its pts, shm or mqueue, and not the agent's virtio-serial ports."""
    out = []
    for top, dirs, files in os.walk(dev):
        rel = os.path.relpath(top, dev)
        if rel.split("/")[0] in ("pts", "shm", "mqueue", "virtio-ports"):
            dirs[:] = []
            continue
        for name in sorted(files):
            path = os.path.join(top, name)
            try:
                st = os.lstat(path)
            except OSError:
                continue
            if not (stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)) or name.startswith("vport"):
                continue
            out.append({"path": "/dev/" + os.path.normpath(os.path.join(rel, name)),
                        "type": "b" if stat.S_ISBLK(st.st_mode) else "c",
                        "major": os.major(st.st_rdev), "minor": os.minor(st.st_rdev),
                        "mode": stat.S_IMODE(st.st_mode), "uid": st.st_uid, "gid": st.st_gid})
    return out


def prepare(root: Rootfs, sec: Security, ncpus: int | None = None) -> None:
    """After the container's mounts: linux.devices and linux.resources (see module doc)."""
    spec = sec.spec
    if spec is None:
        return
    if spec.all_devices:
        missing = [d for d in vm_devices() if not os.path.lexists(secure_join(root.path, d["path"]))]
        make_devices(os.path.join(root.path, "dev"), missing, root.path)
    elif spec.devices:
        devices = spec.devices
        if spec.userns:
            devices = [outside_ids(d, spec) for d in devices]
        make_devices(os.path.join(root.path, "dev"), devices, root.path)
    if spec.userns:
        own_by_container_root(root.path, spec)
    if spec.resources and root.cgroup:
        from .cgroups import apply, plan_files

        apply(root.cgroup, plan_files(spec.resources, ncpus or os.cpu_count() or 1))


USERNS_OWNED = ("dev", "dev/shm")  # the tmpfs mounts of sandbox.setup


def outside_ids(device: dict[str, Any], spec: LinuxSpec) -> dict[str, Any]:
    """A linux.devices entry with its uid and gid (ids in the container) as the ids outside
    the user namespace; an id it does not map stays as it is (it reads as the overflow id)."""
    from hanabi_wire.ocispec.linux import host_id

    uid, gid = host_id(device["uid"], spec.uid_map), host_id(device["gid"], spec.gid_map)
    return {**device, "uid": device["uid"] if uid is None else uid, "gid": device["gid"] if gid is None else gid}


def own_by_container_root(root: str, spec: LinuxSpec) -> None:
    """The container's /dev and /dev/shm tmpfs, owned by its root as runc's are (runc mounts
    them as that root, inside the user namespace); the device nodes stay the VM root's, as
    the host's nodes runc binds there stay the host root's. The rootfs itself is never
    chowned: it is the user's (as under runc, whose caller chowns it)."""
    from hanabi_wire.ocispec.linux import host_id

    uid, gid = host_id(0, spec.uid_map), host_id(0, spec.gid_map)
    for rel in USERNS_OWNED:
        path = os.path.join(root, rel)
        if os.path.ismount(path):
            os.chown(path, -1 if uid is None else uid, -1 if gid is None else gid)


class Hardener:
    """The child-side part (see module doc); built in the agent, run after fork."""

    def __init__(self, spec: LinuxSpec, hostname: str | None, cgroup: str | None = None) -> None:
        from .sandbox import libc, mount

        self.spec = spec
        self.hostname = hostname
        self.cgroup = cgroup
        self._libc = libc()
        self._mount = mount

    def set_names(self) -> None:
        """hostname and domainname in the container's new UTS namespace."""
        for name, fn in ((self.hostname, "sethostname"), (self.spec.domainname, "setdomainname")):
            if name and "uts" in self.spec.namespaces:
                raw = name.encode()
                if getattr(self._libc, fn)(raw, len(raw)) != 0:
                    import ctypes

                    err = ctypes.get_errno()
                    raise OSError(err, f"{fn}: {os.strerror(err)}")

    def write_sysctls(self, proc: str = "/proc", net: bool | None = None) -> None:
        """The sysctls (``net``: only the ``net.*`` ones, False: all others, None: all)."""
        for key, value in self.spec.sysctl.items():
            if net is not None and key.startswith("net.") != net:
                continue
            path = os.path.join(proc, "sys", key.replace(".", "/"))
            try:
                with open(path, "w", encoding="utf-8") as f:
                    f.write(value)
            except OSError as exc:
                raise OSError(exc.errno, f"linux.sysctl.{key} = {value!r}: {exc.strerror}") from None

    def readonly(self, root: str) -> None:
        for p in self.spec.readonly:
            target = secure_join(root, p)
            if not os.path.lexists(target):
                continue
            self._mount(target, target, "", MS_BIND | MS_REC)
            flags = MS_BIND | MS_REMOUNT | MS_RDONLY | MS_REC | self._statvfs_flags(target)
            self._mount(target, target, "", flags)

    def mask(self, root: str) -> None:
        null = secure_join(root, "/dev/null")
        if not os.path.exists(null):
            null = "/dev/null"
        for p in self.spec.masked:
            target = secure_join(root, p)
            if not os.path.lexists(target):
                continue
            if os.path.isdir(target):
                self._mount("tmpfs", target, "tmpfs", MS_RDONLY)
            else:
                self._mount(null, target, "", MS_BIND)

    @staticmethod
    def _statvfs_flags(path: str) -> int:
        f = os.statvfs(path).f_flag
        return ((MS_NOSUID if f & ST_NOSUID else 0) | (MS_NODEV if f & ST_NODEV else 0)
                | (MS_NOEXEC if f & ST_NOEXEC else 0))

    def mount_cgroup(self, root: str) -> None:
        """The container's cgroup on <rootfs>/sys/fs/cgroup (read-only; read-write with all
        devices allowed) unless something is mounted there already: a cgroup2 mount with a
        cgroup namespace (its root is the container's group), else a bind of the
        container's group; either way its limits read as /sys/fs/cgroup/memory.max etc.,
        as a container under runc reads its own group. (Docker's cgroup mount is not made
        by mounts.py.)"""
        target = os.path.join(root, "sys/fs/cgroup")
        if not os.path.isdir(target) or os.path.ismount(target):
            return
        ro = 0 if self.spec.all_devices else MS_RDONLY
        flags = MS_NOSUID | MS_NODEV | MS_NOEXEC
        if "cgroup" in self.spec.namespaces:
            self._mount("cgroup2", target, "cgroup2", ro | flags)
        elif self.cgroup:
            self._mount(self.cgroup, target, "", MS_BIND)
            self._mount(target, target, "", MS_BIND | MS_REMOUNT | ro | flags)

    def writable_sys(self, root: str) -> None:
        """--privileged (all devices allowed): the container's /sys writable, as runc's."""
        target = os.path.join(root, "sys")
        if self.spec.all_devices and os.path.ismount(target) and os.statvfs(target).f_flag & MS_RDONLY:
            self._mount(target, target, "", MS_BIND | MS_REMOUNT | self._statvfs_flags(target))

    def run(self, root: str) -> str:
        """All of it, in runc's order; returns the stage that is running (for errors)."""
        self.writable_sys(root)
        self.mount_cgroup(root)
        self.set_names()
        # With a user namespace the net.* ones were written before it (process.py): the VM's
        # network namespace belongs to the guest's user namespace.
        self.write_sysctls(net=False if self.spec.userns else None)
        self.readonly(root)
        self.mask(root)
        return "done"
