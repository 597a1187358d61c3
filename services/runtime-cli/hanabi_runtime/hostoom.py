"""The guest's OOM kill, made an OOM of the stand-in's host memory cgroup (what the shim watches).

Docker learns of an OOM from containerd's runc shim: at create it loads the cgroup of the pid
in the pid file (the init's stand-in, `/proc/<pid>/cgroup`) and, once the task started,
watches it: on cgroup v1 an eventfd registered on `memory.oom_control` through
`cgroup.event_control` (the kernel signals it when the memory cgroup, or an ancestor, is out
of memory), on v2 `memory.events` (`oom_kill` growing). Each notification becomes a `TaskOOM`
event, on which dockerd sets `State.OOMKilled` (of the next exit) and logs an `oom` event.
`runc events` watches the same notification (`{"type":"oom"}`).

Under hanabi the container's memory is the guest's: its OOM killer ends the process inside
the VM, and the host cgroup never runs short. The guest agent reports the kill (`oom`), and
the stand-in then makes its own memory cgroup really go out of memory, briefly, so the
kernel itself notifies every watcher (`raise_oom`). On v1 (this is the host's cgroup of the
container, `linux.cgroupsPath`, where the VM lives too) no process may be killed for it:
the group's OOM killer is disabled for the moment (`memory.oom_control` = 1), its limit set
just above what it uses, and a helper process of the stand-in touches memory until the kernel puts
it to sleep as out of memory and notifies (eventfd, as the shim sees it); then the child is
killed, the limit and the OOM killer are restored. Any process of the group that asked for
memory in that moment (the VMM) waits those few milliseconds, as it would under
`oom_kill_disable`, and goes on. On a cgroup v2 host the notification is `oom_kill`, which
only a kill moves: that is not done (the group holds the VM); `raise_oom` says so.
"""

from __future__ import annotations

import os
import select
import time
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
MARGIN = 4 << 20            # the lowered limit: this much above the group's usage
TOUCH_LIMIT = 256 << 20     # the child gives up after touching this much (the limit did not hold)
NOTIFY_TIMEOUT_S = 5.0
PAGE = os.sysconf("SC_PAGE_SIZE")


class HostOomError(Exception):
    """The host cgroup could not be made to see the OOM."""


def memory_cgroup(proc_cgroup: str, root: Path = CGROUP_ROOT) -> tuple[str, Path] | None:
    """("v1" | "v2", directory) of the memory cgroup named by a `/proc/<pid>/cgroup` text;
    None when there is none (no memory controller, or the hierarchy's root)."""
    v2_path = None
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if "memory" in controllers.split(","):
            rel = path.strip("/")
            return ("v1", root / "memory" / rel) if rel else None
        if controllers == "":
            v2_path = path.strip("/")
    if v2_path is not None and (root / "cgroup.controllers").exists():
        if "memory" in (root / "cgroup.controllers").read_text().split() and v2_path:
            return "v2", root / v2_path
    return None


def own_memory_cgroup(pid: int | str = "self", root: Path = CGROUP_ROOT) -> tuple[str, Path] | None:
    """The memory cgroup of process `pid` (see `memory_cgroup`)."""
    return memory_cgroup(Path(f"/proc/{pid}/cgroup").read_text(), root)


