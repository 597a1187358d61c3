"""linux.seccomp of a container, enforced in the guest with libseccomp (through ctypes).

The profile comes validated as a ``Plan`` from ``hanabi_wire.ocispec.seccomp.plan`` (runc's
rules; shared with the runtime's pre-check).

``Filter(plan)`` builds the libseccomp context in the agent (so a bad profile fails at
create); a syscall name this libseccomp does not know is skipped, as runc and libseccomp do.
The forked child calls ``load()`` (seccomp_load: BPF generated, then installed) as the last
thing before exec when the process has noNewPrivileges, or before it drops its capabilities
otherwise (loading a filter without no_new_privs needs CAP_SYS_ADMIN), exactly as runc.
libseccomp's own no_new_privs attribute is off (in the plan's attributes).

STDLIB ONLY: runs inside the guest (libseccomp.so.2 is in the guest image).
"""

from __future__ import annotations

import os

from hanabi_wire.constants import E_FAILED_PRECONDITION, E_INVALID_ARGUMENT

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from hanabi_wire.ocispec.seccomp import Plan

LIBRARY = "libseccomp.so.2"
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
            err.code = E_FAILED_PRECONDITION
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

    code = E_INVALID_ARGUMENT


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
