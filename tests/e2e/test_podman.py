"""podman 4.3 (Debian's, with conmon) running containers through `--runtime hanabi-runtime`.

run, run -d, logs, exec (plain and -t), stop (the container's own SIGTERM handler runs),
start again, pause/unpause, stats, restart, rm, run -it on a real pty, two containers on a CNI bridge network, network
connect/disconnect on a running container, and a call hanabi cannot serve (--preserve-fds).
After each test nothing is left: no VM, stand-in, conmon, state dir, volume, tap, CNI result
or podman cgroup. podman's state is all under a temp dir (tests/e2e/podman_env.py).
"""

from __future__ import annotations

import fcntl
import itertools
import os
import platform
import re
import select
import struct
import subprocess
import termios
import time

import pytest

from tests.e2e.podman_env import IMAGE, PrivatePodman, podman_skip_reason
from tests.e2e.engines import engine_fixture

pytestmark = pytest.mark.e2e
_counter = itertools.count()
TRAP = 'echo hello; trap "echo bye; exit 3" TERM; while true; do sleep 0.2; done'


podman = engine_fixture("podman", PrivatePodman, prefix="hbp", skip_reason=podman_skip_reason,
                        start=PrivatePodman.setup, images=PrivatePodman.import_busybox)


@pytest.fixture
def name(request, podman):
    made = f"p{next(_counter)}-" + re.sub(r"[^a-zA-Z0-9_.-]", "-", request.node.name)[:40]
    yield made
    podman.run("rm", "-f", "-t", "0", made, timeout=120)


def assert_nothing_left(podman: PrivatePodman) -> None:
    """Every container is gone and so is everything it had (cleanup by conmon's exit command is async)."""
    deadline = time.monotonic() + 45
    while True:
        left = {key: found for key, found in podman.leftovers().items() if found}
        if not left:
            return
        assert time.monotonic() < deadline, f"left behind: {left}"
        time.sleep(0.3)


