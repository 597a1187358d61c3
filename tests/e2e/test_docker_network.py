"""Docker networking with the hanabi runtime (issue 4): containers on a user-defined bridge
network made by the test reach each other by IP and by name (Docker's embedded DNS), a
published port on 127.0.0.1 serves the host, `--network none` has loopback only, and a
removed container leaves no tap, qdisc or link behind.

The private dockerd runs with --iptables=false: published ports go through docker-proxy
on the host's loopback, and traffic stays on the test's own bridge network.
"""

from __future__ import annotations

import os
import socket
import time
import urllib.request

import pytest

from tests.e2e.docker_env import IMAGE, RUNTIME, hanabi_leftovers

pytestmark = pytest.mark.e2e

PAGE = "served-from-a-hanabi-vm"
HTTPD = f"mkdir -p /www && echo {PAGE} > /www/index.html && exec httpd -f -p 80 -h /www"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def net(docker):
    """A user-defined bridge network with a subnet of its own; removed afterwards."""
    name = f"hanabinet{os.getpid()}"
    subnet = f"10.{214 + os.getpid() % 20}.{os.getpid() % 250}.0/24"
    docker.check("network", "create", "--driver", "bridge", "--subnet", subnet, name)
    yield name
    docker.run("network", "rm", name, timeout=60)


@pytest.fixture(scope="module")
def web(docker, net):
    """A hanabi container serving a page with busybox httpd on the test network, with its
    port 80 published on 127.0.0.1."""
    name, port = f"web{os.getpid()}", free_port()
    docker.check("run", "-d", f"--runtime={RUNTIME}", "--network", net, "--name", name,
                 "-p", f"127.0.0.1:{port}:80", IMAGE, "sh", "-c", HTTPD, timeout=120)
    ip = docker.inspect(name, "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}")
    yield {"name": name, "port": port, "ip": ip}
    docker.remove(name)


def _client(docker, net, *cmd: str):
    return docker.run("run", "--rm", f"--runtime={RUNTIME}", "--network", net, IMAGE, *cmd, timeout=120)


def test_containers_reach_each_other_by_ip(docker, net, web):
    done = _client(docker, net, "wget", "-qO-", f"http://{web['ip']}/")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == PAGE


def test_containers_reach_each_other_by_name(docker, net, web):
    done = _client(docker, net, "sh", "-c", f"cat /etc/resolv.conf; nslookup {web['name']}; wget -qO- http://{web['name']}/")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "nameserver 127.0.0.11" in done.stdout   # Docker's resolv.conf, as Docker gave it
    assert web["ip"] in done.stdout
    assert done.stdout.strip().endswith(PAGE)


def test_published_port_serves_the_host_on_loopback(web):
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{web['port']}/", timeout=10) as reply:
                assert reply.read().decode().strip() == PAGE
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def test_guest_interface_is_the_endpoint_docker_made(docker, net, web):
    mac = docker.inspect(web["name"], "{{range .NetworkSettings.Networks}}{{.MacAddress}}{{end}}")
    gateway = docker.inspect(web["name"], "{{range .NetworkSettings.Networks}}{{.Gateway}}{{end}}")
    done = docker.run("exec", web["name"], "sh", "-c", "cat /sys/class/net/eth0/address; ip route")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == mac
    assert f"default via {gateway} dev eth0" in done.stdout


def test_network_none_has_loopback_only(docker, name):
    done = docker.run_hanabi("--name", name, cmd=["sh", "-c", "echo $(ls /sys/class/net); ip -o addr"])
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == "lo"
    assert "127.0.0.1/8" in done.stdout and "eth0" not in done.stdout


def test_removed_network_containers_leave_nothing(docker, net):
    name = f"gone{os.getpid()}"
    docker.check("run", "-d", f"--runtime={RUNTIME}", "--network", net, "--name", name, IMAGE,
                 "sleep", "600", timeout=120)
    docker.check("rm", "-f", name, timeout=60)
    deadline = time.monotonic() + 20
    while True:
        left = hanabi_leftovers(docker)
        busy = {k: v for k, v in left.items() if v and k in ("processes", "state dirs", "taps", "shims")}
        if not any(name in str(v) for v in busy.values()) and not busy.get("taps"):
            break
        assert time.monotonic() < deadline, busy
        time.sleep(0.5)


def test_network_connect_and_disconnect_a_running_container(docker, net, web):
    """`docker network connect` adds a NIC to the running VM (netd sees the new link in the
    namespace and hot-plugs it); a container on that second network reaches it there;
    `disconnect` unplugs it again."""
    second = f"hanabinet2{os.getpid()}"
    subnet = f"10.{234 + os.getpid() % 20}.{os.getpid() % 250}.0/24"
    docker.check("network", "create", "--driver", "bridge", "--subnet", subnet, second)
    try:
        docker.check("network", "connect", second, web["name"], timeout=60)
        ip = docker.inspect(web["name"], "{{(index .NetworkSettings.Networks \"" + second + "\").IPAddress}}")
        deadline = time.monotonic() + 30
        while f"{ip}/" not in docker.run("exec", web["name"], "ip", "-o", "addr").stdout:
            assert time.monotonic() < deadline, docker.run("exec", web["name"], "ip", "-o", "addr").stdout
            time.sleep(0.5)
        done = _client(docker, second, "wget", "-qO-", f"http://{ip}/")
        assert done.returncode == 0 and done.stdout.strip() == PAGE, done.stderr
        docker.check("network", "disconnect", second, web["name"], timeout=60)
        deadline = time.monotonic() + 30
        while f"{ip}/" in docker.run("exec", web["name"], "ip", "-o", "addr").stdout:
            assert time.monotonic() < deadline, "the NIC of the disconnected network stayed"
            time.sleep(0.5)
        assert docker.run("exec", web["name"], "ls", "/sys/class/net").stdout.split() == ["eth0", "lo"]
    finally:
        docker.run("network", "rm", second, timeout=60)


def test_restart_keeps_the_container_on_its_network(docker, net, web):
    """`docker restart`: Docker deletes the task and creates it again under the same id
    (a new VM, a new namespace filled by its hooks); it comes back with its address,
    serves again, and its name still resolves."""
    docker.check("restart", "-t", "2", web["name"], timeout=120)
    assert docker.inspect(web["name"], "{{.State.Running}}") == "true"
    ip = docker.inspect(web["name"], "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}")
    assert f"inet {ip}/" in docker.run("exec", web["name"], "ip", "-o", "addr").stdout
    deadline = time.monotonic() + 30
    while True:
        done = _client(docker, net, "wget", "-qO-", f"http://{web['name']}/")
        if done.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert done.returncode == 0 and done.stdout.strip() == PAGE, (done.stdout, done.stderr)
