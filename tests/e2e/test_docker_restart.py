"""Every hanabi daemon SIGKILLed and restarted while containers run under Docker (issue 13).

Six containers run through the whole test: two idle ones (one on a user network of the
test's own), a counter printing a number every second, one with an open `docker exec -i`
session, one attached with `docker run -it`, and a web server on the same network with its
port published on 127.0.0.1. agentd is killed and restarted first, then vmmd, netd and blockd
one at a time, then all four at once. After each restart every container still runs,
answers `docker exec`, the open sessions still answer, the idle container reaches the web
server by name (Docker's DNS through the guest's relay) and the published port serves the
host; at the end `docker logs` of the counter has every number once, in order, `docker stop`
and `docker rm` work, and nothing is left behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.request

import pytest

from hanabi_common.config import DAEMONS
from tests.e2e.docker_env import IMAGE, RUNTIME, LineReader, hanabi_leftovers
from tests.e2e.test_docker_features import PROMPT, Terminal
from tests.e2e.test_docker_network import HTTPD, PAGE, free_port

pytestmark = pytest.mark.e2e

COUNTER = 'i=0; while :; do echo "n=$i"; i=$((i+1)); sleep 1; done'
IDLE = "echo ready; while :; do sleep 1; done"
ROUNDS = ("agentd", "vmmd", "netd", "blockd", "all")


def _run_detached(docker, name: str, script: str, *options: str, network: str = "none") -> None:
    docker.check("run", "-d", f"--runtime={RUNTIME}", "--network", network, "--name", name, *options, IMAGE,
                 "sh", "-c", script, timeout=120)


def _page(port: int) -> str:
    """What the published port serves (retried briefly: docker-proxy may lag a moment)."""
    deadline = time.monotonic() + 20
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as reply:
                return reply.read().decode().strip()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _kill_and_restart(docker, which: str) -> None:
    names = list(DAEMONS) if which == "all" else [which]
    for daemon in names:
        docker.hanabi.stop(daemon, sig=signal.SIGKILL)
    for daemon in names:
        docker.hanabi.start(daemon)


def counter_problems(logs: str) -> list[str]:
    """Gaps and repeats in the counter's `n=K` lines (empty when every K appears once, in order)."""
    numbers = [int(line[2:]) for line in logs.splitlines() if line.startswith("n=") and line[2:].isdigit()]
    problems = []
    for before, after in zip(numbers, numbers[1:], strict=False):
        if after != before + 1:
            problems.append(f"{before} then {after}")
    return problems


def test_every_daemon_killed_and_restarted_under_docker(docker):
    prefix = f"rst{int(time.monotonic()) % 100000}"
    idle = [f"{prefix}-idle{k}" for k in range(2)]
    counter, execer, tty, web = f"{prefix}-counter", f"{prefix}-exec", f"{prefix}-tty", f"{prefix}-web"
    names = [*idle, counter, execer, tty, web]
    net, port = f"{prefix}net", free_port()
    before = hanabi_leftovers(docker)
    session = term = None
    docker.check("network", "create", "--driver", "bridge",
                 "--subnet", f"10.{234 + os.getpid() % 20}.{os.getpid() % 250}.0/24", net)
    try:
        _run_detached(docker, web, HTTPD, "-p", f"127.0.0.1:{port}:80", network=net)
        _run_detached(docker, idle[0], IDLE, network=net)
        for one in idle[1:] + [execer]:
            _run_detached(docker, one, IDLE)
        _run_detached(docker, counter, COUNTER)
        term = Terminal([docker.docker, "run", "-it", "--rm", f"--runtime={RUNTIME}", "--network", "none",
                         "--name", tty, IMAGE, "sh"], docker.env())
        assert term.expect(PROMPT, 90), f"no prompt from the -it container: {bytes(term.seen)!r}"
        for one in idle + [execer]:
            docker.wait_for_log(one, "ready", timeout=60)
        session_proc = docker.popen("exec", "-i", execer, "sh", stdin=subprocess.PIPE)
        session = LineReader(session_proc)

        def session_answers(tag: str) -> None:
            session_proc.stdin.write(f"echo got-{tag}\n".encode())
            session_proc.stdin.flush()
            assert session.wait_for(f"got-{tag}", 60), f"the exec session did not answer {tag}: {session.lines}"

        session_answers("start")
        docker.wait_for_log(counter, "n=2", timeout=60)
        assert _page(port) == PAGE

        def network_works(round_: str) -> None:
            done = docker.run("exec", idle[0], "wget", "-qO-", f"http://{web}/", timeout=60)
            assert (done.returncode, done.stdout.strip()) == (0, PAGE), \
                f"{web} by name from {idle[0]} after {round_}: {done.stdout!r} {done.stderr!r}"
            assert _page(port) == PAGE, f"the published port after {round_}"

        network_works("start")

        for round_ in ROUNDS:
            _kill_and_restart(docker, round_)
            for one in names:
                assert docker.inspect(one, "{{.State.Running}}") == "true", f"{one} stopped after {round_}"
                done = docker.run("exec", one, "echo", f"alive-{round_}", timeout=60)
                assert (done.returncode, done.stdout.strip()) == (0, f"alive-{round_}"), \
                    f"docker exec {one} after {round_} restarted: {done.returncode} {done.stderr.strip()}"
            session_answers(round_)
            network_works(round_)
            term.type(f"echo tty-{round_}")
            assert term.expect(f"^tty-{round_}", 60), f"the -it session after {round_}: {bytes(term.seen)[-300:]!r}"

        # A few more counts after the last restart, then the whole log must be one unbroken run.
        logs = docker.check("logs", counter, timeout=30)
        last = [line for line in logs.splitlines() if line.startswith("n=")][-1]
        docker.wait_for_log(counter, f"n={int(last[2:]) + 3}", timeout=30)
        logs = docker.check("logs", counter, timeout=30)
        assert counter_problems(logs) == [], logs
        assert logs.startswith("n=0\n"), logs[:200]

        session_proc.stdin.close()
        assert session_proc.wait(60) == 0
        term.type("exit 3")
        done = docker.run("stop", "-t", "2", counter, timeout=60)
        assert done.returncode == 0, done.stderr
        assert docker.inspect(counter, "{{.State.Status}}") == "exited"
        done = docker.run("rm", "-f", *names, timeout=120)
        assert done.returncode == 0, done.stderr
    finally:
        if session is not None:
            session.close()
        if term is not None:
            term.close()
        docker.remove(*names)
        docker.run("network", "rm", net, timeout=60)
    deadline = time.monotonic() + 30
    while True:  # the stand-ins and VMs end within a moment of `docker rm`
        after = hanabi_leftovers(docker)
        leaked = {kind: after[kind] - before[kind] for kind in after if after[kind] - before[kind]}
        if not leaked or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert leaked == {}
