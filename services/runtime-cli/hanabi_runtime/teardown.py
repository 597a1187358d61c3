"""The runtime's half of `delete` (and of a failed `create`'s undo), in the standard library
only: the lean CLI runs it without pydantic, the full CLI with its own RPC client.

One release RPC per daemon, each quick: agentd forgets the sandbox (no word to the guest),
vmmd SIGKILLs the VMM and reaps it, blockd and netd record their part as to be released.
When they have answered the container cannot run any more and whatever it held is recorded
in the daemons' release queues (hanabi_common.releasing); the unmounting, unplugging and
removal happen there, after `delete` returned. Then the stand-ins are SIGKILLed, the
sandbox's directory removed (or, when a daemon is down, left with the disowned marker for
it: hanabi_common.marker) and the container's host cgroups removed.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

from hanabi_common.errors import HanabiError, Internal, NotFound, Unavailable
from hanabi_runtime.clilog import logger
from hanabi_runtime.procs import is_same_process_alive

SIGKILL = 9  # signal.SIGKILL (the signal module's enums cost the lean `delete` more than its work)
# (daemon, method, what it does): in this order (agentd before the VM goes, so the processes
# it still counts as running are recorded SIGKILLed, not lost).
STEPS = (
    ("agentd", "agent.release", "release the agent"),
    ("vmmd", "vm.release", "kill the VM"),
    ("blockd", "volume.release", "release the volume"),
    ("netd", "net.detach", "detach the network"),
)
# An app container of a Kubernetes pod: only its container in the pod's VM (which the guest
# ends and unmounts) and its share entries; the VM, network and agent session are the pod's.
POD_MEMBER_STEPS = (
    ("agentd", "container.destroy", "destroy the container"),
    ("blockd", "volume.release", "release the volume"),
)
Call = Callable[[str, str, dict], object]  # (daemon, method, body) -> reply; raises HanabiError


def release(cid: str, call: Call, sandbox: str | None = None) -> tuple[list[str], list[str]]:
    """Ask each daemon to release its part (`sandbox`: the pod whose VM runs app container
    `cid`); (failures, daemons that are down)."""
    failures: list[str] = []
    down: list[str] = []
    for daemon, method, what in (STEPS if sandbox is None else POD_MEMBER_STEPS):
        body = {"sandbox_id": cid}
        if sandbox is not None and daemon == "agentd":
            body = {"sandbox_id": sandbox, "container_id": cid}
        try:
            call(daemon, method, body)
        except NotFound:
            pass
        except Unavailable as exc:
            down.append(daemon)
            logger("hanabi.runtime").warning(f"{what}: left to {daemon}, which is down",
                                             extra={"error": exc.message})
        except HanabiError as exc:
            failures.append(f"{what}: {exc.message}")
    return failures, down


def kill_standins(standins: Iterable[tuple[int | None, int | None]]) -> None:
    """SIGKILL the stand-ins (pid, start time) that still run."""
    for pid, start in standins:
        if pid and is_same_process_alive(pid, start):
            try:
                os.kill(pid, SIGKILL)
            except ProcessLookupError:
                pass


def remove_tree(path: str) -> None:
    """`shutil.rmtree(path, ignore_errors=True)` without shutil (its import, bz2 and lzma
    included, costs the lean `delete` a few ms): entries removed through directory fds,
    symlinks never followed; what cannot be removed stays, silently."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return
    try:
        _clear(fd)
    finally:
        os.close(fd)
    try:
        os.rmdir(path)
    except OSError:
        pass


def _clear(dir_fd: int) -> None:
    with os.scandir(dir_fd) as entries:
        names = [(entry.name, entry.is_dir(follow_symlinks=False)) for entry in entries]
    for name, is_dir in names:
        try:
            if is_dir:
                child = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
                try:
                    _clear(child)
                finally:
                    os.close(child)
                os.rmdir(name, dir_fd=dir_fd)
            else:
                os.unlink(name, dir_fd=dir_fd)
        except OSError:
            pass


def teardown(cid: str, call: Call, sandboxes_dir: str, standins: Callable[[], list],
             cgroup_dirs: list[str] | None, sandbox: str | None = None, paused: bool = False) -> None:
    """The whole runtime's half: release, stand-ins, the sandbox directory, the cgroups.
    `standins()` lists them (read before the directory goes); `sandbox`: the pod of an app
    container; `paused`: its VM is frozen, and is thawed first so that its guest can flush
    what its processes wrote (agentd's release asks it to) before the VM is killed.
    Internal if not clean."""
    if paused:
        try:
            call("vmmd", "vm.resume", {"sandbox_id": cid})
        except HanabiError as exc:
            logger("hanabi.runtime").warning("a paused VM not thawed before its release: its guest cannot flush",
                                             extra={"container": cid, "error": exc.message})
    failures, down = release(cid, call, sandbox)
    kill_standins(standins())
    if down:
        from hanabi_common.marker import disown

        if disown(sandboxes_dir, cid, down):
            logger("hanabi.runtime").warning("container removed; the daemons that are down finish its cleanup "
                                             "when they start", extra={"container": cid, "daemons": sorted(down)})
    else:
        remove_tree(os.path.join(sandboxes_dir, cid))
    if cgroup_dirs:
        from hanabi_runtime.cgroups import remove
        left = remove(cgroup_dirs)
        if left:
            failures.append(f"cgroups still in use: {', '.join(left)}")
    if failures:
        raise Internal(f"container {cid} removed, but not cleanly: " + "; ".join(failures))
