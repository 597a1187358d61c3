"""Container networking through the VM (issue 4), without Docker: a test-made namespace
with a veth to a second test-made namespace; a hanabi container in the first reaches the
second (ping, TCP echo), and nothing of hanabi's remains in either after delete."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hanabi_common.errors import FailedPrecondition, InvalidArgument, NotFound
from hanabi_netd.client import NetdClient
from tests.helpers.hanabi import drain, leftovers
from tests.helpers.netns import NetnsPair, ip, netns_pair

pytestmark = pytest.mark.integration


@pytest.fixture
def bundle(bundle):
    """The busybox bundle with CAP_NET_RAW too, as Docker's default set has it: busybox ping
    opens a raw socket, which runc spec's three capabilities refuse (under runc as here)."""
    def make(args, **kwargs):
        path = bundle(args, **kwargs)
        config = Path(path) / "config.json"
        spec = json.loads(config.read_text())
        for caps in spec["process"]["capabilities"].values():
            caps.append("CAP_NET_RAW")
        config.write_text(json.dumps(spec))
        return path
    return make

ECHO_SERVER = r"""
import socket, sys
srv = socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[1], int(sys.argv[2])))
srv.listen(1)
print("listening", flush=True)
conn, peer = srv.accept()
line = conn.makefile("rb").readline()
conn.sendall(b"echo from " + peer[0].encode() + b": " + line)
conn.close()
"""


@pytest.fixture
def pair():
    made = netns_pair()
    yield made
    made.destroy()


def in_netns(bundle_dir: str, netns_path: str) -> str:
    """Put the bundle's container into the network namespace at `netns_path`."""
    config_path = Path(bundle_dir) / "config.json"
    config = json.loads(config_path.read_text())
    namespaces = [ns for ns in config["linux"]["namespaces"] if ns["type"] != "network"]
    config["linux"]["namespaces"] = namespaces + [{"type": "network", "path": netns_path}]
    config_path.write_text(json.dumps(config))
    return bundle_dir


