"""docker-compose 1.29 (Debian's) with `runtime: hanabi`, against the session's private dockerd.

Two services on a network the compose file defines (its own /24), one of them with a named
volume: `up -d` starts both in VMs, the client reaches the web service by its name (Docker's
embedded DNS, relayed into the VM), `logs` shows what each printed, `up --scale client=2` adds
a second client VM, and `down -v` removes the containers, the network and the volume, leaving
nothing of hanabi behind. What the volume holds across containers is not asserted here (how
volumes reach the VM is being changed); that compose makes it, mounts it and removes it is.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time

import pytest

from tests.e2e.docker_env import IMAGE, RUNTIME, hanabi_leftovers
from tests.e2e.engines import wait_for
from tests.e2e.podman_env import container_volumes, free_subnets

pytestmark = pytest.mark.e2e

PAGE = "served-by-compose-in-a-vm"
COMPOSE_FILE = """\
version: "2.4"
services:
  web:
    image: {image}
    runtime: {runtime}
    command: ["sh", "-c", "mkdir -p /www && echo {page} > /www/index.html && echo web-up && exec httpd -f -p 80 -h /www"]
    networks: [backend]
    volumes: ["data:/data"]
  client:
    image: {image}
    runtime: {runtime}
    command: ["sh", "-c", "echo client-up-$$(hostname); exec sleep 600"]
    networks: [backend]
networks:
  backend:
    ipam:
      config: [{{subnet: "{subnet}"}}]
volumes:
  data: {{}}
"""


@pytest.fixture
def compose(docker, tmp_path):
    """`docker-compose -p PROJECT -f FILE ARGS...` against the private dockerd; `down -v` after."""
    binary = shutil.which("docker-compose")
    if not binary:
        pytest.skip("docker-compose is not installed (apt-get install docker-compose)")
    project = f"hanabic{os.getpid()}"
    prefix = free_subnets(1)[0]
    path = tmp_path / "docker-compose.yml"
    path.write_text(COMPOSE_FILE.format(image=IMAGE, runtime=RUNTIME, page=PAGE, subnet=f"{prefix}.0/24"))

    def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        try:
            return subprocess.run([binary, "--no-ansi", "-p", project, "-f", str(path), *args], capture_output=True,
                                  text=True, timeout=timeout, env=docker.env(), stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(f"`docker-compose {' '.join(args)}` did not finish in {timeout} s: {exc.stderr!r}") from exc

    def check(*args: str, timeout: float = 300) -> str:
        done = run(*args, timeout=timeout)
        assert done.returncode == 0, f"`docker-compose {' '.join(args)}` failed: {done.stderr[-3000:]}"
        return done.stdout

    run.check, run.project, run.prefix = check, project, prefix
    yield run
    run("down", "-v", "-t", "5")


def containers(docker, project: str, service: str) -> list[dict]:
    ids = docker.check("ps", "-q", "--filter", f"label=com.docker.compose.project={project}",
                       "--filter", f"label=com.docker.compose.service={service}").split()
    return json.loads(docker.check("inspect", *ids)) if ids else []


def test_compose_up_logs_scale_down(docker, compose):
    project = compose.project
    compose.check("up", "-d")
    web, clients = containers(docker, project, "web"), containers(docker, project, "client")
    assert len(web) == 1 and len(clients) == 1
    for container in web + clients:
        assert container["HostConfig"]["Runtime"] == RUNTIME and container["State"]["Running"], container["State"]
    # the network compose made, with the subnet of the file, and both services on it
    network = f"{project}_backend"
    assert set(web[0]["NetworkSettings"]["Networks"]) == {network}
    assert web[0]["NetworkSettings"]["Networks"][network]["IPAddress"].startswith(compose.prefix + ".")
    # the named volume, made by compose and mounted where the file says
    mounts = [m for m in web[0]["Mounts"] if m["Destination"] == "/data"]
    assert mounts and mounts[0]["Type"] == "volume" and mounts[0]["Name"] == f"{project}_data", web[0]["Mounts"]
    assert f"{project}_data" in docker.check("volume", "ls", "-q").split()
    wrote = compose("exec", "-T", "web", "sh", "-c", "echo kept > /data/f && cat /data/f && grep -c ' /data ' /proc/mounts")
    assert wrote.returncode == 0 and wrote.stdout.split()[0] == "kept", wrote.stdout + wrote.stderr

    # the client reaches the web service by its name
    fetched = wait_for("the page by service name", lambda: compose(
        "exec", "-T", "client", "timeout", "10", "wget", "-q", "-O", "-", "http://web/").stdout.strip())
    assert fetched == PAGE

    logs = wait_for("both services' output in logs", lambda: (lambda out: out if "web-up" in out and "client-up" in out
                                                              else None)(compose.check("logs", "--no-color")))
    assert f"client-up-{clients[0]['Config']['Hostname']}" in logs

    compose.check("up", "-d", "--scale", "client=2")
    scaled = containers(docker, project, "client")
    assert len(scaled) == 2 and all(c["HostConfig"]["Runtime"] == RUNTIME for c in scaled)
    assert clients[0]["Id"] in {c["Id"] for c in scaled}  # the first one kept running
    second = next(c for c in scaled if c["Id"] != clients[0]["Id"])
    reached = wait_for("the page from the second client", lambda: docker.run(
        "exec", second["Id"], "timeout", "10", "wget", "-q", "-O", "-", "http://web/").stdout.strip())
    assert reached == PAGE
    wait_for("the second client's output in logs",
             lambda: f"client-up-{second['Config']['Hostname']}" in compose.check("logs", "--no-color", "client"))

    ours = {c["Id"] for c in web + scaled}
    compose.check("down", "-v", "-t", "5")
    assert not docker.check("ps", "-aq", "--filter", f"label=com.docker.compose.project={project}").split()
    assert network not in docker.check("network", "ls", "--format", "{{.Name}}").split()
    assert f"{project}_data" not in docker.check("volume", "ls", "-q").split()
    deadline = time.monotonic() + 30
    while left := leaks(docker, ours):
        assert time.monotonic() < deadline, f"left behind after down -v: {left}"
        time.sleep(0.5)


def leaks(docker, ids: set[str]) -> dict[str, set[str]]:
    """What is left of the removed containers: hanabi's processes (a stand-in's title names its
    container's id), state dirs, volumes and kept layers (not the shared per-image bases), loop
    devices, taps, and the shims of our dockerd. (dockerd's own data-root mount stays, it is its.)"""
    left = hanabi_leftovers(docker)
    short = {cid[:12] for cid in ids}
    mine = {entry for entry in left["processes"] if not entry.startswith("stand-in ")
            or any(s in _cmdline(int(entry.split()[1])) for s in short)}
    found = {"processes": mine, "state dirs": left["state dirs"],
             "volumes": container_volumes(docker.hanabi.config.block.volume_dir),
             "loop devices": left["loop devices"], "taps": left["taps"], "shims": left["shims"]}
    return {kind: what for kind, what in found.items() if what}


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