def pty_session(argv: list[str], env: dict, steps: list[tuple[bytes, bytes]], timeout: float = 90) -> tuple[int, bytes]:
    """Run argv on a new pty (30x100); for each (wait_for, send): read until wait_for, then send.
    Returns the exit status and everything read."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True)
    os.close(slave)
    seen, deadline = b"", time.monotonic() + timeout
    pending = list(steps)
    try:
        while True:
            if pending and pending[0][0] in seen:
                os.write(master, pending.pop(0)[1])
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"pty session timed out; waiting for {pending[:1]}; read {seen[-500:]!r}")
            ready, _, _ = select.select([master], [], [], min(left, 1.0))
            if ready:
                try:
                    chunk = os.read(master, 4096)
                except OSError:  # EIO: the other side is closed
                    chunk = b""
                if not chunk:
                    break
                seen += chunk
            elif proc.poll() is not None and not pending:
                break
        return proc.wait(30), seen
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_run_prints_the_guest_kernel_and_exits_with_the_status(podman):
    done = podman.run("run", "--rm", IMAGE, "sh", "-c", "uname -r; exit 3")
    assert done.returncode == 3, done.stderr
    guest_kernel = done.stdout.strip()
    assert guest_kernel and guest_kernel != platform.release(), (guest_kernel, done.stderr)
    info = podman.check("info", "--format", "{{.Host.OCIRuntime.Version}}")
    assert "hanabi-runtime version" in info
    assert_nothing_left(podman)


def test_detached_logs_exec_stop_start_pause_restart_rm(podman, name):
    cid = podman.check("run", "-d", "--name", name, IMAGE, "sh", "-c", TRAP).strip()
    podman.wait_for("hello in the logs", lambda: "hello" in podman.run("logs", name).stdout)
    done = podman.run("exec", name, "sh", "-c", "echo in-$(hostname); exit 4")
    assert done.returncode == 4 and done.stdout.strip() == f"in-{cid[:12]}", (done.stdout, done.stderr)
    status, out = pty_session(podman.argv("exec", "-it", name, "sh", "-c", "tty; exit 5"), podman.env(), [])
    assert status == 5 and b"/dev/pts/" in out, out
    podman.check("stop", "-t", "20", name, timeout=60)
    assert podman.check("inspect", "-f", "{{.State.Status}} {{.State.ExitCode}}", name).split() == ["exited", "3"]
    assert podman.run("logs", name).stdout.split() == ["hello", "bye"]
    # start again: podman deleted the runtime's container when it exited and creates it anew
    podman.check("start", name, timeout=90)
    podman.wait_for("a second hello", lambda: podman.run("logs", name).stdout.split().count("hello") == 2)
    assert podman.check("inspect", "-f", "{{.State.Status}}", name).strip() == "running"
    podman.check("pause", name)  # the whole VM
    assert podman.check("inspect", "-f", "{{.State.Status}}", name).strip() == "paused"
    podman.check("unpause", name)
    assert podman.run("exec", name, "true").returncode == 0
    stats = podman.check("stats", "--no-stream", "--format", "{{.MemUsage}} {{.PIDs}}", name).split()
    assert stats and stats[0][0].isdigit() and int(stats[-1]) > 0, stats  # the VM's cgroup: VMM + stand-ins
    podman.check("restart", "-t", "20", name, timeout=120)
    podman.wait_for("a third hello", lambda: podman.run("logs", name).stdout.split().count("hello") == 3)
    podman.check("rm", "-f", "-t", "20", name, timeout=90)
    assert name not in podman.check("ps", "-a", "--format", "{{.Names}}")
    assert_nothing_left(podman)


def test_run_it_on_a_terminal(podman, name):
    status, out = pty_session(podman.argv("run", "-it", "--rm", "--name", name, IMAGE, "sh"), podman.env(),
                              [(b"# ", b"echo tty=$(tty) cols=$(stty size | cut -d' ' -f2); exit 7\n")])
    assert status == 7, out
    assert re.search(rb"tty=/dev/pts/\d+ cols=100", out), out
    assert_nothing_left(podman)


def test_two_containers_on_a_network_and_connect_disconnect(podman, name):
    first, second = podman.networks
    server, client = f"{name}-srv", f"{name}-cli"
    try:
        podman.check("run", "-d", "--name", server, "--network", first.name, IMAGE, "sh", "-c",
                     "echo served-by-hanabi > /tmp/index.html; exec httpd -f -p 8000 -h /tmp")
        podman.check("run", "-d", "--name", client, "--network", first.name, IMAGE, "sleep", "600")
        ip = _ip_of(podman, server, first.name)
        assert ip.startswith(first.prefix + "."), ip
        fetched = podman.wait_for("the page over the bridge", lambda: podman.run(
            "exec", client, "timeout", "5", "wget", "-q", "-O", "-", f"http://{ip}:8000/index.html").stdout.strip())
        # (not `wget -T`: busybox 1.35 wget crashes with it)
        assert fetched == "served-by-hanabi"
        podman.check("network", "connect", second.name, client)
        addr = podman.wait_for("eth1 in the VM", lambda: re.search(
            rf"inet ({re.escape(second.prefix)}\.\d+)/24", podman.run("exec", client, "ip", "-4", "-o", "addr").stdout))
        assert addr.group(1) == _ip_of(podman, client, second.name)
        ping = podman.run("exec", client, "ping", "-c", "1", "-W", "5", second.gateway)
        assert ping.returncode == 0, ping.stdout + ping.stderr
        podman.check("network", "disconnect", second.name, client)
        podman.wait_for("eth1 gone from the VM", lambda: second.prefix not in podman.run(
            "exec", client, "ip", "-4", "-o", "addr").stdout)
    finally:
        podman.run("rm", "-f", "-t", "0", server, client, timeout=120)
    assert_nothing_left(podman)


def _ip_of(podman: PrivatePodman, container: str, network: str) -> str:
    out = podman.check("inspect", "-f", "{{range $k, $v := .NetworkSettings.Networks}}{{$k}}={{$v.IPAddress}} {{end}}",
                       container)
    return dict(pair.split("=", 1) for pair in out.split())[network]


def test_preserve_fds_is_refused_naming_the_container(podman, name):
    argv = podman.argv("run", "--rm", "--name", name, "--preserve-fds", "1", IMAGE, "true")
    # podman wants the fd (3) open in itself before it passes it on
    done = subprocess.run(["sh", "-c", 'exec "$@" 3</dev/null', "sh", *argv], capture_output=True, text=True,
                          timeout=120, env=podman.env(), stdin=subprocess.DEVNULL)
    assert done.returncode != 0
    cid = re.search(r"container ([0-9a-f]{64}): --preserve-fds 1 is not supported", done.stderr)
    assert cid, done.stderr
    assert_nothing_left(podman)
