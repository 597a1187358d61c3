"""PID and mount namespaces of container processes (guest/hanabi_guest/namespaces.py).

The pure parts run everywhere; the last test runs the agent on the host as root with
``--chroot 1 --pidns 1`` (a busybox rootfs in a temp dir), as the guest does it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from hanabi_guest.namespaces import foreign_mounts, outside_mounts, plan, unescape_mount_path
from hanabi_guest.sandbox import DirSandbox, GuestSandbox

from tests.unit.test_guest_agent import AgentProc

MOUNTINFO = """\
22 1 0:20 / / rw shared:1 - rootfs rootfs rw
23 22 0:21 / /proc rw,nosuid,nodev,noexec - proc proc rw
40 22 254:16 / /run/hanabi/c/a/rootfs rw - ext4 /dev/vdb rw
41 40 0:30 / /run/hanabi/c/a/rootfs/proc rw - proc proc rw
42 40 0:31 / /run/hanabi/c/a/rootfs/dev rw - tmpfs tmpfs rw
43 22 254:32 / /run/hanabi/c/a/binds rw - ext4 /dev/vdc rw
50 22 254:48 / /run/hanabi/c/b/rootfs rw - ext4 /dev/vdd rw
51 50 0:32 / /run/hanabi/c/b/rootfs/proc rw - proc proc rw
52 50 0:33 / /run/hanabi/c/b/rootfs/my\\040dir rw - tmpfs tmpfs rw
53 22 0:34 / /run/hanabi/c/ab/rootfs rw - ext4 /dev/vde rw
"""


def test_foreign_mounts_are_the_other_containers_deepest_first() -> None:
    others = foreign_mounts(MOUNTINFO, "/run/hanabi/c", "/run/hanabi/c/a")
    assert set(others) == {"/run/hanabi/c/b/rootfs", "/run/hanabi/c/b/rootfs/proc",
                           "/run/hanabi/c/b/rootfs/my dir", "/run/hanabi/c/ab/rootfs"}
    assert others.index("/run/hanabi/c/b/rootfs/proc") < others.index("/run/hanabi/c/b/rootfs")
    assert foreign_mounts(MOUNTINFO, "/run/hanabi/c/", "/run/hanabi/c/b/") == [
        "/run/hanabi/c/a/rootfs/proc", "/run/hanabi/c/a/rootfs/dev", "/run/hanabi/c/a/rootfs",
        "/run/hanabi/c/a/binds", "/run/hanabi/c/ab/rootfs"]
    assert foreign_mounts("garbage\n\n", "/run/hanabi/c", "/run/hanabi/c/a") == []


def test_mountinfo_escapes() -> None:
    assert unescape_mount_path("/a\\040b\\011c\\012d\\134e") == "/a b\tc\nd\\e"
    assert unescape_mount_path("/plain") == "/plain"
    assert unescape_mount_path("/trailing\\04") == "/trailing\\04"


def test_plan() -> None:
    assert plan(False, True, None) == "none"  # host-side tests: the caller's namespaces
    assert plan(False, False, 42) == "none"
    assert plan(True, True, None) == "new"  # the init: PID 1 of a namespace of its own
    assert plan(True, False, 42) == "join"  # an exec while the init runs: its namespaces
    assert plan(True, False, None) == "none"  # no running init (before start, after its end)


def test_only_the_guest_sandbox_uses_namespaces(tmp_path: Path) -> None:
    assert DirSandbox(str(tmp_path)).use_pid_namespace is False
    assert GuestSandbox.use_pid_namespace is True


def _can_unshare() -> bool:
    if os.geteuid() != 0 or not os.path.exists("/bin/busybox") or not shutil.which("unshare"):
        return False
    return subprocess.run(["unshare", "--fork", "--pid", "--mount", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _can_unshare(), reason="needs root, /bin/busybox and PID namespaces")
def test_pid_namespace_on_the_host(tmp_path: Path) -> None:
    """The guest path, on the host: init is PID 1 of its namespace, exec joins it, /proc is
    the namespace's, exit codes and signals are the processes' own."""
    tmp_path.chmod(0o755)
    (tmp_path / "bin").mkdir()
    shutil.copy2("/bin/busybox", tmp_path / "bin/busybox")
    for applet in ("sh", "ps", "sleep", "cat", "echo", "ls", "tr", "["):
        (tmp_path / "bin" / applet).symlink_to("busybox")
    (tmp_path / "proc").mkdir()
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    a = AgentProc(tmp_path, extra=("--chroot", "1", "--pidns", "1"))
    try:
        spec = {"args": ["sh", "-c", "echo pid=$$; read x; exec sleep 600"], "env": ["PATH=/bin"], "cwd": "/",
                "user": {"uid": 0, "gid": 0}}
        a.ok("create_container", container_id="c1", rootfs={"serial": "s"}, process=spec)
        init_pid = a.ok("start", container_id="c1")["pid"]
        assert init_pid > 1  # the pid outside, where the agent kills and reaps
        a.send({"type": "stdin", "container_id": "c1", "exec_id": "init", "data": b"go\n"})
        first = a.wait_for(lambda m: m.get("type") == "output" and m["exec_id"] == "init")
        assert first["data"] == b"pid=1\n"
        deadline = time.monotonic() + 10
        while Path(f"/proc/{init_pid}/cmdline").read_bytes() != b"sleep\x00600\x00":  # the agent's pid is ours too
            assert time.monotonic() < deadline, "the init did not exec sleep"
            time.sleep(0.02)

        a.ok("exec", container_id="c1", exec_id="ps", process={**spec, "args": ["ps", "-o", "pid,args"]})
        assert a.exit_of("ps")["exit_code"] == 0
        rows = [line.split(None, 1) for line in a.output_of("ps", "stdout").decode().splitlines()[1:]]
        assert [r[1] for r in rows] == ["sleep 600", "ps -o pid,args"], rows  # nothing of the host
        assert rows[0][0] == "1"
        # The mount namespace is the container's: its /proc is not the host's.
        a.ok("exec", container_id="c1", exec_id="self", process={**spec, "args": ["sh", "-c", "echo $$; ls /proc"]})
        assert a.exit_of("self")["exit_code"] == 0
        out = a.output_of("self", "stdout").decode().split()
        pids = [x for x in out[1:] if x.isdigit()]
        assert out[0] != "1" and "1" in pids and out[0] in pids and len(pids) <= 4, out

        a.ok("exec", container_id="c1", exec_id="e3", process={**spec, "args": ["sh", "-c", "exit 3"]})
        assert a.exit_of("e3")["exit_code"] == 3
        a.ok("exec", container_id="c1", exec_id="k", process={**spec, "args": ["sh", "-c", "kill -9 $$"]})
        assert a.exit_of("k")["signal"] == 9  # not PID 1: killed by its own signal

        a.ok("exec", container_id="c1", exec_id="pty", process={**spec, "terminal": True, "args": [
            "sh", "-c", "[ -t 0 ] && [ -t 1 ] && echo on-a-tty-$(cat /proc/1/cmdline | tr '\\0' ' ')"]})
        assert a.exit_of("pty")["exit_code"] == 0
        assert a.output_of("pty", "stdout") == b"on-a-tty-sleep 600\r\n"
        a.ok("exec", container_id="c1", exec_id="bg", process={**spec, "args": ["sleep", "600"]})
        # SIGTERM from outside to a PID 1 without a handler is ignored (kernel rule, as with runc);
        # SIGKILL is not, and the kernel then kills the rest of the namespace.
        a.ok("signal", container_id="c1", exec_id="init", signal=15)
        time.sleep(0.3)
        assert init_pid in [p["pid"] for p in a.ok("ps", container_id="c1")["processes"]]
        a.ok("signal", container_id="c1", exec_id="init", signal=9)
        assert a.exit_of("init")["signal"] == 9
        assert a.exit_of("bg")["signal"] == 9
    finally:
        rc = a.close()
    assert rc == 0, a.stderr()
    assert not os.path.ismount(tmp_path / "proc")  # the namespace's proc never showed up here


HIDING_AGENT = """
import sys
from hanabi_guest.agent import Agent
from hanabi_guest.channel import FdChannel
from hanabi_guest.sandbox import DirSandbox