def test_container_pings_and_talks_tcp_to_a_peer_namespace(hanabi, bundle, cid, pair: NetnsPair):
    before = pair.link_info()
    server = subprocess.Popen(["ip", "netns", "exec", pair.outer, sys.executable, "-c", ECHO_SERVER,
                               pair.outer_ip, "7777"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert server.stdout.readline() == b"listening\n"
        script = (f"ip -o addr show dev eth0; ip route; ping -c 2 -W 5 {pair.outer_ip} >/dev/null && echo ping-ok; "
                  f"echo hello | nc {pair.outer_ip} 7777")
        path = in_netns(bundle(["sh", "-c", script]), pair.inner_path)
        done = hanabi.runtime("run", "--bundle", path, cid)
        out = done.stdout.decode()
        assert done.returncode == 0, (out, done.stderr.decode())
        assert f"inet {pair.inner_ip}/30" in out
        assert "ping-ok" in out
        assert f"echo from {pair.inner_ip}: hello" in out
        server.wait(10)
    finally:
        server.kill()
        server.wait()
    assert leftovers(hanabi, cid) == []
    assert settled(hanabi, pair) == []
    assert pair.link_info() == before  # Docker's link is left exactly as it was


def test_guest_nic_takes_the_links_mac_and_mtu(hanabi, bundle, cid, pair: NetnsPair):
    ip("link", "set", "dev", pair.inner_link, "mtu", "1400", netns=pair.inner)
    ip("-6", "addr", "add", "fd00:213::1/64", "dev", pair.inner_link, "nodad", netns=pair.inner)
    ip("route", "add", "default", "via", pair.outer_ip, netns=pair.inner)
    path = in_netns(bundle(["sh", "-c", "cat /sys/class/net/eth0/address /sys/class/net/eth0/mtu; "
                                        "ip -o addr show dev eth0; ip route; ip -6 -o addr; echo $(ls /sys/class/net)"]),
                    pair.inner_path)
    done = hanabi.runtime("run", "--bundle", path, cid)
    out = done.stdout.decode()
    assert done.returncode == 0, (out, done.stderr.decode())
    lines = out.splitlines()
    assert lines[0] == pair.mac() and lines[1] == "1400"
    assert "fd00:213::1/64" in out
    assert f"default via {pair.outer_ip} dev eth0" in out
    assert lines[-1].split() == ["eth0", "lo"]
    assert settled(hanabi, pair) == []


def test_network_none_has_loopback_only(hanabi, bundle, cid):
    empty = NetnsPair(inner=f"hanabi-none-{cid[:20]}", outer="unused")
    ip("netns", "add", empty.inner)
    try:
        path = in_netns(bundle(["sh", "-c", "ls /sys/class/net; ip -o addr show dev lo"]), empty.inner_path)
        done = hanabi.runtime("run", "--bundle", path, cid)
        out = done.stdout.decode()
        assert done.returncode == 0, (out, done.stderr.decode())
        assert out.splitlines()[0] == "lo"
        assert "inet 127.0.0.1/8" in out
    finally:
        ip("netns", "del", empty.inner, check=False)


@pytest.mark.parametrize("netns, message", [("/run/netns/hanabi-no-such-ns", "does not exist"),
                                             ("/etc/hostname", "not a network namespace")])
def test_bad_netns_path_is_refused_and_nothing_is_left(hanabi, bundle, cid, netns, message):
    path = in_netns(bundle(["true"]), netns)
    done = hanabi.runtime("run", "--bundle", path, cid)
    assert done.returncode != 0
    assert message in done.stderr.decode()
    assert leftovers(hanabi, cid) == []


def test_netd_survives_a_restart_and_still_detaches(hanabi, pair: NetnsPair):
    client = NetdClient(hanabi.config)
    info = client.attach("netd-restart", pair.inner_path)
    assert info.mode == "tcfilter" and [i.tap for i in info.interfaces] == ["tap0_hanabi"]
    assert info.interfaces[0].mac == pair.mac() and info.interfaces[0].addresses == [f"{pair.inner_ip}/30"]
    assert pair.leftovers() != []
    hanabi.stop("netd", sig=9)
    hanabi.start("netd")
    client = NetdClient(hanabi.config)
    assert [n.sandbox_id for n in client.list().networks] == ["netd-restart"]
    assert client.detach("netd-restart").existed
    assert drain(hanabi)["netd"] == []  # the taps go in the background: wait for netd's queue
    assert settled(hanabi, pair) == []
    assert not client.detach("netd-restart").existed


def test_detach_after_the_namespace_is_gone(hanabi, pair: NetnsPair):
    client = NetdClient(hanabi.config)
    client.attach("netns-gone", pair.inner_path)
    pair.destroy()  # Docker removes the namespace when the container stops
    assert client.detach("netns-gone").existed
    assert "netns-gone" not in [n.sandbox_id for n in client.list().networks]


def test_a_link_that_vanishes_mid_attach_leaves_nothing(pair: NetnsPair, tmp_path, monkeypatch):
    """The namespace is read, then its link disappears before it is wired (Docker tearing
    the endpoint down): a clear error, no tap, no qdisc, no state."""
    from hanabi_common.config import load_config
    from hanabi_common.models.netd import AttachNetwork
    from hanabi_netd import tcfilter
    from hanabi_netd.service import NetworkService

    real_snapshot = tcfilter.snapshot

    def snapshot_then_vanish(ipr):
        seen = real_snapshot(ipr)
        ip("link", "del", pair.inner_link, netns=pair.inner)
        return seen

    monkeypatch.setattr(tcfilter, "snapshot", snapshot_then_vanish)
    config_path = tmp_path / "hanabi.toml"
    config_path.write_text(f'run_dir = "{tmp_path}/run"\n')
    service = NetworkService(load_config(config_path))
    with pytest.raises(NotFound, match="eth0 is gone"):
        service.attach(AttachNetwork(sandbox_id="vanish", netns_path=pair.inner_path))
    assert pair.leftovers() == []  # an in-process NetworkService: nothing queued
    assert "_hanabi" not in ip("-br", "link", netns=pair.inner)
    assert service.list(None).networks == []
    with pytest.raises(InvalidArgument, match="not a network namespace"):
        service.attach(AttachNetwork(sandbox_id="vanish", netns_path="/proc/self/ns/uts"))
    with pytest.raises(FailedPrecondition, match="the host's network namespace"):
        service.attach(AttachNetwork(sandbox_id="host", netns_path="/proc/self/ns/net"))
    assert service.list(None).networks == []


HOOK = """#!/bin/sh
# What Docker's libnetwork-setkey hook amounts to: put an endpoint into the namespace of
# the pid the runtime reports, address it, and remember which namespace that was.
set -e
pid=$(python3 -c 'import json, sys; print(json.load(sys.stdin)["pid"])')
readlink /proc/$pid/ns/net > {marker}
ip link add hkA$$ type veth peer name hkB$$
ip link set hkB$$ netns {outer} name peer0
ip -n {outer} addr add 10.215.0.2/30 dev peer0
ip -n {outer} link set peer0 up
ip link set hkA$$ netns $pid
nsenter --net=/proc/$pid/ns/net ip link set hkA$$ name eth0
nsenter --net=/proc/$pid/ns/net ip addr add 10.215.0.1/30 dev eth0
nsenter --net=/proc/$pid/ns/net ip link set eth0 up
"""


def test_prestart_hook_wires_a_namespace_hanabi_made(hanabi, bundle, cid, tmp_path):
    """A config asking for a new network namespace, with a prestart hook that fills it
    (Docker's model): the hook sees a pid in the namespace netd made, the container
    reaches the peer the hook wired, and delete removes the namespace (and so the veth
    pair: the peer end vanishes from the other namespace too)."""
    outer = f"hanabi-hook-{os.getpid()}"
    ip("netns", "add", outer)
    try:
        marker = tmp_path / "netns-seen-by-hook"
        hook = tmp_path / "setkey.sh"
        hook.write_text(HOOK.format(marker=marker, outer=outer))
        hook.chmod(0o755)
        path = bundle(["sh", "-c", "ping -c 1 -W 5 10.215.0.2 >/dev/null && echo reached"])
        config_path = Path(path) / "config.json"
        config = json.loads(config_path.read_text())
        assert {"type": "network"} in config["linux"]["namespaces"]  # a new one, no path
        config["hooks"] = {"prestart": [{"path": str(hook), "args": ["setkey"]}]}
        config_path.write_text(json.dumps(config))
        done = hanabi.runtime("run", "--bundle", path, cid)
        assert done.returncode == 0, (done.stdout.decode(), done.stderr.decode())
        assert done.stdout.decode().strip() == "reached"
        assert marker.read_text().startswith("net:[")
        assert leftovers(hanabi, cid) == []
        # The pair dies with the namespace; the kernel destroys a namespace's devices in a
        # work queue after its last reference went, so this comes a little later.
        assert _wait_for(lambda: "peer0" not in ip("-br", "link", netns=outer), timeout=10.0)
    finally:
        ip("netns", "del", outer, check=False)


def test_a_failing_prestart_hook_fails_create_and_leaves_nothing(hanabi, bundle, cid, tmp_path):
    hook = tmp_path / "fail.sh"
    hook.write_text("#!/bin/sh\necho 'no endpoint for you' >&2\nexit 7\n")
    hook.chmod(0o755)
    path = bundle(["true"])
    config_path = Path(path) / "config.json"
    config = json.loads(config_path.read_text())
    config["hooks"] = {"prestart": [{"path": str(hook)}]}
    config_path.write_text(json.dumps(config))
    done = hanabi.runtime("run", "--bundle", path, cid)
    assert done.returncode != 0
    assert "prestart hook #0" in done.stderr.decode() and "no endpoint for you" in done.stderr.decode()
    assert leftovers(hanabi, cid) == []


def test_nic_hotplug_into_a_running_vm(hanabi, pair: NetnsPair):
    """The warm-pool path: a VM booted without a network gets its NIC afterwards (QMP getfd
    + netdev_add + device_add on a free root port); the guest finds it by MAC, and the
    peer namespace pings the guest through it."""
    from hanabi_agentd.client import AgentdClient
    from hanabi_common.models.agentd import ConfigureNetwork
    from hanabi_common.models.vmmd import VmNic
    from hanabi_vmmd.client import VmmdClient

    sid = f"hotnic-{os.getpid()}"
    netd, vmmd, agentd = NetdClient(hanabi.config), VmmdClient(hanabi.config), AgentdClient(hanabi.config)
    try:
        vm = vmmd.create(sid)
        agentd.connect(sid, vm.agent_socket)
        network = netd.attach(sid, pair.inner_path)
        [iface] = network.interfaces
        info = vmmd.attach_nic(sid, VmNic(tap=iface.tap, mac=iface.mac, mtu=iface.mtu, netns_path=pair.inner_path))
        assert info.nics == ["nic0"]
        agentd.configure_network(ConfigureNetwork(sandbox_id=sid, interfaces=network.interfaces,
                                                  routes=network.routes))
        pinged = subprocess.run(["ip", "netns", "exec", pair.outer, "busybox", "ping", "-c", "1", "-W", "5", pair.inner_ip],
                                capture_output=True, text=True)
        assert pinged.returncode == 0, pinged.stdout + pinged.stderr
        with pytest.raises(Exception, match="already has a NIC on tap"):
            vmmd.attach_nic(sid, VmNic(tap=iface.tap, mac=iface.mac, netns_path=pair.inner_path))
        with pytest.raises(NotFound, match="does not exist in network namespace"):
            vmmd.attach_nic(sid, VmNic(tap="tap9_hanabi", mac="02:00:00:00:00:09", netns_path=pair.inner_path))
    finally:
        agentd.disconnect(sid)
        vmmd.stop(sid)
        netd.detach(sid)
    assert drain(hanabi)["netd"] == []
    assert settled(hanabi, pair) == []


def test_two_links_two_nics(hanabi, bundle, cid, pair: NetnsPair):
    """A namespace with two links (a CNI setup; Docker adds further networks later): the
    guest gets two NICs named like the links, each reaching its own peer."""
    ip("link", "add", "hnx1a", "type", "veth", "peer", "name", "hnx1b")
    ip("link", "set", "hnx1a", "netns", pair.inner, "name", "eth1")
    ip("link", "set", "hnx1b", "netns", pair.outer, "name", "peer1")
    ip("addr", "add", "10.216.0.1/30", "dev", "eth1", netns=pair.inner)
    ip("addr", "add", "10.216.0.2/30", "dev", "peer1", netns=pair.outer)
    for ns, link in ((pair.inner, "eth1"), (pair.outer, "peer1")):
        ip("link", "set", link, "up", netns=ns)
    script = (f"echo $(ls /sys/class/net); ping -c 1 -W 5 {pair.outer_ip} >/dev/null && echo first-ok; "
              f"ping -c 1 -W 5 10.216.0.2 >/dev/null && echo second-ok")
    done = hanabi.runtime("run", "--bundle", in_netns(bundle(["sh", "-c", script]), pair.inner_path), cid)
    out = done.stdout.decode()
    assert done.returncode == 0, (out, done.stderr.decode())
    assert out.splitlines() == ["eth0 eth1 lo", "first-ok", "second-ok"]
    assert settled(hanabi, pair) == [] and "_hanabi" not in ip("-br", "link", netns=pair.inner)


def settled(hanabi, pair: NetnsPair) -> list[str]:
    """What hanabi left in the pair's inner namespace once netd's release queue is done
    (taps go in the background, after `delete` returned)."""
    assert drain(hanabi)["netd"] == []
    return pair.leftovers()


def _wait_for(predicate, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.3)
    return predicate()


def test_links_connected_and_disconnected_while_running(hanabi, bundle, cid, pair: NetnsPair):
    """`docker network connect` / `disconnect` without Docker: a link moved into the running
    container's namespace (then addressed and brought up) becomes a NIC in the guest that
    reaches its peer; removing the link unplugs the NIC and its tap."""
    path = in_netns(bundle(["sleep", "600"]), pair.inner_path)
    hanabi.runtime("create", "--bundle", path, cid, check=True)
    try:
        hanabi.runtime("start", cid, check=True)
        ip("link", "add", "hncA", "type", "veth", "peer", "name", "hncB")
        ip("link", "set", "hncB", "netns", pair.outer, "name", "peer1")
        ip("addr", "add", "10.217.0.2/30", "dev", "peer1", netns=pair.outer)
        ip("link", "set", "peer1", "up", netns=pair.outer)
        ip("link", "set", "hncA", "netns", pair.inner, "name", "eth1")
        ip("addr", "add", "10.217.0.1/30", "dev", "eth1", netns=pair.inner)
        ip("link", "set", "eth1", "up", netns=pair.inner)

        def guest(script: str) -> str:
            return hanabi.runtime("exec", cid, "sh", "-c", script).stdout.decode()

        assert _wait_for(lambda: "10.217.0.1/30" in guest("ip -o addr show dev eth1 2>/dev/null")), \
            guest("ip -o addr")
        assert "ok" in guest("ping -c 1 -W 5 10.217.0.2 >/dev/null && echo ok")
        assert "ok" in guest(f"ping -c 1 -W 5 {pair.outer_ip} >/dev/null && echo ok")  # eth0 untouched
        assert "tap1_hanabi" in ip("-br", "link", netns=pair.inner)

        ip("link", "del", "eth1", netns=pair.inner)
        assert _wait_for(lambda: guest("echo $(ls /sys/class/net)").split() == ["eth0", "lo"])
        assert "tap1_hanabi" not in ip("-br", "link", netns=pair.inner)
    finally:
        hanabi.runtime("delete", "--force", cid)
    assert leftovers(hanabi, cid) == []
    assert settled(hanabi, pair) == []
