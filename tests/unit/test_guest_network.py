"""The guest's network configuration: request validation, the ip commands it plans, NICs
found by MAC in a sysfs tree, and the agent's configure_network request end to end over
the protocol (DirSandbox: the host's own network is never touched)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hanabi_guest.core import AgentError
from hanabi_guest.network import check_network, nics_by_mac, plan_commands, wait_for_nics
from tests.unit.test_guest_agent import AgentProc

ETH = {"name": "eth0", "mac": "02:42:AC:12:00:02", "mtu": 1450,
       "addresses": ["172.18.0.2/16", "fd00:db8::2/64"]}
ROUTES = [{"dest": "default", "gateway": "172.18.0.1", "dev": "eth0", "family": 4},
          {"dest": "default", "gateway": "fd00:db8::1", "dev": "eth0", "family": 6},
          {"dest": "10.1.0.0/16", "gateway": None, "dev": "eth0", "family": 4}]


def test_a_docker_endpoint_becomes_ip_commands():
    interfaces, routes, _ = check_network({"interfaces": [ETH], "routes": ROUTES})
    assert interfaces[0]["mac"] == "02:42:ac:12:00:02"
    cmds = plan_commands(interfaces, routes, {"02:42:ac:12:00:02": "eth0"})
    assert cmds == [
        ["ip", "link", "set", "dev", "eth0", "mtu", "1450", "up"],
        ["ip", "-4", "addr", "replace", "172.18.0.2/16", "dev", "eth0"],
        ["ip", "-6", "addr", "replace", "fd00:db8::2/64", "dev", "eth0"],
        ["ip", "-4", "route", "replace", "default", "via", "172.18.0.1", "dev", "eth0"],
        ["ip", "-6", "route", "replace", "default", "via", "fd00:db8::1", "dev", "eth0"],
        ["ip", "-4", "route", "replace", "10.1.0.0/16", "dev", "eth0"]]


def test_nics_are_renamed_through_temporary_names():
    second = {"name": "eth1", "mac": "02:00:00:00:00:01", "mtu": 1500, "addresses": []}
    interfaces, routes, _ = check_network({"interfaces": [ETH, second]})
    # The kernel named them the other way round.
    cmds = plan_commands(interfaces, routes, {"02:42:ac:12:00:02": "eth1", "02:00:00:00:00:01": "eth0"})
    assert cmds[0:4] == [["ip", "link", "set", "dev", "eth1", "name", "hanabitmp0"],
                         ["ip", "link", "set", "dev", "eth0", "name", "hanabitmp1"],
                         ["ip", "link", "set", "dev", "hanabitmp0", "name", "eth0"],
                         ["ip", "link", "set", "dev", "hanabitmp1", "name", "eth1"]]


def test_loopback_only():
    assert plan_commands(*check_network({})[:2], {}) == []  # loopback: link_up, no process


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare(1)")
def test_link_up_brings_loopback_up_without_a_process():
    """`apply` brings loopback up with link_up (ioctls), as `ip link set dev lo up` did:
    in a fresh network namespace, lo is down before and up after."""
    script = ("import subprocess; from hanabi_guest.network import link_up; "
              "show = lambda: subprocess.run(['ip', '-o', 'link', 'show', 'lo'], capture_output=True, text=True).stdout; "
              "before = show(); link_up('lo'); link_up('lo'); print(before.split('<')[1].split('>')[0]); "
              "print(show().split('<')[1].split('>')[0])")
    done = subprocess.run(["unshare", "--net", sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=30, check=True)
    before, after = done.stdout.split()
    assert "UP" not in before.split(",") and "UP" in after.split(","), done.stdout


@pytest.mark.parametrize("msg, message", [
    ({"interfaces": [dict(ETH, name="lo")]}, "not a valid link name"),
    ({"interfaces": [dict(ETH, name="a" * 16)]}, r"'interfaces\[0\].name' .* does not match"),
    ({"interfaces": [dict(ETH, name="eth0; reboot")]}, r"'interfaces\[0\].name' .* does not match"),
    ({"interfaces": [dict(ETH, mac="zz:42:ac:12:00:02")]}, r"'interfaces\[0\].mac' .* does not match"),
    ({"interfaces": [dict(ETH, mtu=10)]}, r"'interfaces\[0\].mtu' must be in 68..65535"),
    ({"interfaces": [dict(ETH, mtu=True)]}, r"'interfaces\[0\].mtu' must be an integer"),
    ({"interfaces": [dict(ETH, addresses=["172.18.0.2/99"])]}, "not an address/prefix"),
    ({"interfaces": [dict(ETH, addresses=["-f /etc/passwd"])]}, "not an address/prefix"),
    ({"interfaces": [ETH, dict(ETH, name="eth1")]}, "appears twice"),
    ({"interfaces": [ETH] * 9}, "at most 8"),
    ({"interfaces": [ETH], "routes": [dict(ROUTES[0], dev="eth9")]}, "not a configured interface"),
    ({"interfaces": [ETH], "routes": [dict(ROUTES[0], gateway="gw")]}, "is not valid"),
    ({"interfaces": [ETH], "routes": [dict(ROUTES[0], family=5)]}, "family"),
    ({"interfaces": "eth0"}, "must be a list"),
    ({"dns_relay": ["10.0.0.1"]}, "not a loopback address"),
    ({"dns_relay": ["::1"]}, "not an IPv4 address"),
    ({"dns_relay": ["127.0.0.11"] * 5}, "at most 4"),
])
def test_bad_requests_are_refused(msg, message):
    with pytest.raises(AgentError, match=message) as info:
        check_network(msg)
    assert info.value.code == "INVALID_ARGUMENT"


def _nic(sysfs: Path, name: str, mac: str) -> None:
    (sysfs / "class/net" / name).mkdir(parents=True)
    (sysfs / "class/net" / name / "address").write_text(mac + "\n")


def test_nics_are_found_by_mac(tmp_path):
    _nic(tmp_path, "lo", "00:00:00:00:00:00")
    _nic(tmp_path, "eth0", "02:42:AC:12:00:02")
    assert nics_by_mac(str(tmp_path)) == {"02:42:ac:12:00:02": "eth0"}
    assert wait_for_nics(["02:42:ac:12:00:02"], 0.1, str(tmp_path)) == {"02:42:ac:12:00:02": "eth0"}
    with pytest.raises(AgentError, match="no NIC with MAC 02:00:00:00:00:09"):
        wait_for_nics(["02:00:00:00:00:09"], 0.1, str(tmp_path))


def test_agent_answers_configure_network(tmp_path):
    agent = AgentProc(tmp_path)
    try:
        assert agent.ok("configure_network", interfaces=[ETH], routes=ROUTES) == {"interfaces": ["eth0"],
                                                                                 "dns_relay": []}
        error = agent.err("configure_network", interfaces=[dict(ETH, mac="nope")])
        assert error["code"] == "INVALID_ARGUMENT" and "'interfaces[0].mac'" in error["message"]
        assert agent.ok("ping")["agent_version"]
    finally:
        agent.close()


def test_dns_queries_travel_as_events_and_answers_come_back(tmp_path):
    """The guest half of the DNS relay: a UDP query to the relay address becomes a
    dns_query event; the dns_answer event reaches the client that asked; an answer for an
    unknown query id is dropped."""
    import socket

    import hanabi_wire as P

    agent = AgentProc(tmp_path)
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        [listener] = agent.ok("configure_network", dns_relay=["127.0.0.1"])["dns_relay"]
        host, port = listener.rsplit(":", 1)
        query = b"\x12\x34" + b"\x01\x00\x00\x01" + b"\x00" * 6 + b"\x04test\x00\x00\x01\x00\x01"
        client.settimeout(5)
        client.sendto(query, (host, int(port)))
        event = agent.wait_for(lambda m: m.get("type") == "dns_query")
        assert event["server"] == "127.0.0.1" and P.b64d(event["data"]) == query
        agent.send({"type": "dns_answer", "qid": event["qid"] + 1000, "data": P.b64e(b"not for anyone")})
        agent.send({"type": "dns_answer", "qid": event["qid"], "data": P.b64e(b"answer:" + query)})
        assert client.recv(4096) == b"answer:" + query
        client.sendto(b"short", (host, int(port)))  # not a DNS message: dropped, no event
        assert agent.ok("ping")["agent_version"]
        assert not [m for m in agent.inbox if m.get("type") == "dns_query"]
    finally:
        client.close()
        agent.close()


def test_tcp_dns_queries_travel_too(tmp_path):
    """A TCP client (what resolvers use after a truncated answer): length-prefixed queries
    become dns_query events marked tcp, answers come back length-prefixed on the same
    connection; an oversized length closes it."""
    import socket

    import hanabi_wire as P

    agent = AgentProc(tmp_path)
    try:
        [listener] = agent.ok("configure_network", dns_relay=["127.0.0.1"])["dns_relay"]
        host, port = listener.rsplit(":", 1)
        query = b"\x43\x21" + b"\x01\x00\x00\x01" + b"\x00" * 6 + b"\x03tcp\x00\x00\x01\x00\x01"
        with socket.create_connection((host, int(port)), timeout=5) as client:
            client.sendall(len(query).to_bytes(2, "big") + query[:5])   # in two pieces
            client.sendall(query[5:])
            event = agent.wait_for(lambda m: m.get("type") == "dns_query")
            assert event["tcp"] is True and P.b64d(event["data"]) == query
            answer = b"big answer " * 100
            agent.send({"type": "dns_answer", "qid": event["qid"], "data": P.b64e(answer)})
            got = b""
            while len(got) < 2 + len(answer):
                got += client.recv(65536)
            assert got == len(answer).to_bytes(2, "big") + answer
        with socket.create_connection((host, int(port)), timeout=5) as client:  # nc: send, half-close, read
            client.sendall(len(query).to_bytes(2, "big") + query)
            client.shutdown(socket.SHUT_WR)
            event = agent.wait_for(lambda m: m.get("type") == "dns_query")
            agent.send({"type": "dns_answer", "qid": event["qid"], "data": P.b64e(b"after eof")})
            got = b""
            while True:
                chunk = client.recv(65536)
                if not chunk:
                    break
                got += chunk
            assert got == (9).to_bytes(2, "big") + b"after eof"                # answered, then closed
        with socket.create_connection((host, int(port)), timeout=5) as client:
            client.sendall((5000).to_bytes(2, "big"))
            assert client.recv(10) == b""                                # refused: too long
        assert agent.ok("ping")["agent_version"]
    finally:
        agent.close()


def test_rtnl_messages_are_the_requests_ip_sends():
    """Each planned command becomes one rtnetlink request: header, body, attributes (the
    layout of linux/rtnetlink.h), with iproute2's defaults."""
    import socket
    import struct

    from hanabi_guest.rtnl import RtnlError, ack_errno, encode

    def index_of(name: str) -> int:
        return {"eth0": 7, "hanabitmp0": 9}[name]

    up = encode(["ip", "link", "set", "dev", "eth0", "mtu", "1450", "up"], index_of, 5)
    assert struct.unpack_from("=IHHII", up) == (len(up), 16, 0x5, 5, 0)  # RTM_NEWLINK, REQUEST|ACK
    assert struct.unpack_from("=BxHiII", up, 16) == (0, 0, 7, 1, 1)  # ifindex 7, IFF_UP set
    assert up[32:] == struct.pack("=HHI", 8, 4, 1450)  # IFLA_MTU
    rename = encode(["ip", "link", "set", "dev", "hanabitmp0", "name", "eth0"], index_of, 6)
    assert struct.unpack_from("=BxHiII", rename, 16) == (0, 0, 9, 0, 0)  # flags untouched
    assert rename[32:] == struct.pack("=HH", 9, 3) + b"eth0\0" + b"\0" * 3  # IFLA_IFNAME, padded
    addr = encode(["ip", "-4", "addr", "replace", "172.18.0.2/16", "dev", "eth0"], index_of, 7)
    assert struct.unpack_from("=IHHII", addr)[1:3] == (20, 0x505)  # RTM_NEWADDR, CREATE|REPLACE
    assert struct.unpack_from("=BBBBI", addr, 16) == (socket.AF_INET, 16, 0, 0, 7)
    ip = socket.inet_aton("172.18.0.2")
    assert addr[24:] == struct.pack("=HH", 8, 2) + ip + struct.pack("=HH", 8, 1) + ip  # IFA_LOCAL, IFA_ADDRESS
    addr6 = encode(["ip", "-6", "addr", "replace", "fd00:db8::2/64", "dev", "eth0"], index_of, 8)
    assert struct.unpack_from("=BBBBI", addr6, 16) == (socket.AF_INET6, 64, 0, 0, 7)
    gw = encode(["ip", "-4", "route", "replace", "default", "via", "172.18.0.1", "dev", "eth0"], index_of, 9)
    assert struct.unpack_from("=IHHII", gw)[1:3] == (24, 0x505)  # RTM_NEWROUTE
    assert struct.unpack_from("=BBBBBBBBI", gw, 16) == (socket.AF_INET, 0, 0, 0, 254, 3, 0, 1, 0)
    assert gw[28:] == (struct.pack("=HH", 8, 5) + socket.inet_aton("172.18.0.1")  # RTA_GATEWAY
                       + struct.pack("=HHi", 8, 4, 7))  # RTA_OIF
    onlink = encode(["ip", "-4", "route", "replace", "10.1.0.0/16", "dev", "eth0"], index_of, 10)
    assert struct.unpack_from("=BBBBBBBBI", onlink, 16) == (socket.AF_INET, 16, 0, 0, 254, 3, 253, 1, 0)  # scope link
    assert onlink[28:36] == struct.pack("=HH", 8, 1) + socket.inet_aton("10.1.0.0")  # RTA_DST
    with pytest.raises(RtnlError, match="not a command"):
        encode(["ip", "link", "del", "eth0"], index_of, 11)
    ack = struct.pack("=IHHII", 36, 2, 0, 9, 0) + struct.pack("=i", -17) + b"\0" * 16
    assert ack_errno(ack, 9) == 17 and ack_errno(ack, 8) is None


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("ip"),
                    reason="needs root, unshare(1) and ip(8)")
