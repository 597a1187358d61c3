"""Capabilities and no_new_privs of a container process, applied as runc applies them.

The sets come validated from ``hanabi_wire.ocispec.caps.parse`` (which also refuses the
LSM labels the VM cannot apply). An ambient capability that is not also permitted and
inheritable is not raised: the kernel refuses it and runc ignores that
(``raisable_ambient``; README).

In the forked child (runc's order, ``finalizeNamespace``): ``drop_bounding`` first, then
``keep_caps(True)`` across the change of user, ``keep_caps(False)``, then ``apply`` (capset
of effective, permitted, inheritable; ambient cleared and raised). ``no_new_privs`` sets
PR_SET_NO_NEW_PRIVS. Everything the child calls is ctypes on the already loaded libc: no
import after chroot.

STDLIB ONLY: runs inside the guest.
"""

from __future__ import annotations

import os

from hanabi_wire.ocispec.caps import CAP_NAMES, CapSets, names_of

PR_CAPBSET_DROP = 24
PR_SET_KEEPCAPS = 8
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_RAISE = 2
PR_CAP_AMBIENT_CLEAR_ALL = 4
LINUX_CAPABILITY_VERSION_3 = 0x20080522
CAP_LAST_CAP_FILE = "/proc/sys/kernel/cap_last_cap"


def raisable_ambient(sets: CapSets) -> int:
    """The ambient capabilities the kernel lets the process raise: those also permitted and
    inheritable. runc raises each and ignores the kernel's refusal (``runc spec`` itself
    lists ambient capabilities without inheritable ones), so the others are not raised."""
    return sets.ambient & sets.permitted & sets.inheritable


_last_cap: dict[str, int] = {}  # path -> value: the running kernel's, read once


def last_cap(path: str = CAP_LAST_CAP_FILE) -> int:
    """The highest capability number the running kernel knows (read once: a VM template's
    clones run the same kernel)."""
    top = _last_cap.get(path)
    if top is None:
        try:
            with open(path, encoding="ascii") as f:
                top = int(f.read().strip())
        except (OSError, ValueError):
            return len(CAP_NAMES) - 1
        _last_cap[path] = top
    return top


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
