"""A container's init made at create and let go at start (handlers ``_make_init``,
process ``spawn_held``/``Held``), run on the host as root with ``--chroot 1 --pidns 1`` (a
busybox rootfs in a temp dir), as the guest does it: the waiting init is the one start
reports, a destroy or a signal before start ends it and leaves nothing, one killed while it
waits is made again at start, and a failure of its setup is start's error, as before. As
runc's `start`, start returns once the init is past its wait, before its exec: a program
that is missing is start's error (looked up before the wait, as runc's create does), one the
kernel cannot run fails after start, on the process's stderr, exit status 1 (as under runc)."""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from tests.unit.test_guest_agent import AgentProc
from tests.unit.test_guest_namespaces import _can_unshare

pytestmark = pytest.mark.skipif(not _can_unshare(), reason="needs root, /bin/busybox and PID namespaces")
SPEC = {"args": ["sh", "-c", "echo started; exit 7"], "env": ["PATH=/bin"], "cwd": "/",
        "user": {"uid": 0, "gid": 0}}


def rootfs(tmp_path: Path) -> Path:
    tmp_path.chmod(0o755)
    (tmp_path / "bin").mkdir()
    shutil.copy2("/bin/busybox", tmp_path / "bin/busybox")
    for applet in ("sh", "sleep", "echo"):
        (tmp_path / "bin" / applet).symlink_to("busybox")
    (tmp_path / "proc").mkdir()
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    return tmp_path


def children(pid: int) -> list[int]:
    """The children of every thread of `pid` (a thread that ended meanwhile has none)."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out += [int(p) for p in (task / "children").read_text().split()]
        except FileNotFoundError:
            continue
    return out


def held_init(a: AgentProc, root: Path, others: tuple[int, ...] = ()) -> int:
    """The agent's child that waits in namespaces of its own, its root moved onto / of its
    mount namespace (polled: it is made after create's reply)."""
    deadline = time.monotonic() + 10
    own = {kind: os.readlink(f"/proc/{a.proc.pid}/ns/{kind}") for kind in ("pid", "mnt")}
    while True:
        for pid in children(a.proc.pid):
            try:
                if pid not in others and (all(os.readlink(f"/proc/{pid}/ns/{kind}") != own[kind] for kind in own)
                        and os.path.samefile(f"/proc/{pid}/root/etc/passwd", root / "etc/passwd")):
                    return pid
            except OSError:
                continue
        assert time.monotonic() < deadline, "no init waits in the rootfs after create"
        time.sleep(0.02)


def gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] in "ZX"
    except OSError:
        return True


@pytest.fixture
def agent(tmp_path: Path):
    root = rootfs(tmp_path)
    a = AgentProc(root, extra=("--chroot", "1", "--pidns", "1"))
    yield a, root
    rc = a.close()
    assert rc == 0, a.stderr()


def test_the_init_waits_after_create_and_start_lets_it_run(agent) -> None:
    a, root = agent
    a.ok("create_container", container_id="c1", rootfs={"serial": "s"}, process=SPEC)
    waiting = held_init(a, root)
    time.sleep(0.2)
    assert not gone(waiting)  # it waits: nothing of the process ran
    assert a.ok("ps", container_id="c1")["processes"] == []  # as before start
    assert a.ok("start", container_id="c1")["pid"] == waiting
    assert a.exit_of("init")["exit_code"] == 7
    assert a.output_of("init", "stdout") == b"started\n"
    a.ok("destroy_container", container_id="c1")


def test_destroy_before_start_ends_the_waiting_init(agent) -> None:
    a, root = agent
    a.ok("create_container", container_id="c1", rootfs={"serial": "s"}, process=SPEC)
    waiting = held_init(a, root)
    a.ok("destroy_container", container_id="c1")
    assert gone(waiting) and waiting not in children(a.proc.pid)  # killed and reaped


def test_a_signal_before_start_reaches_no_process_and_start_still_runs_it(agent) -> None:
    a, root = agent
    a.ok("create_container", container_id="c1", rootfs={"serial": "s"}, process=SPEC)
    waiting = held_init(a, root)
    a.ok("signal", container_id="c1", exec_id="init", all=True, signal=signal.SIGKILL)
    assert gone(waiting)
    pid = a.ok("start", container_id="c1")["pid"]  # spawned at start, as before
    assert pid != waiting
    assert a.exit_of("init")["exit_code"] == 7
    a.ok("destroy_container", container_id="c1")


