"""The ``linux`` field of create_container: the subset of the OCI ``linux`` object the guest
applies, validated with runc's rules (pure functions, no I/O).

``check_linux(obj, hostname)`` returns a ``LinuxSpec`` or raises ValueError naming the field.
The agent runs it on create_container, and the runtime on config.json before anything is
provisioned; the agent applies the result (hanabi_guest namespaces.py, hardening.py).
Namespaces: ``pid`` and ``mount`` are always made; ``ipc``, ``uts``,
``cgroup`` and ``time`` listed without a path are made for the container's init and joined by its execs;
``network`` is the VM's own network stack (the host joined or made the namespace the VM's
NICs come from, with or without a path). A ``time`` namespace is made as runc 1.2 does,
with ``linux.timeOffsets`` (monotonic, boottime) written before the init enters it. A
``path`` for another type names a namespace of the host, which a VM cannot enter: an
error (a VM cannot join a user namespace of the host either). A ``user`` namespace without a
path is made as runc makes it, with ``linux.uidMappings``/``gidMappings`` (``check_id_mappings``:
the kernel's rules, so a bad map fails create instead of start; runc 1.2's rules for maps
without a user namespace and a user namespace without maps; container root must be mapped,
as runc 1.1 requires). Sysctls follow runc's validator: IPC keys need an ipc
namespace, ``net.*`` a network one, ``kernel.domainname`` a uts one, ``kernel.hostname`` is
refused (the hostname field sets it), anything else "is not in a separate kernel namespace".
A device cgroup that allows every device (``--privileged``) means the VM's devices: see
``allows_all_devices`` and the agent's hardening.py.

STDLIB ONLY: runs inside the guest.
"""

from __future__ import annotations

import re

from ..schema import is_int
from .resources import check_resources

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

NAMESPACE_TYPES = ("pid", "network", "mount", "ipc", "uts", "user", "cgroup", "time")
MADE_IN_GUEST = ("ipc", "uts", "cgroup", "time")
TIME_CLOCKS = ("monotonic", "boottime")
KTIME_SEC_MAX = ((1 << 63) - 1) // 1_000_000_000  # the kernel's bound of a time offset
IPC_SYSCTLS = ("kernel.msgmax", "kernel.msgmnb", "kernel.msgmni", "kernel.sem", "kernel.shmall",
               "kernel.shmmax", "kernel.shmmni", "kernel.shm_rmid_forced")
SYSCTL_KEY = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-/]{0,254}$")
DEVICE_TYPES = ("c", "b", "u", "p")
MAX_PATHS = 256
MAX_SYSCTLS = 256
MAX_DEVICES = 1024
MAX_PATH = 4096
# The kernel's limit of lines in /proc/PID/uid_map and gid_map (UID_GID_MAP_MAX_EXTENTS).
MAX_ID_MAP_LINES = 340
ID_LIMIT = (1 << 32) - 1  # (uid_t)-1 is no id: every mapped id is below it
ID_MAP_KEYS = ("containerID", "hostID", "size")
DOMAIN_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.-]{0,63}$")
KNOWN_KEYS = ("namespaces", "maskedPaths", "readonlyPaths", "sysctl", "seccomp", "devices",
              "resources", "uidMappings", "gidMappings", "rootfsPropagation", "mountLabel",
              "domainname", "timeOffsets")
PROPAGATIONS = ("", "private", "rprivate", "slave", "rslave", "shared", "rshared", "unbindable",
                "runbindable")


