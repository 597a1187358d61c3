"""Capabilities, no_new_privs and LSM labels of a container process, as runc applies them.

``parse(process)`` validates ``process.capabilities`` (the five sets: bounding, effective,
inheritable, permitted, ambient) into bit masks; a name that is not a Linux capability is
an error naming the set and the name (runc 1.1 warns and ignores it: see README). With no
``capabilities`` object every set is empty, as under runc (the process has no capability
at all, even as uid 0). An ambient capability that is not also permitted and inheritable
is not raised: the kernel refuses it and runc ignores that (``raisable_ambient``; README).

``check_labels(process)`` refuses ``apparmorProfile`` and ``selinuxLabel``: the guest kernel
has AppArmor built in but no policy is ever loaded into it (no apparmor_parser, no profiles:
the host's ``docker-default`` does not exist in the VM), and SELinux is not enabled. runc on
a host without them fails the same way. ``unconfined`` (AppArmor) needs no policy and is
accepted.

In the forked child (runc's order, ``finalizeNamespace``): ``drop_bounding`` first, then
``keep_caps(True)`` across the change of user, ``keep_caps(False)``, then ``apply`` (capset
of effective, permitted, inheritable; ambient cleared and raised). ``no_new_privs`` sets
PR_SET_NO_NEW_PRIVS. Everything the child calls is ctypes on the already loaded libc: no
import after chroot.

STDLIB ONLY: runs inside the guest.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

# Capability numbers are the index in this tuple (linux/capability.h, up to 6.1).
CAP_NAMES = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE", "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_IPC_LOCK", "CAP_IPC_OWNER",
    "CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_CHROOT", "CAP_SYS_PTRACE", "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE", "CAP_SYS_RESOURCE", "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE", "CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP", "CAP_MAC_OVERRIDE", "CAP_MAC_ADMIN", "CAP_SYSLOG", "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ", "CAP_PERFMON", "CAP_BPF", "CAP_CHECKPOINT_RESTORE",
)
CAP_NUMBERS = {name: i for i, name in enumerate(CAP_NAMES)}
SETS = ("bounding", "effective", "inheritable", "permitted", "ambient")
MAX_CAP_ENTRIES = 256

PR_CAPBSET_DROP = 24
PR_SET_KEEPCAPS = 8
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_RAISE = 2
PR_CAP_AMBIENT_CLEAR_ALL = 4
LINUX_CAPABILITY_VERSION_3 = 0x20080522
CAP_LAST_CAP_FILE = "/proc/sys/kernel/cap_last_cap"


class CapSets:
    """The five sets as bit masks (bit N = capability N)."""

    __slots__ = SETS

    def __init__(self, bounding: int = 0, effective: int = 0, inheritable: int = 0,
                 permitted: int = 0, ambient: int = 0) -> None:
        self.bounding = bounding
        self.effective = effective
        self.inheritable = inheritable
        self.permitted = permitted
        self.ambient = ambient

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CapSets) and all(getattr(self, s) == getattr(other, s) for s in SETS)

    def __repr__(self) -> str:
        return "CapSets(" + ", ".join(f"{s}={getattr(self, s):#x}" for s in SETS) + ")"


def mask_of(names: Any, what: str) -> int:
    """The bit mask of a list of capability names; ValueError naming ``what`` and the name."""
    if names is None:
        return 0
    if not isinstance(names, list) or len(names) > MAX_CAP_ENTRIES or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{what} must be a list of capability names")
    mask = 0
    for name in names:
        num = CAP_NUMBERS.get(name)
        if num is None:
            raise ValueError(f"{what}: unknown capability {name[:64]!r}")
        mask |= 1 << num
    return mask


def parse(process: dict[str, Any]) -> CapSets:
    """``process.capabilities`` as ``CapSets`` (all empty when absent, as runc)."""
    caps = process.get("capabilities")
    if caps is None:
        return CapSets()
    if not isinstance(caps, dict):
        raise ValueError("process.capabilities must be an object")
    for key in caps:
        if key not in SETS:
            raise ValueError(f"process.capabilities.{str(key)[:32]}: unknown capability set "
                             f"(one of {', '.join(SETS)})")
    return CapSets(**{s: mask_of(caps.get(s), f"process.capabilities.{s}") for s in SETS})


def raisable_ambient(sets: CapSets) -> int:
    """The ambient capabilities the kernel lets the process raise: those also permitted and
    inheritable. runc raises each and ignores the kernel's refusal (``runc spec`` itself
    lists ambient capabilities without inheritable ones), so the others are not raised."""
    return sets.ambient & sets.permitted & sets.inheritable


def names_of(mask: int) -> list[str]:
    """The capability names of a mask, in number order."""
    return [CAP_NAMES[i] if i < len(CAP_NAMES) else f"CAP_{i}" for i in range(mask.bit_length()) if mask >> i & 1]


def check_labels(process: dict[str, Any]) -> None:
    """Refuse an AppArmor profile or SELinux label the guest cannot apply (see module doc)."""
    profile = process.get("apparmorProfile")
    if profile not in (None, "", "unconfined"):
        raise ValueError(f"process.apparmorProfile {str(profile)[:64]!r}: the VM's kernel has no AppArmor "
                         "policy loaded, so the profile cannot be applied (use apparmor=unconfined)")
    label = process.get("selinuxLabel")
    if label not in (None, ""):
        raise ValueError("process.selinuxLabel: selinux label is specified in config, but selinux is "
                         "disabled or not supported in the VM")


def last_cap(path: str = CAP_LAST_CAP_FILE) -> int:
    """The highest capability number the running kernel knows."""
    try:
        with open(path, encoding="ascii") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return len(CAP_NAMES) - 1


class Applier:
    """What the forked child calls; made in the parent (ctypes loaded before any chroot)."""

    def __init__(self, sets: CapSets, top: int) -> None:
        import ctypes

        from .sandbox import libc

        self.sets = sets
        self.top = top
        self._libc = libc()
        self._ctypes = ctypes
        self._header = (ctypes.c_uint32 * 2)(LINUX_CAPABILITY_VERSION_3, 0)
        lo, hi = 0xFFFFFFFF, 32
        self._data = (ctypes.c_uint32 * 6)(
            sets.effective & lo, sets.permitted & lo, sets.inheritable & lo,
            sets.effective >> hi & lo, sets.permitted >> hi & lo, sets.inheritable >> hi & lo)

    def _prctl(self, *args: int) -> int:
        c = self._ctypes
        full = [c.c_ulong(a) for a in (*args, 0, 0, 0, 0)][:5]
        if self._libc.prctl(c.c_int(args[0]), *full[1:]) != 0:
            return c.get_errno()
        return 0

    def _fail(self, err: int, what: str) -> None:
        raise OSError(err, f"{what}: {os.strerror(err)}")

    def drop_bounding(self) -> None:
        for cap in range(self.top + 1):
            if not self.sets.bounding >> cap & 1:
                err = self._prctl(PR_CAPBSET_DROP, cap)
                if err:
                    self._fail(err, f"drop {names_of(1 << cap)[0]} from the bounding set")

    def keep_caps(self, on: bool) -> None:
        err = self._prctl(PR_SET_KEEPCAPS, 1 if on else 0)
        if err:
            self._fail(err, "prctl(PR_SET_KEEPCAPS)")

    def apply(self) -> None:
        if self._libc.capset(self._header, self._data) != 0:
            self._fail(self._ctypes.get_errno(), "capset")
        err = self._prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
        if err:
            self._fail(err, "clear the ambient set")
        ambient = raisable_ambient(self.sets)
        for cap in range(self.top + 1):
            if ambient >> cap & 1:
                err = self._prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap)
                if err:
                    self._fail(err, f"raise ambient {names_of(1 << cap)[0]}")

    def no_new_privs(self) -> None:
        err = self._prctl(PR_SET_NO_NEW_PRIVS, 1)
        if err:
            self._fail(err, "prctl(PR_SET_NO_NEW_PRIVS)")