def test_an_init_killed_while_it_waits_is_made_again_at_start(agent) -> None:
    a, root = agent
    a.ok("create_container", container_id="c1", rootfs={"serial": "s"}, process=SPEC)
    waiting = held_init(a, root)
    os.kill(waiting, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while waiting in children(a.proc.pid):  # the agent's loop reaps it
        assert time.monotonic() < deadline
        time.sleep(0.02)
    pid = a.ok("start", container_id="c1")["pid"]
    assert pid != waiting
    assert a.exit_of("init")["exit_code"] == 7
    assert a.output_of("init", "stdout") == b"started\n"
    a.ok("destroy_container", container_id="c1")


def test_a_setup_failure_is_starts_error_as_before(agent) -> None:
    a, root = agent
    a.ok("create_container", container_id="c1", rootfs={"serial": "s"}, process={**SPEC, "cwd": "/nowhere"})
    error = a.err("start", container_id="c1")
    assert error["code"] == "FAILED_PRECONDITION" and "chdir to cwd" in error["message"], error
    assert children(a.proc.pid) == [] or all(gone(p) for p in children(a.proc.pid))
    error = a.err("start", container_id="c1")  # still created: the same error again
    assert "chdir to cwd" in error["message"], error
    a.ok("destroy_container", container_id="c1")


def test_a_waiting_init_holds_no_other_containers_descriptors(agent) -> None:
    """c2's init, made while c1's `cat` runs, does not keep c1's stdin open: closing it ends
    c1's `cat` while c2 still waits for its start."""
    a, root = agent
    a.ok("create_container", container_id="c1", rootfs={"serial": "s"},
         process={**SPEC, "args": ["sh", "-c", "while read x; do echo got $x; done; echo eof"]})
    running = a.ok("start", container_id="c1")["pid"]
    a.ok("create_container", container_id="c2", rootfs={"serial": "s"}, process=SPEC)
    waiting = held_init(a, root, others=(running,))
    a.send({"type": "stdin", "container_id": "c1", "exec_id": "init", "data": b"one\n"})
    a.ok("close_stdin", container_id="c1", exec_id="init")
    assert a.exit_of("init", cid="c1")["exit_code"] == 0
    assert a.output_of("init", "stdout", cid="c1") == b"got one\neof\n"
    assert not gone(waiting)
    assert a.ok("start", container_id="c2")["pid"] == waiting
    assert a.exit_of("init", cid="c2")["exit_code"] == 7
    for cid in ("c1", "c2"):
        a.ok("destroy_container", container_id=cid)


def test_a_missing_program_is_starts_error(agent) -> None:
    a, root = agent
    for args, message in ((["no-such-program"], 'exec: "no-such-program": executable file not found in $PATH'),
                          (["/bin/nope"], 'exec: "/bin/nope": stat /bin/nope: no such file or directory'),
                          (["/etc/passwd"], 'exec: "/etc/passwd": permission denied')):
        a.ok("create_container", container_id="c1", rootfs={"serial": "s"}, process={**SPEC, "args": args})
        error = a.err("start", container_id="c1")
        assert error["code"] == "FAILED_PRECONDITION" and error["message"] == message, error
        a.ok("destroy_container", container_id="c1")
    assert children(a.proc.pid) == [] or all(gone(p) for p in children(a.proc.pid))


def test_start_does_not_wait_for_the_exec_whose_failure_is_the_processs_as_under_runc(agent) -> None:
    """A program the kernel cannot run (no ELF, no #!) passes the look-up: start succeeds
    and the process reports it on its stderr and exits 1, as runc's init does after
    `runc start` returned (`exec /bin/bad: exec format error`)."""
    a, root = agent
    (root / "bin/bad").write_bytes(b"\x00\x01 not a program\n")
    (root / "bin/bad").chmod(0o755)
    a.ok("create_container", container_id="c1", rootfs={"serial": "s"}, process={**SPEC, "args": ["bad"]})
    waiting = held_init(a, root)
    assert a.ok("start", container_id="c1")["pid"] == waiting
    assert a.exit_of("init")["exit_code"] == 1
    assert a.output_of("init", "stderr") == b"exec /bin/bad: exec format error\n"
    a.ok("destroy_container", container_id="c1")


@pytest.mark.parametrize("nnp", [True, False])
def test_a_waiting_init_with_a_seccomp_filter_starts_under_it(agent, nnp) -> None:
    """With noNewPrivileges the filter comes after the wait and STARTED; without (Docker's
    default) before the change of user, so the init waits before it and says STARTED
    from under it: either way start reports the waiting init and the process runs filtered."""
    a, root = agent
    profile = {"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_X86_64"],
               "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]}
    process = {**SPEC, "args": ["sh", "-c", "mkdir /d 2>/dev/null || echo refused; exit 3"], "noNewPrivileges": nnp}
    a.ok("create_container", container_id="c1", rootfs={"serial": "s"}, process=process,
         linux={"seccomp": profile})
    waiting = held_init(a, root)
    assert a.ok("start", container_id="c1")["pid"] == waiting
    assert a.exit_of("init")["exit_code"] == 3
    assert a.output_of("init", "stdout") == b"refused\n"
    assert not (root / "d").exists()
    a.ok("destroy_container", container_id="c1")


def test_a_filter_that_refuses_the_acknowledgement_still_starts_the_init(agent) -> None:
    """Without noNewPrivileges the filter is loaded before STARTED; one that refuses write(2)
    refuses that too: start then waits for the exec (the error pipe's end), as before."""
    a, root = agent
    profile = {"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_X86_64"],
               "syscalls": [{"names": ["write"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]}
    a.ok("create_container", container_id="c1", rootfs={"serial": "s"},
         process={**SPEC, "args": ["sh", "-c", "exit 4"], "noNewPrivileges": False}, linux={"seccomp": profile})
    waiting = held_init(a, root)
    assert a.ok("start", container_id="c1")["pid"] == waiting
    assert a.exit_of("init")["exit_code"] == 4
    a.ok("destroy_container", container_id="c1")
