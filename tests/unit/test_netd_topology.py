"""netd's pure planning: which links get a tap, what addresses and routes the guest gets;
and the netns path checks (no root needed)."""

from __future__ import annotations

import os
import socket

import pytest

from hanabi_common.errors import FailedPrecondition, InvalidArgument
from hanabi_common.netns import call_in_netns, check_netns
from hanabi_netd.topology import Address, Link, RouteEntry, plan_network, tap_name

LO = Link(index=1, name="lo", kind=None, mac="00:00:00:00:00:00", mtu=65536, loopback=True)
ETH0 = Link(index=7, name="eth0", kind="veth", mac="02:42:ac:12:00:02", mtu=1450)
V4, V6 = socket.AF_INET, socket.AF_INET6


def test_loopback_only_namespace_gets_an_empty_plan():
    plan = plan_network([LO], [Address(1, V4, "127.0.0.1", 8)], [])
    assert plan.wirings == [] and plan.routes == []


def test_docker_bridge_endpoint():
    addresses = [Address(1, V4, "127.0.0.1", 8), Address(7, V4, "172.18.0.2", 16),
                 Address(7, V6, "fd00:db8::2", 64), Address(7, V6, "fe80::42:acff:fe12:2", 64)]
    routes = [RouteEntry(V4, None, 0, "172.18.0.1", 7, proto=3),          # default via gw
              RouteEntry(V4, "172.18.0.0", 16, None, 7, proto=2),         # connected: skipped
              RouteEntry(V6, "fe80::", 64, None, 7, proto=2),              # link-local: skipped
              RouteEntry(V6, "ff00::", 8, None, 7, proto=3),               # multicast: skipped
              RouteEntry(V6, None, 0, "fd00:db8::1", 7, proto=3),
              RouteEntry(V4, "10.1.0.0", 16, None, 7, proto=4),            # static, direct
              RouteEntry(V4, "10.2.0.0", 16, "172.18.0.9", 7, proto=3, table=100)]  # other table
    plan = plan_network([LO, ETH0], addresses, routes)
    [wiring] = plan.wirings
    assert wiring.tap == "tap0_hanabi" and wiring.link == ETH0
    iface = wiring.interface
    assert (iface.name, iface.mac, iface.mtu) == ("eth0", "02:42:ac:12:00:02", 1450)
    assert iface.addresses == ["172.18.0.2/16", "fd00:db8::2/64"]
    assert [(r.dest, r.gateway, r.dev, r.family) for r in plan.routes] == [
        ("10.1.0.0/16", None, "eth0", 4), ("default", "172.18.0.1", "eth0", 4),
        ("default", "fd00:db8::1", "eth0", 6)]


def test_several_links_are_wired_in_index_order_and_our_taps_never_again():
    eth1 = Link(index=9, name="eth1", kind="veth", mac="02:42:ac:13:00:02", mtu=1500)
    leftover = Link(index=8, name="tap0_hanabi", kind="tun", mac="aa:bb:cc:dd:ee:ff", mtu=1500)
    bridge = Link(index=10, name="br0", kind="bridge", mac="aa:bb:cc:dd:ee:00", mtu=1500)
    plan = plan_network([eth1, LO, leftover, bridge, ETH0], [], [])
    assert [(w.link.name, w.tap) for w in plan.wirings] == [("eth0", "tap0_hanabi"), ("eth1", "tap1_hanabi")]
    assert tap_name(3) == "tap3_hanabi"


def test_too_many_links_is_a_clear_error():
    links = [Link(index=i, name=f"eth{i}", kind="veth", mac=f"02:00:00:00:00:{i:02x}", mtu=1500)
             for i in range(2, 8)]
    with pytest.raises(FailedPrecondition, match="6 interfaces; a hanabi VM takes at most 4"):
        plan_network(links, [], [])


def test_netns_checks(tmp_path):
    check_netns(f"/proc/{os.getpid()}/ns/net")
    with pytest.raises(InvalidArgument, match="does not exist"):
        check_netns(str(tmp_path / "nope"))
    with pytest.raises(InvalidArgument, match="not a network namespace"):
        check_netns("/etc/hostname")
    with pytest.raises(InvalidArgument, match="absolute"):
        check_netns("relative/ns")
    with pytest.raises(InvalidArgument, match="not a network namespace"):
        check_netns(f"/proc/{os.getpid()}/ns/uts")


def test_call_in_netns_returns_and_raises_in_the_callers_thread():
    here = f"/proc/{os.getpid()}/ns/net"
    assert call_in_netns(here, lambda: 42) == 42
    assert call_in_netns(None, lambda: "no namespace") == "no namespace"
    with pytest.raises(ZeroDivisionError):
        call_in_netns(here, lambda: 1 / 0)


def test_changes_after_attach_connect_and_disconnect():
    from hanabi_common.models.netd import Interface
    from hanabi_netd.topology import plan_change

    wired = [Interface(name="eth0", link="eth0", tap="tap0_hanabi", mac="02:42:ac:12:00:02", mtu=1450,
                       addresses=["172.18.0.2/16"])]
    eth1 = Link(index=9, name="eth1", kind="veth", mac="02:42:ac:13:00:02", mtu=1500)
    addrs = [Address(7, V4, "172.18.0.2", 16), Address(9, V4, "172.19.0.2", 16)]
    routes = [RouteEntry(V4, "10.5.0.0", 16, "172.19.0.1", 9, proto=3)]
    assert plan_change([LO, ETH0], addrs, [], wired).empty
    # connect: a new link, once up and addressed, gets the next free tap and its own routes
    assert plan_change([LO, ETH0, Link(9, "eth1", "veth", "02:42:ac:13:00:02", 1500, up=False)], addrs, [], wired).empty
    assert plan_change([LO, ETH0, eth1], addrs[:1], [], wired).empty
    change = plan_change([LO, ETH0, eth1], addrs, routes, wired)
    assert [(w.link.name, w.tap, w.interface.addresses) for w in change.added] == [
        ("eth1", "tap1_hanabi", ["172.19.0.2/16"])]
    assert [(r.dest, r.gateway, r.dev) for r in change.routes] == [("10.5.0.0/16", "172.19.0.1", "eth1")]
    assert change.removed == []
    # disconnect: the wired link is gone (or came back with another MAC)
    change = plan_change([LO, eth1], addrs, [], wired)
    assert change.removed == wired and [w.tap for w in change.added] == ["tap0_hanabi"]
    relinked = Link(index=7, name="eth0", kind="veth", mac="02:42:ac:12:00:99", mtu=1450)
    assert plan_change([LO, relinked], addrs, [], wired).removed == wired