sandbox = DirSandbox({root!r})
sandbox.use_chroot = sandbox.use_pid_namespace = True
sandbox.ns_hide_scope = {scope!r}
Agent(FdChannel(int(sys.argv[1])), sandbox).run()
"""


@pytest.mark.skipif(not _can_unshare() or not shutil.which("nsenter"), reason="needs root, busybox, nsenter")
def test_a_container_mount_namespace_drops_other_containers_mounts(tmp_path: Path) -> None:
    """Another container's mounts (under the scope, outside this container's directory) are
    detached in the new mount namespace, so it does not pin their filesystems."""
    scope = tmp_path / "c"
    root = scope / "a" / "rootfs"
    other = scope / "b" / "rootfs"
    for d in (root / "bin", root / "proc", other, scope / "a" / "binds"):
        d.mkdir(parents=True)
    shutil.copy2("/bin/busybox", root / "bin/busybox")
    for applet in ("sh", "sleep"):
        (root / "bin" / applet).symlink_to("busybox")
    mounted = []
    try:
        for target in (other, scope / "a" / "binds"):
            subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(target)], check=True)
            mounted.append(target)
        a = AgentProc(tmp_path, script=HIDING_AGENT.format(root=str(root), scope=str(scope)))
        try:
            spec = {"args": ["sleep", "600"], "env": ["PATH=/bin"], "cwd": "/", "user": {"uid": 0, "gid": 0}}
            a.ok("create_container", container_id="c1", rootfs={"serial": "s"}, process=spec)
            pid = a.ok("start", container_id="c1")["pid"]
            # Paths relative to the container's root: its rootfs was moved onto / and every
            # mount outside it (the other container's, its own binds disk, the host's) detached.
            info = Path(f"/proc/{pid}/mountinfo").read_text()
            points = [line.split(" ")[4] for line in info.splitlines()]
            assert "/proc" in points and points.count("/") >= 1, points
            assert not [p for p in points if p not in ("/", "/proc")], points
            assert str(other) in Path("/proc/self/mountinfo").read_text()  # still mounted outside
            a.ok("destroy_container", container_id="c1")
        finally:
            assert a.close() == 0
    finally:
        for target in reversed(mounted):
            subprocess.run(["umount", str(target)], check=False)


def test_outside_mounts_are_everything_but_the_root_and_below() -> None:
    info = "\n".join(f"{i} 1 0:1 / {p} rw - x x rw" for i, p in enumerate([
        "/", "/proc", "/sys", "/sys/fs/cgroup", "/run/hanabi/c/a/rootfs", "/run/hanabi/c/a/rootfs/proc",
        "/run/hanabi/c/a/binds", "/run/hanabi/c/a/rootfs2", "/proc"]))
    assert outside_mounts(info, "/run/hanabi/c/a/rootfs/") == [
        "/run/hanabi/c/a/binds", "/run/hanabi/c/a/rootfs2", "/sys/fs/cgroup", "/proc", "/sys"]


def _ns(pid: int, kind: str) -> str:
    return os.readlink(f"/proc/{pid}/ns/{kind}")


@pytest.mark.skipif(not _can_unshare(), reason="needs root, /bin/busybox and PID namespaces")
def test_a_pods_container_joins_the_sandbox_containers_ipc_and_uts(tmp_path: Path) -> None:
    """join_namespaces (a Kubernetes pod): the app container's init enters the IPC and UTS
    namespaces of the sandbox container's init, keeps a PID and mount namespace of its own,
    and its execs follow its init; a container not in the VM, or one whose init does not
    run, is refused naming the container."""
    tmp_path.chmod(0o755)
    (tmp_path / "bin").mkdir()
    shutil.copy2("/bin/busybox", tmp_path / "bin/busybox")
    for applet in ("sh", "sleep", "hostname"):
        (tmp_path / "bin" / applet).symlink_to("busybox")
    (tmp_path / "proc").mkdir()
    a = AgentProc(tmp_path, extra=("--chroot", "1", "--pidns", "1"))
    spec = {"args": ["sleep", "600"], "env": ["PATH=/bin"], "cwd": "/", "user": {"uid": 0, "gid": 0}}
    own = {"namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "ipc"}, {"type": "uts"}]}
    try:
        a.ok("create_container", container_id="pod", rootfs={"serial": "s"}, process=spec, linux=own,
             hostname="podhost")
        err = a.err("create_container", container_id="app", rootfs={"serial": "s"}, process=spec,
                    linux={"namespaces": [{"type": "pid"}, {"type": "mount"}]},
                    join_namespaces={"ipc": "nosuch"})
        assert "container app" in err["message"] and "nosuch" in err["message"], err
        a.ok("create_container", container_id="app", rootfs={"serial": "s"}, process=spec,
             linux={"namespaces": [{"type": "pid"}, {"type": "mount"}]}, join_namespaces={"ipc": "pod", "uts": "pod"})
        err = a.err("start", container_id="app")  # the sandbox's init does not run yet
        assert "container app" in err["message"] and "container pod" in err["message"], err
        pod = a.ok("start", container_id="pod")["pid"]
        app = a.ok("start", container_id="app")["pid"]
        for kind in ("ipc", "uts"):
            assert _ns(app, kind) == _ns(pod, kind) != _ns(os.getpid(), kind)
        for kind in ("pid", "mnt"):
            assert _ns(app, kind) != _ns(pod, kind)
        a.ok("exec", container_id="app", exec_id="h", process={**spec, "args": ["hostname"]})
        assert a.exit_of("h", cid="app")["exit_code"] == 0
        assert a.output_of("h", "stdout", cid="app") == b"podhost\n"  # the pod's UTS namespace
        a.ok("destroy_container", container_id="app")
        a.ok("destroy_container", container_id="pod")
    finally:
        rc = a.close()
    assert rc == 0, a.stderr()
