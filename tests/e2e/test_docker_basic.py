"""Docker with the hanabi runtime: what already works (run, exit codes, stdio, stop, kill, logs, rm).

Each container boots a VM (about 5 s here under TCG), so containers are shared where a test
only reads: the module's `looper` serves the logs, kill and rm -f tests, in that order.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest

from tests.e2e.docker_env import IMAGE, RUNTIME, LineReader, hanabi_leftovers
from tests.helpers.hanabi import GUEST_DIR, ZYGOTE

pytestmark = pytest.mark.e2e

STOP_MARGIN_S = 12.0     # docker stop -t N: N s, then SIGKILL; the margin covers CLI calls under TCG
SEQUENCE = 20


def guest_kernel() -> str:
    return json.loads((GUEST_DIR / "manifest.json").read_text())["kernel_release"]


def test_uname_prints_the_guest_kernel(docker, name):
    log = docker.hanabi.root / f"{ZYGOTE}.log"
    before = log.read_text()
    done = docker.run_hanabi("--name", name, cmd=["uname", "-r"])
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == guest_kernel()
    assert done.stdout.strip() != os.uname().release
    ran = [json.loads(line)["argv"] for line in log.read_text()[len(before):].splitlines()
           if '"running a command"' in line]
    assert any("create" in argv for argv in ran), ran  # containerd's shim's create went through the zygote


def test_hanabi_fc_entry_asks_for_firecracker(docker):
    """The runtimeArgs of `hanabi-fc` reach the runtime: Firecracker runs it, or it says why it cannot.

    (`hanabi-qemu` is exercised by the twenty-container sequence below.)
    """
    before = hanabi_leftovers(docker)
    done = docker.run_hanabi(runtime="hanabi-fc", cmd=["uname", "-r"])
    if shutil.which("firecracker"):
        assert (done.returncode, done.stdout.strip()) == (0, guest_kernel()), done.stderr
    else:
        assert done.returncode == 125 and "firecracker" in done.stderr, done.stderr
    after = hanabi_leftovers(docker)
    assert {kind: after[kind] - before[kind] for kind in after if after[kind] - before[kind]} == {}


def test_stdin_reaches_the_container_and_the_exit_code_comes_back(docker, name):
    done = docker.run_hanabi("-i", "--name", name, cmd=["sh", "-c", "cat; exit 42"], input="hi\nthere\n")
    assert done.returncode == 42, done.stderr
    assert done.stdout == "hi\nthere\n"


def test_env_workdir_user_and_entrypoint(docker, name):
    done = docker.run_hanabi("--name", name, "-e", "FOO=bar baz", "-w", "/tmp", "-u", "1000:1000",
                             "--entrypoint", "/bin/sh",
                             cmd=["-c", 'echo "foo=$FOO cwd=$(pwd) ids=$(id -u):$(id -g)"'])
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "foo=bar baz cwd=/tmp ids=1000:1000"


def test_stop_of_a_container_ignoring_sigterm_kills_it_after_the_timeout(docker, name):
    docker.check("run", "-d", f"--runtime={RUNTIME}", "--network", "none", "--name", name, IMAGE,
                 "sh", "-c", 'trap "" TERM; echo ready; while :; do sleep 1; done', timeout=90)
    docker.wait_for_log(name, "ready")
    started = time.monotonic()
    done = docker.run("stop", "-t", "2", name, timeout=60)
    elapsed = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    assert elapsed < 2 + STOP_MARGIN_S, f"docker stop -t 2 took {elapsed:.1f} s"
    assert elapsed >= 1.5, f"docker stop returned after {elapsed:.1f} s: SIGTERM was not ignored?"
    assert docker.inspect(name, "{{.State.Status}} {{.State.ExitCode}}") == "exited 137"


@pytest.fixture(scope="module")
def looper(docker):
    """A running container that echoes `got-usr1` when it gets SIGUSR1."""
    cname = "e2e-looper"
    docker.remove(cname)
    docker.check("run", "-d", f"--runtime={RUNTIME}", "--network", "none", "--name", cname, IMAGE,
                 "sh", "-c", 'trap "echo got-usr1" USR1; echo ready; while :; do sleep 0.2; done', timeout=90)
    yield cname
    docker.remove(cname)


def test_logs_show_the_output(docker, looper):
    logs = docker.wait_for_log(looper, "ready")
    assert logs.splitlines()[0] == "ready"


def test_kill_with_a_signal_reaches_the_trap_and_logs_follow_sees_it(docker, looper):
    follow = LineReader(docker.popen("logs", "-f", looper))
    try:
        assert follow.wait_for("ready", timeout=30), f"docker logs -f gave {follow.lines}"
        docker.check("kill", "-s", "USR1", looper, timeout=30)
        assert follow.wait_for("got-usr1", timeout=30), f"docker logs -f gave {follow.lines}"
        assert follow.proc.poll() is None, "docker logs -f ended while the container runs"
    finally:
        follow.close()
    assert "got-usr1" in docker.check("logs", looper, timeout=20)
    assert docker.inspect(looper, "{{.State.Status}}") == "running"


def test_rm_force_removes_a_running_container(docker, looper):
    assert docker.inspect(looper, "{{.State.Status}}") == "running"
    follow = LineReader(docker.popen("logs", "-f", looper))
    try:
        started = time.monotonic()
        done = docker.run("rm", "-f", looper, timeout=60)
        assert done.returncode == 0, done.stderr
        assert time.monotonic() - started < 30
        assert docker.check("ps", "-aq", "--filter", f"name=^{looper}$", timeout=20).strip() == ""
        follow.proc.wait(20)  # `docker logs -f` ends with the container
    finally:
        follow.close()


def test_twenty_containers_in_sequence_leave_nothing_behind(docker):
    """`docker run --rm ... true` twenty times (the hanabi and hanabi-qemu entries in turn), then
    no VM, stand-in, shim, state dir, volume, loop device, mount or tap is left of them."""
    before = hanabi_leftovers(docker)
    containers_before = set(docker.check("ps", "-aq", timeout=20).split())
    took = []
    for index in range(SEQUENCE):
        started = time.monotonic()
        runtime = ("hanabi", "hanabi-qemu")[index % 2]
        done = docker.run_hanabi("--name", f"e2e-seq{index}", cmd=["true"], runtime=runtime)
        took.append(time.monotonic() - started)
        assert done.returncode == 0, f"run {index} (--runtime={runtime}): {done.stderr}"
    print(f"\n{SEQUENCE} x docker run --rm true: median {sorted(took)[SEQUENCE // 2]:.2f} s, "
          f"min {min(took):.2f} s, max {max(took):.2f} s")
    assert set(docker.check("ps", "-aq", timeout=20).split()) == containers_before
    deadline = time.monotonic() + 15  # allow for teardown that ends a moment after `docker run`
    while True:
        after = hanabi_leftovers(docker)
        new = {kind: sorted(after[kind] - before[kind]) for kind in after if after[kind] - before[kind]}
        if not new or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert new == {}, f"left behind: {new}"