class LinuxSpec:
    """What the guest applies: namespaces to make, paths, sysctls, devices, resources and the
    seccomp object (turned into a filter by the agent's seccomp.py), the domainname."""

    __slots__ = ("namespaces", "masked", "readonly", "sysctl", "devices", "resources", "seccomp",
                 "domainname", "propagation", "all_devices", "time_offsets", "uid_map", "gid_map")

    def __init__(self) -> None:
        self.namespaces: list[str] = []
        self.masked: list[str] = []
        self.readonly: list[str] = []
        self.sysctl: dict[str, str] = {}
        self.devices: list[dict[str, Any]] = []
        self.resources: dict[str, Any] = {}
        self.seccomp: dict[str, Any] | None = None
        self.domainname: str | None = None
        self.propagation = ""
        # The device cgroup allows every device (Docker's --privileged): the container gets
        # every device node of the VM, and linux.devices (the host's nodes) is not made.
        self.all_devices = False
        # linux.timeOffsets of a time namespace: (clock, secs, nanosecs), written to
        # /proc/self/timens_offsets before the init enters it (namespaces.py).
        self.time_offsets: list[tuple[str, int, int]] = []
        # A user namespace (linux.namespaces type user): its maps, (containerID, hostID,
        # size) each; both empty without one.
        self.uid_map: list[tuple[int, int, int]] = []
        self.gid_map: list[tuple[int, int, int]] = []

    @property
    def userns(self) -> bool:
        """Whether the container gets a user namespace of its own."""
        return bool(self.uid_map)


def check_path(v: Any, what: str) -> str:
    """An absolute path without '..' components or NUL bytes."""
    if not isinstance(v, str) or not v.startswith("/") or len(v) > MAX_PATH or "\0" in v:
        raise ValueError(f"{what} must be an absolute path")
    if ".." in v.split("/"):
        raise ValueError(f"{what} {v[:64]!r} must not contain '..'")
    return v


def _paths(v: Any, what: str) -> list[str]:
    if v is None:
        return []
    if not isinstance(v, list) or len(v) > MAX_PATHS:
        raise ValueError(f"{what} must be a list of at most {MAX_PATHS} paths")
    return [check_path(p, f"{what}[{i}]") for i, p in enumerate(v)]


def check_namespaces(v: Any) -> tuple[set[str], list[str]]:
    """(every type listed, the types the guest makes); errors as runc's."""
    if v is None:
        return set(), []
    if not isinstance(v, list):
        raise ValueError("linux.namespaces must be a list")
    listed: set[str] = set()
    made: list[str] = []
    for ns in v:
        if not isinstance(ns, dict):
            raise ValueError("linux.namespaces entries must be objects")
        kind, path = ns.get("type"), ns.get("path") or ""
        if kind not in NAMESPACE_TYPES:
            raise ValueError(f"linux.namespaces: namespace type {str(kind)[:32]!r} does not exist")
        if kind in listed:
            raise ValueError(f"linux.namespaces: duplicate namespace {kind!r}")
        listed.add(kind)
        if not isinstance(path, str):
            raise ValueError(f"linux.namespaces: the path of {kind!r} must be a string")
        if path and kind != "network":
            raise ValueError(f"linux.namespaces: {kind} namespace {path[:64]!r} is a namespace of the host, "
                             "which a VM cannot join")
        if kind in MADE_IN_GUEST:
            made.append(kind)
    return listed, made


