"""linux.seccomp of a container, enforced in the guest with libseccomp (through ctypes).

``plan(obj)`` validates the OCI seccomp object and turns it into a ``Plan`` (pure: action
values, architectures, rules with their argument comparisons, filter attributes) with runc's
rules: an action other than ERRNO/TRACE with ``errnoRet`` is an error; ERRNO and TRACE
without it return EPERM; a rule whose action equals the default is skipped; several
comparisons of the same argument become one rule each (libseccomp ANDs the comparisons of
a rule, and cannot AND two on one argument); unknown actions, operators, architectures or
flags are errors naming the field. ``SCMP_ACT_NOTIFY`` needs a seccomp agent on the host's
side of a ``listenerPath`` socket, which a VM cannot reach: refused.

``Filter(plan)`` builds the libseccomp context in the agent (so a bad profile fails at
create); a syscall name this libseccomp does not know is skipped, as runc and libseccomp do.
The forked child calls ``load()`` (seccomp_load: BPF generated, then installed) as the last
thing before exec when the process has noNewPrivileges, or before it drops its capabilities
otherwise (loading a filter without no_new_privs needs CAP_SYS_ADMIN), exactly as runc.
libseccomp's own no_new_privs attribute is off: the process's ``noNewPrivileges`` decides.

STDLIB ONLY: runs inside the guest (libseccomp.so.2 is in the guest image).
"""

from __future__ import annotations

import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, TypeGuard

LIBRARY = "libseccomp.so.2"
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


def _is_int(v: Any) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool)


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
        if not _is_int(errno_ret) or not 0 <= errno_ret <= 0xFFFF:
            raise ValueError(f"{what}: errnoRet must be 0..65535")
        return base | errno_ret
    if errno_ret is not None:
        raise ValueError(f"{what}: errnoRet is only valid with SCMP_ACT_ERRNO and SCMP_ACT_TRACE")
    return base


def _arg(a: Any, what: str) -> tuple[int, int, int, int]:
    if not isinstance(a, dict):
        raise ValueError(f"{what} must be an object")
    index, op = a.get("index"), a.get("op")
    if not _is_int(index) or not 0 <= index < MAX_ARGS:
        raise ValueError(f"{what}.index must be 0..{MAX_ARGS - 1}")
    if op not in OPERATORS:
        raise ValueError(f"{what}.op: {str(op)[:64]!r} is not a valid operator for seccomp")
    value, two = a.get("value", 0), a.get("valueTwo", 0)
    for key, v in (("value", value), ("valueTwo", two)):
        if not _is_int(v) or not 0 <= v <= U64:
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


_lib: Any = None


def library() -> Any:
    """libseccomp through ctypes (loaded once, before any chroot)."""
    global _lib
    if _lib is None:
        import ctypes

        try:
            lib = ctypes.CDLL(LIBRARY, use_errno=True)
        except OSError as exc:
            err = SeccompError(f"linux.seccomp: cannot be enforced, {LIBRARY} is missing in the guest ({exc})")
            err.code = "FAILED_PRECONDITION"
            raise err from None
        lib.seccomp_init.restype = ctypes.c_void_p
        lib.seccomp_init.argtypes = [ctypes.c_uint32]
        lib.seccomp_release.argtypes = [ctypes.c_void_p]
        lib.seccomp_load.argtypes = [ctypes.c_void_p]
        lib.seccomp_arch_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
        lib.seccomp_arch_resolve_name.restype = ctypes.c_uint32
        lib.seccomp_arch_resolve_name.argtypes = [ctypes.c_char_p]
        lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
        lib.seccomp_attr_set.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32]
        lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                               ctypes.c_uint, ctypes.c_void_p]
        _lib = lib
    return _lib


class SeccompError(Exception):
    """libseccomp refused the profile; ``code`` is a protocol error code."""

    code = "INVALID_ARGUMENT"


class Filter:
    """A libseccomp context built from a ``Plan``; ``load()`` in the child, ``release()``
    in the agent when the container is gone. ``skipped``: names libseccomp did not know."""

    def __init__(self, p: Plan) -> None:
        import ctypes

        lib = library()
        self._lib = lib
        self.skipped: list[str] = []
        self.ctx = lib.seccomp_init(p.default)
        if not self.ctx:
            raise SeccompError("seccomp_init failed")
        try:
            self._fill(p, ctypes)
        except BaseException:
            self.release()
            raise

    def _fill(self, p: Plan, ctypes: Any) -> None:
        lib = self._lib
        for attr, value in p.attrs:
            ret = lib.seccomp_attr_set(self.ctx, attr, value)
            if ret < 0:
                raise SeccompError(f"linux.seccomp.flags: seccomp_attr_set({attr}) failed (errno {-ret})")
        for arch in p.arches:
            token = lib.seccomp_arch_resolve_name(arch.encode())
            if token == 0:
                raise SeccompError(f"linux.seccomp.architectures: libseccomp does not know {arch!r}")
            ret = lib.seccomp_arch_add(self.ctx, token)
            if ret < 0 and ret != -17:  # EEXIST: the native one is there from seccomp_init
                raise SeccompError(f"linux.seccomp.architectures: cannot add {arch!r} (errno {-ret})")

        class Cmp(ctypes.Structure):
            _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                        ("a", ctypes.c_uint64), ("b", ctypes.c_uint64)]

        numbers: dict[str, int] = {}
        for rule in p.rules:
            num = numbers.get(rule.name)
            if num is None:
                num = numbers[rule.name] = lib.seccomp_syscall_resolve_name(rule.name.encode())
            if num == -1:  # __NR_SCMP_ERROR: not a syscall libseccomp knows
                if rule.name not in self.skipped:
                    self.skipped.append(rule.name)
                continue
            # Structure class * n is its array type; mypy does not resolve the metaclass's __mul__ here.
            arr = (Cmp * len(rule.args))(*[Cmp(*a) for a in rule.args]) if rule.args else None  # type: ignore[operator]  # see above
            ret = lib.seccomp_rule_add_array(self.ctx, rule.action, num, len(rule.args), arr)
            if ret < 0:
                raise SeccompError(f"linux.seccomp.syscalls: cannot add the rule for {rule.name!r} "
                                   f"(libseccomp errno {-ret})")

    def load(self) -> None:
        """Install the filter in the calling process (the forked child)."""
        ret = self._lib.seccomp_load(self.ctx)
        if ret < 0:
            raise OSError(-ret, f"seccomp_load: {os.strerror(-ret)}")

    def release(self) -> None:
        if self.ctx:
            self._lib.seccomp_release(self.ctx)
            self.ctx = None