class OomNotifier:
    """A v1 OOM notification of one memory cgroup, as the shim and `runc events` register
    it: an eventfd that becomes readable each time the group is out of memory."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.fd = os.eventfd(0, os.EFD_CLOEXEC)
        control = os.open(self.directory / "memory.oom_control", os.O_RDONLY | os.O_CLOEXEC)
        try:
            (self.directory / "cgroup.event_control").write_text(f"{self.fd} {control}")
        except BaseException:
            os.close(self.fd)
            raise
        finally:
            os.close(control)

    def fileno(self) -> int:
        return self.fd

    def wait(self, timeout: float) -> int:
        """How many notifications came (0: none within `timeout` seconds)."""
        ready, _, _ = select.select([self.fd], [], [], max(timeout, 0.0))
        return os.eventfd_read(self.fd) if ready else 0

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # the kernel drops the registration with the eventfd
            self.fd = -1


def _oom_kill_disable(directory: Path) -> int:
    for line in (directory / "memory.oom_control").read_text().splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill_disable":
            return int(value)
    return 0


# The child that runs into the limit: a fresh interpreter (no fork of a threaded stand-in),
# which says it is ready, waits for the word, then touches fresh pages until the kernel
# stops it (each first write of an anonymous page is charged to the group).
TOUCHER = ("import mmap, os, sys\n"
           "os.write(1, b'r')\n"
           "os.read(0, 1)\n"
           "m = mmap.mmap(-1, {limit})\n"
           "for i in range(0, {limit}, {page}):\n"
           "    m[i] = 1\n"
           "sys.exit(3)\n")


def _start_toucher():
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-S", "-c", TOUCHER.format(limit=TOUCH_LIMIT, page=PAGE)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             close_fds=True)
    assert child.stdout is not None
    if child.stdout.read(1) != b"r":
        child.kill()
        child.wait()
        raise HostOomError("the OOM helper process did not start")
    return child


def _lower_limit(directory: Path) -> None:
    """Set the limit just above the usage (which may grow meanwhile: then again)."""
    for _ in range(20):
        usage = int((directory / "memory.usage_in_bytes").read_text())
        try:
            (directory / "memory.limit_in_bytes").write_text(str((usage + MARGIN) // PAGE * PAGE))
            return
        except OSError as exc:
            last = exc
    raise HostOomError(f"could not lower the limit of {directory}: {last}")


def raise_oom_v1(directory: Path, timeout: float = NOTIFY_TIMEOUT_S) -> float:
    """Make memory cgroup v1 `directory` go out of memory once, killing nobody (see the
    module docstring); the seconds it took. HostOomError when the kernel did not notify."""
    start = time.monotonic()
    notifier = OomNotifier(directory)
    old_limit = (directory / "memory.limit_in_bytes").read_text().strip()
    old_disable = _oom_kill_disable(directory)
    try:
        child = _start_toucher()
    except BaseException:
        notifier.close()
        raise
    notified = 0
    try:
        # In the group itself (a child of the stand-in is already; a caller elsewhere, not).
        (directory / "cgroup.procs").write_text(str(child.pid))
        (directory / "memory.oom_control").write_text("1")
        _lower_limit(directory)
        assert child.stdin is not None
        child.stdin.write(b"g")
        child.stdin.flush()
        notified = notifier.wait(timeout)
    finally:
        child.kill()  # wakes it from the OOM wait, and it goes
        try:
            (directory / "memory.limit_in_bytes").write_text(old_limit)
        finally:
            (directory / "memory.oom_control").write_text(str(old_disable))  # wakes any waiter
            child.wait()
            for pipe in (child.stdin, child.stdout):
                if pipe is not None:
                    pipe.close()
            notifier.close()
    if not notified:
        raise HostOomError(f"memory cgroup {directory} did not report an OOM within {timeout:.0f} s")
    return time.monotonic() - start


def raise_oom(allowed: list[str], pid: int | str = "self", root: Path = CGROUP_ROOT) -> float:
    """Make the memory cgroup of process `pid` (the stand-in) see an OOM, if it is one of
    `allowed` (the container's cgroups the runtime made: never a group of someone else);
    see the module docstring. HostOomError when it cannot."""
    found = own_memory_cgroup(pid, root)
    if found is None or str(found[1]) not in {str(Path(a)) for a in allowed}:
        raise HostOomError("the stand-in is not in a memory cgroup of the container (no linux.cgroupsPath)")
    version, directory = found
    if version != "v1":
        raise HostOomError(f"{directory}: a cgroup v2 host sees an OOM only from a kill in the "
                           "group, which holds the VM; the OOM is not reported there")
    return raise_oom_v1(directory)