def check_id_mappings(v: Any, what: str) -> list[tuple[int, int, int]]:
    """linux.uidMappings or gidMappings: at most MAX_ID_MAP_LINES ranges of containerID,
    hostID and size (at least 1), each range below (uid_t)-1, the container ranges not
    overlapping each other nor the host ranges each other (the kernel's rules for uid_map)."""
    if v is None:
        return []
    if not isinstance(v, list):
        raise ValueError(f"{what} must be a list")
    if len(v) > MAX_ID_MAP_LINES:
        raise ValueError(f"{what} has {len(v)} ranges; the kernel takes at most {MAX_ID_MAP_LINES}")
    out: list[tuple[int, int, int]] = []
    for i, m in enumerate(v):
        w = f"{what}[{i}]"
        if not isinstance(m, dict):
            raise ValueError(f"{w} must be an object of containerID, hostID and size")
        for key in m:
            if key not in ID_MAP_KEYS:
                raise ValueError(f"{w}.{str(key)[:32]}: not a field of an id mapping (containerID, hostID, size)")
        nums: list[int] = []
        for key in ID_MAP_KEYS:
            n = m.get(key)
            if not is_int(n) or not 0 <= n < ID_LIMIT:
                raise ValueError(f"{w}.{key} must be an integer 0..{ID_LIMIT - 1}")
            nums.append(n)
        first, lower, size = nums
        if size == 0:
            raise ValueError(f"{w}.size must be at least 1")
        for key, start in (("containerID", first), ("hostID", lower)):
            if start + size > ID_LIMIT:
                raise ValueError(f"{w}: {key} {start} + size {size} goes past the last id {ID_LIMIT - 1}")
        out.append((first, lower, size))
    for side, key in ((0, "containerID"), (1, "hostID")):
        ranges = sorted((m[side], m[side] + m[2], i) for i, m in enumerate(out))
        for (_, end, i), (start, _, j) in zip(ranges, ranges[1:], strict=False):
            if start < end:
                a, b = sorted((i, j))
                raise ValueError(f"{what}[{b}] overlaps {what}[{a}]: their {key} ranges share ids")
    return out


def host_id(container_id: int, mappings: list[tuple[int, int, int]]) -> int | None:
    """The id ``container_id`` of the user namespace has outside it; None: not mapped."""
    for first, lower, size in mappings:
        if first <= container_id < first + size:
            return lower + container_id - first
    return None


def check_user_namespace(obj: dict[str, Any], listed: set[str]) -> tuple[list[tuple[int, int, int]],
                                                                        list[tuple[int, int, int]]]:
    """(uid map, gid map) of a user namespace; runc's rules: maps without the namespace are an
    error (runc 1.2; 1.1 ignores them), the namespace needs both maps and a mapping of the
    container's root (runc 1.1: "no user mapping found")."""
    uids = check_id_mappings(obj.get("uidMappings"), "linux.uidMappings")
    gids = check_id_mappings(obj.get("gidMappings"), "linux.gidMappings")
    if "user" not in listed:
        if uids or gids:
            key = "uidMappings" if uids else "gidMappings"
            raise ValueError(f"linux.{key}: user namespace mappings specified, but the user namespace "
                             "isn't enabled in linux.namespaces")
        return [], []
    for key, maps, kind, who in (("uidMappings", uids, "uid", "user"), ("gidMappings", gids, "gid", "group")):
        if not maps:
            raise ValueError(f"linux.{key}: user namespaces enabled, but no {kind} mappings found")
        if host_id(0, maps) is None:
            raise ValueError(f"linux.{key}: user namespaces enabled, but no {who} mapping found for "
                             f"the container's root ({kind} 0)")
    return uids, gids


def check_user_mapped(process: dict[str, Any], spec: LinuxSpec | None) -> None:
    """In a user namespace, process.user's uid, gid and additionalGids must be mapped (else
    setuid/setgid fail in the container, as under runc, only later)."""
    if spec is None or not spec.userns:
        return
    user = process.get("user") or {}
    uid, gid = user.get("uid", 0), user.get("gid", 0)
    if host_id(uid, spec.uid_map) is None:
        raise ValueError(f"process.user.uid {uid} is not mapped by linux.uidMappings")
    for what, g in (("gid", gid), *(("additionalGids", g) for g in user.get("additionalGids") or [])):
        if host_id(g, spec.gid_map) is None:
            raise ValueError(f"process.user.{what} {g} is not mapped by linux.gidMappings")


