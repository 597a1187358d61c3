"""``process.capabilities`` and the LSM labels of a container process, validated with runc's
rules (pure, no I/O).

``parse(process)`` validates the five sets (bounding, effective, inheritable, permitted,
ambient) into bit masks (``CapSets``); a name that is not a Linux capability is an error
naming the set and the name (runc 1.1 warns and ignores it: see README). With no
``capabilities`` object every set is empty, as under runc (the process has no capability
at all, even as uid 0).

``check_labels(process)`` refuses ``apparmorProfile`` and ``selinuxLabel``: the guest kernel
has AppArmor built in but no policy is ever loaded into it (no apparmor_parser, no profiles:
the host's ``docker-default`` does not exist in the VM), and SELinux is not enabled. runc on
a host without them fails the same way. ``unconfined`` (AppArmor) needs no policy and is
accepted.

The agent's caps.py applies the sets in the forked child.

STDLIB ONLY: runs inside the guest.
"""

from __future__ import annotations

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
