"""``linux.seccomp`` of a container, validated with runc's rules and turned into a ``Plan``
(pure, no I/O).

``plan(obj)`` validates the OCI seccomp object and returns its action values,
architectures, rules with their argument comparisons and filter attributes: an action
other than ERRNO/TRACE with ``errnoRet`` is an error; ERRNO and TRACE without it return
EPERM; a rule whose action equals the default is skipped; several comparisons of the same
argument become one rule each (libseccomp ANDs the comparisons of a rule, and cannot AND
two on one argument); unknown actions, operators, architectures or flags are errors naming
the field. ``SCMP_ACT_NOTIFY`` needs a seccomp agent on the host's side of a
``listenerPath`` socket, which a VM cannot reach: refused. libseccomp's own no_new_privs
attribute is off (``ATTR_CTL_NNP``): the process's ``noNewPrivileges`` decides.

The agent's seccomp.py builds the libseccomp filter from the plan and loads it; the
runtime runs ``plan`` on config.json before anything is provisioned.

STDLIB ONLY: runs inside the guest.
"""

from __future__ import annotations

from ..schema import is_int

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

EPERM = 1
MAX_RULES = 4096
MAX_NAMES = 4096
MAX_ARGS = 6

ACT_KILL_PROCESS = 0x80000000
ACT_KILL_THREAD = 0x00000000
ACT_TRAP = 0x00030000
ACT_NOTIFY = 0x7FC00000
ACT_ERRNO = 0x00050000
ACT_TRACE = 0x7FF00000
ACT_LOG = 0x7FFC0000
ACT_ALLOW = 0x7FFF0000
ACTIONS = {
    "SCMP_ACT_KILL": ACT_KILL_THREAD,
    "SCMP_ACT_KILL_THREAD": ACT_KILL_THREAD,
    "SCMP_ACT_KILL_PROCESS": ACT_KILL_PROCESS,
    "SCMP_ACT_TRAP": ACT_TRAP,
    "SCMP_ACT_ERRNO": ACT_ERRNO,
    "SCMP_ACT_TRACE": ACT_TRACE,
    "SCMP_ACT_LOG": ACT_LOG,
    "SCMP_ACT_ALLOW": ACT_ALLOW,
    "SCMP_ACT_NOTIFY": ACT_NOTIFY,
}
OPERATORS = {
    "SCMP_CMP_NE": 1, "SCMP_CMP_LT": 2, "SCMP_CMP_LE": 3, "SCMP_CMP_EQ": 4,
    "SCMP_CMP_GE": 5, "SCMP_CMP_GT": 6, "SCMP_CMP_MASKED_EQ": 7,
}
# enum scmp_filter_attr
ATTR_CTL_NNP = 3
ATTR_CTL_TSYNC = 4
ATTR_CTL_LOG = 6
ATTR_CTL_SSB = 7
FLAGS = {
    "SECCOMP_FILTER_FLAG_TSYNC": ATTR_CTL_TSYNC,
    "SECCOMP_FILTER_FLAG_LOG": ATTR_CTL_LOG,
    "SECCOMP_FILTER_FLAG_SPEC_ALLOW": ATTR_CTL_SSB,
}
ARCHES = ("X86", "X86_64", "X32", "ARM", "AARCH64", "MIPS", "MIPS64", "MIPS64N32", "MIPSEL",
          "MIPSEL64", "MIPSEL64N32", "PPC", "PPC64", "PPC64LE", "S390", "S390X", "PARISC",
          "PARISC64", "RISCV64")
U64 = (1 << 64) - 1


class Rule:
    """One seccomp_rule_add: syscall ``name``, ``action`` value, ``args`` as
    ``(index, op, value, value_two)`` (all ANDed)."""

    __slots__ = ("name", "action", "args")

    def __init__(self, name: str, action: int, args: list[tuple[int, int, int, int]]) -> None:
        self.name = name
        self.action = action
        self.args = args

    def __repr__(self) -> str:
        return f"Rule({self.name!r}, {self.action:#x}, {self.args!r})"


class Plan:
    """A validated profile: default action, extra architectures (libseccomp names), rules,
    filter attributes ``(attr, value)``."""

    __slots__ = ("default", "arches", "rules", "attrs")

    def __init__(self, default: int, arches: list[str], rules: list[Rule], attrs: list[tuple[int, int]]) -> None:
        self.default = default
        self.arches = arches
        self.rules = rules
        self.attrs = attrs