def check_time_offsets(v: Any, listed: set[str]) -> list[tuple[str, int, int]]:
    """linux.timeOffsets (runc 1.2): {monotonic|boottime: {secs, nanosecs}}, only with a
    time namespace; secs within the kernel's bound, nanosecs 0..999999999. Whether the
    clock stays within range once offset is checked against the guest's clock at create."""
    if v is None or v == {}:
        return []
    if not isinstance(v, dict):
        raise ValueError("linux.timeOffsets must be an object")
    if "time" not in listed:
        raise ValueError("linux.timeOffsets: time offsets are specified, but no time namespace is")
    out = []
    for clock, off in v.items():
        if clock not in TIME_CLOCKS:
            raise ValueError(f"linux.timeOffsets: {str(clock)[:32]!r} is not a clock of a time namespace "
                             "(monotonic, boottime)")
        if not isinstance(off, dict) or set(off) - {"secs", "nanosecs"}:
            raise ValueError(f"linux.timeOffsets.{clock} must be an object of secs and nanosecs")
        secs, nsecs = off.get("secs", 0), off.get("nanosecs", 0)
        if not is_int(secs) or not -KTIME_SEC_MAX <= secs <= KTIME_SEC_MAX // 2:
            raise ValueError(f"linux.timeOffsets.{clock}.secs must be an integer in "
                             f"{-KTIME_SEC_MAX}..{KTIME_SEC_MAX // 2}")
        if not is_int(nsecs) or not 0 <= nsecs < 1_000_000_000:
            raise ValueError(f"linux.timeOffsets.{clock}.nanosecs must be 0..999999999")
        out.append((clock, secs, nsecs))
    return out


def check_offsets_fit(offsets: list[tuple[str, int, int]], now: dict[str, float]) -> None:
    """The kernel's rule for each offset: the offset clock (``now[clock]`` + offset, in
    seconds) stays within 0..KTIME_SEC_MAX/2."""
    for clock, secs, nsecs in offsets:
        shifted = now[clock] + secs + nsecs / 1e9
        if not 0 <= shifted <= KTIME_SEC_MAX // 2:
            raise ValueError(f"linux.timeOffsets.{clock}: the offset puts the {clock} clock out of range "
                             f"({shifted:.0f} s; it must stay within 0..{KTIME_SEC_MAX // 2})")


def check_sysctl(v: Any, listed: set[str]) -> dict[str, str]:
    """runc's sysctl validation (see the module docstring)."""
    if v is None:
        return {}
    if not isinstance(v, dict) or len(v) > MAX_SYSCTLS:
        raise ValueError(f"linux.sysctl must be an object of at most {MAX_SYSCTLS} entries")
    out = {}
    for key, value in v.items():
        if not isinstance(key, str) or not SYSCTL_KEY.fullmatch(key) or ".." in key:
            raise ValueError(f"linux.sysctl: {str(key)[:64]!r} is not a sysctl name")
        if not isinstance(value, str) or len(value) > 4096 or "\0" in value:
            raise ValueError(f"linux.sysctl.{key}: the value must be a string")
        if key in IPC_SYSCTLS or key.startswith("fs.mqueue."):
            if "ipc" not in listed:
                raise ValueError(f"linux.sysctl: sysctl {key!r} is not allowed in the hosts ipc namespace")
        elif key.startswith("net."):
            if "network" not in listed:
                raise ValueError(f"linux.sysctl: sysctl {key!r} is not allowed in the hosts network namespace")
        elif key == "kernel.domainname" and "uts" in listed:
            pass
        elif key == "kernel.hostname" and "uts" in listed:
            raise ValueError('linux.sysctl: sysctl "kernel.hostname" is not allowed; use the hostname field')
        else:
            raise ValueError(f"linux.sysctl: sysctl {key!r} is not in a separate kernel namespace")
        out[key] = value
    return out