def test_the_commands_are_carried_out_over_rtnetlink():
    """`carry_out` in a fresh network namespace with a veth pair: renamed, MTU, up, both
    addresses, both default routes and an on-link one, as `ip` would have left them; a
    second run (a retry) replaces rather than fails; a refusal names its command."""
    script = r"""
import subprocess, sys
from hanabi_guest.core import AgentError
from hanabi_guest.network import carry_out, check_network, plan_commands
sh = lambda *a: subprocess.run(["ip", *a], capture_output=True, text=True, check=True).stdout
sh("link", "add", "veth7", "type", "veth", "peer", "name", "peer7")
sh("link", "set", "peer7", "up")
mac = sh("-o", "link", "show", "dev", "veth7").split("link/ether ")[1].split()[0]
eth = {"name": "eth0", "mac": mac, "mtu": 1450, "addresses": ["172.18.0.2/16", "fd00:db8::2/64"]}
routes = [{"dest": "default", "gateway": "172.18.0.1", "dev": "eth0", "family": 4},
          {"dest": "default", "gateway": "fd00:db8::1", "dev": "eth0", "family": 6},
          {"dest": "10.1.0.0/16", "gateway": None, "dev": "eth0", "family": 4}]
ifaces, rts, _ = check_network({"interfaces": [eth], "routes": routes})
for _ in range(2):
    carry_out(plan_commands(ifaces, rts, {mac: "veth7"} if _ == 0 else {mac: "eth0"}))
print(sh("-o", "link", "show", "dev", "eth0"))
print(sh("-o", "addr", "show", "dev", "eth0", "scope", "global"))
print(sh("-d", "-4", "route"), sh("-d", "-6", "route", "show", "default"))
try:
    carry_out([["ip", "-4", "route", "replace", "default", "via", "192.0.2.1", "dev", "eth0"]])
except AgentError as exc:
    print("refused:", exc)
"""
    done = subprocess.run(["unshare", "--net", sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "eth0@peer7" in out and "mtu 1450" in out and ",UP" in out.split("\n")[0], out
    addrs = [line for line in out.splitlines() if " inet" in line]
    assert "inet 172.18.0.2/16" in out and "inet6 fd00:db8::2/64" in out, out
    assert len(addrs) == 2 and not any("brd" in line for line in addrs), out  # replaced, not added twice
    assert "unicast default via 172.18.0.1 dev eth0 proto boot scope global" in out, out
    assert "unicast 10.1.0.0/16 dev eth0 proto boot scope link" in out, out
    assert "unicast default via fd00:db8::1 dev eth0 proto boot" in out, out
    assert "refused: ip -4 route replace default via 192.0.2.1 dev eth0 failed: " in out, out
