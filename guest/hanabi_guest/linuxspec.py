"""The ``linux`` field of create_container: the subset of the OCI ``linux`` object the guest
applies, validated with runc's rules (pure functions, no I/O).

``check_linux(obj, hostname)`` returns a ``LinuxSpec`` or raises ValueError naming the field.
Namespaces: ``pid`` and ``mount`` are always made (namespaces.py); ``ipc``, ``uts``,
``cgroup`` and ``time`` listed without a path are made for the container's init and joined by its execs;
``network`` is the VM's own network stack (the host joined or made the namespace the VM's
NICs come from, with or without a path). A ``time`` namespace is made as runc 1.2 does,
with ``linux.timeOffsets`` (monotonic, boottime) written before the init enters it. A
``path`` for another type names a namespace of the host, which a VM cannot enter: an
error. A ``user`` namespace is refused (not made in the guest yet). Sysctls follow runc's validator: IPC keys need an ipc
namespace, ``net.*`` a network one, ``kernel.domainname`` a uts one, ``kernel.hostname`` is
refused (the hostname field sets it), anything else "is not in a separate kernel namespace".
A device cgroup that allows every device (``--privileged``) means the VM's devices: see
``allows_all_devices`` and hardening.py.

STDLIB ONLY: runs inside the guest.
"""

from __future__ import annotations

import re

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
DOMAIN_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.-]{0,63}$")
KNOWN_KEYS = ("namespaces", "maskedPaths", "readonlyPaths", "sysctl", "seccomp", "devices",
              "resources", "uidMappings", "gidMappings", "rootfsPropagation", "mountLabel",
              "domainname", "timeOffsets")
PROPAGATIONS = ("", "private", "rprivate", "slave", "rslave", "shared", "rshared", "unbindable",
                "runbindable")


class LinuxSpec:
    """What the guest applies: namespaces to make, paths, sysctls, devices, resources and the
    seccomp object (turned into a filter by seccomp.py), the domainname."""

    __slots__ = ("namespaces", "masked", "readonly", "sysctl", "devices", "resources", "seccomp",
                 "domainname", "propagation", "all_devices", "time_offsets")

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


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


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
        if kind == "user":
            raise ValueError(f"linux.namespaces: a {kind} namespace is not supported in the VM")
        if kind in MADE_IN_GUEST:
            made.append(kind)
    return listed, made


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
        if not _is_int(secs) or not -KTIME_SEC_MAX <= secs <= KTIME_SEC_MAX // 2:
            raise ValueError(f"linux.timeOffsets.{clock}.secs must be an integer in "
                             f"{-KTIME_SEC_MAX}..{KTIME_SEC_MAX // 2}")
        if not _is_int(nsecs) or not 0 <= nsecs < 1_000_000_000:
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
                if not _is_int(n) or not 0 <= n < 1 << 20:
                    raise ValueError(f"{w}.{key} must be 0..{(1 << 20) - 1}")
        mode = d.get("fileMode", 0o666)
        if mode is None:
            mode = 0o666
        if not _is_int(mode) or not 0 <= mode <= 0o7777:
            raise ValueError(f"{w}.fileMode must be 0..07777")
        ids = {}
        for key in ("uid", "gid"):
            n = d.get(key, 0)
            n = 0 if n is None else n
            if not _is_int(n) or not 0 <= n < 2**32 - 1:
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
    from .cgroups import check_resources

    spec.resources = check_resources(obj.get("resources"))
    spec.all_devices = allows_all_devices(spec.resources)
    seccomp = obj.get("seccomp")
    if seccomp is not None and not isinstance(seccomp, dict):
        raise ValueError("linux.seccomp must be an object")
    spec.seccomp = seccomp
    for key in ("uidMappings", "gidMappings"):
        if obj.get(key):
            raise ValueError(f"linux.{key}: user namespaces are not supported in the VM")
    prop = obj.get("rootfsPropagation") or ""
    if prop not in PROPAGATIONS:
        raise ValueError(f"linux.rootfsPropagation {str(prop)[:32]!r} is not a propagation type")
    spec.propagation = prop
    if obj.get("mountLabel"):
        raise ValueError("linux.mountLabel: selinux label is specified in config, but selinux is "
                         "disabled or not supported in the VM")
    return spec