def check_devices(v: Any) -> list[dict[str, Any]]:
    """linux.devices: path, type c/b/u/p, major and minor (not for p), fileMode, uid, gid."""
    if v is None:
        return []
    if not isinstance(v, list) or len(v) > MAX_DEVICES:
        raise ValueError(f"linux.devices must be a list of at most {MAX_DEVICES} devices")
    out = []
    for i, d in enumerate(v):
        w = f"linux.devices[{i}]"
        if not isinstance(d, dict):
            raise ValueError(f"{w} must be an object")
        path = check_path(d.get("path"), f"{w}.path")
        kind = d.get("type")
        if kind not in DEVICE_TYPES:
            raise ValueError(f"{w}.type {str(kind)[:8]!r} must be one of c, b, u, p")
        major, minor = d.get("major", 0), d.get("minor", 0)
        if kind != "p":
            for key, n in (("major", major), ("minor", minor)):
                if not is_int(n) or not 0 <= n < 1 << 20:
                    raise ValueError(f"{w}.{key} must be 0..{(1 << 20) - 1}")
        mode = d.get("fileMode", 0o666)
        if mode is None:
            mode = 0o666
        if not is_int(mode) or not 0 <= mode <= 0o7777:
            raise ValueError(f"{w}.fileMode must be 0..07777")
        ids = {}
        for key in ("uid", "gid"):
            n = d.get(key, 0)
            n = 0 if n is None else n
            if not is_int(n) or not 0 <= n < ID_LIMIT:
                raise ValueError(f"{w}.{key} must be a 32-bit id")
            ids[key] = n
        out.append({"path": path, "type": kind, "major": major, "minor": minor, "mode": mode, **ids})
    return out


def allows_all_devices(resources: dict[str, Any]) -> bool:
    """Whether linux.resources.devices ends in an allow-everything rule (``{"allow": true,
    "access": "rwm"}`` without type or numbers, as Docker writes for --privileged)."""
    rules = resources.get("devices")
    if not isinstance(rules, list) or not rules:
        return False
    last = rules[-1]
    return (isinstance(last, dict) and last.get("allow") is True and last.get("type") in (None, "a")
            and last.get("major") in (None, -1) and last.get("minor") in (None, -1)
            and set(str(last.get("access") or "rwm")) >= set("rwm"))


def check_linux(obj: Any, hostname: str | None = None) -> LinuxSpec | None:
    """Validate the ``linux`` field (None: a host that sends none; nothing of it applies)."""
    if obj is None:
        return None
    if not isinstance(obj, dict):
        raise ValueError("field 'linux' must be an object")
    for key in obj:
        if key not in KNOWN_KEYS:
            raise ValueError(f"linux.{str(key)[:32]}: not a field the guest applies")
    spec = LinuxSpec()
    listed, spec.namespaces = check_namespaces(obj.get("namespaces"))
    if hostname and "uts" not in listed:
        raise ValueError("hostname: unable to set hostname without a private UTS namespace")
    domain = obj.get("domainname")
    if domain not in (None, ""):
        if not isinstance(domain, str) or not DOMAIN_RE.fullmatch(domain):
            raise ValueError("domainname is invalid")
        if "uts" not in listed:
            raise ValueError("domainname: unable to set domainname without a private UTS namespace")
        spec.domainname = domain
    spec.time_offsets = check_time_offsets(obj.get("timeOffsets"), listed)
    spec.masked = _paths(obj.get("maskedPaths"), "linux.maskedPaths")
    spec.readonly = _paths(obj.get("readonlyPaths"), "linux.readonlyPaths")
    spec.sysctl = check_sysctl(obj.get("sysctl"), listed)
    spec.devices = check_devices(obj.get("devices"))
    spec.resources = check_resources(obj.get("resources"))
    spec.all_devices = allows_all_devices(spec.resources)
    seccomp = obj.get("seccomp")
    if seccomp is not None and not isinstance(seccomp, dict):
        raise ValueError("linux.seccomp must be an object")
    spec.seccomp = seccomp
    spec.uid_map, spec.gid_map = check_user_namespace(obj, listed)
    prop = obj.get("rootfsPropagation") or ""
    if prop not in PROPAGATIONS:
        raise ValueError(f"linux.rootfsPropagation {str(prop)[:32]!r} is not a propagation type")
    spec.propagation = prop
    if obj.get("mountLabel"):
        raise ValueError("linux.mountLabel: selinux label is specified in config, but selinux is "
                         "disabled or not supported in the VM")
    return spec