def action_value(name: Any, errno_ret: Any, what: str) -> int:
    """The libseccomp value of action ``name`` with ``errno_ret`` (None: EPERM)."""
    if not isinstance(name, str) or name not in ACTIONS:
        raise ValueError(f"{what}: {str(name)[:64]!r} is not a valid action for seccomp")
    base = ACTIONS[name]
    if base == ACT_NOTIFY:
        raise ValueError(f"{what}: SCMP_ACT_NOTIFY needs a seccomp agent on the host (listenerPath), "
                         "which a VM cannot reach")
    if base in (ACT_ERRNO, ACT_TRACE):
        if errno_ret is None:
            errno_ret = EPERM
        if not is_int(errno_ret) or not 0 <= errno_ret <= 0xFFFF:
            raise ValueError(f"{what}: errnoRet must be 0..65535")
        return base | errno_ret
    if errno_ret is not None:
        raise ValueError(f"{what}: errnoRet is only valid with SCMP_ACT_ERRNO and SCMP_ACT_TRACE")
    return base


def _arg(a: Any, what: str) -> tuple[int, int, int, int]:
    if not isinstance(a, dict):
        raise ValueError(f"{what} must be an object")
    index, op = a.get("index"), a.get("op")
    if not is_int(index) or not 0 <= index < MAX_ARGS:
        raise ValueError(f"{what}.index must be 0..{MAX_ARGS - 1}")
    if op not in OPERATORS:
        raise ValueError(f"{what}.op: {str(op)[:64]!r} is not a valid operator for seccomp")
    value, two = a.get("value", 0), a.get("valueTwo", 0)
    for key, v in (("value", value), ("valueTwo", two)):
        if not is_int(v) or not 0 <= v <= U64:
            raise ValueError(f"{what}.{key} must be an unsigned 64-bit integer")
    return index, OPERATORS[op], value, two


def plan(obj: Any) -> Plan:
    """Validate ``linux.seccomp`` and turn it into a ``Plan``; ValueError naming the field."""
    w = "linux.seccomp"
    if not isinstance(obj, dict):
        raise ValueError(f"{w} must be an object")
    for key in ("listenerPath", "listenerMetadata"):
        if obj.get(key):
            raise ValueError(f"{w}.{key}: a seccomp agent on the host cannot be reached from a VM")
    default = action_value(obj.get("defaultAction"), obj.get("defaultErrnoRet"), f"{w}.defaultAction")
    arches = []
    raw_arches = obj.get("architectures") or []
    if not isinstance(raw_arches, list):
        raise ValueError(f"{w}.architectures must be a list")
    for a in raw_arches:
        if not (isinstance(a, str) and a.startswith("SCMP_ARCH_") and a[10:] in ARCHES):
            raise ValueError(f"{w}.architectures: {str(a)[:64]!r} is not a valid architecture")
        arches.append(a[10:].lower())
    attrs = [(ATTR_CTL_NNP, 0)]
    flags = obj.get("flags") or []
    if not isinstance(flags, list):
        raise ValueError(f"{w}.flags must be a list")
    for f in flags:
        if f not in FLAGS:
            raise ValueError(f"{w}.flags: {str(f)[:64]!r} is not a supported seccomp flag")
        attrs.append((FLAGS[f], 1))
    rules: list[Rule] = []
    syscalls = obj.get("syscalls") or []
    if not isinstance(syscalls, list) or len(syscalls) > MAX_RULES:
        raise ValueError(f"{w}.syscalls must be a list of at most {MAX_RULES} entries")
    for i, sc in enumerate(syscalls):
        ws = f"{w}.syscalls[{i}]"
        if not isinstance(sc, dict):
            raise ValueError(f"{ws} must be an object")
        names = sc.get("names")
        if not (isinstance(names, list) and names and len(names) <= MAX_NAMES
                and all(isinstance(n, str) and 0 < len(n) < 64 for n in names)):
            raise ValueError(f"{ws}.names must be a non-empty list of syscall names")
        action = action_value(sc.get("action"), sc.get("errnoRet"), f"{ws}.action")
        raw_args = sc.get("args") or []
        if not isinstance(raw_args, list) or len(raw_args) > 4 * MAX_ARGS:
            raise ValueError(f"{ws}.args must be a list")
        args = [_arg(a, f"{ws}.args[{j}]") for j, a in enumerate(raw_args)]
        if action == default:
            continue
        indexes = [a[0] for a in args]
        groups = [[a] for a in args] if len(set(indexes)) < len(indexes) else [args]
        for name in names:
            for g in groups:
                rules.append(Rule(name, action, g))
    return Plan(default, arches, rules, attrs)
