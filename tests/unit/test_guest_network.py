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
