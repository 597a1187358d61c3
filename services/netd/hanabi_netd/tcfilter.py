"""The netlink side of netd (pyroute2): read a namespace, wire and unwire a link and its tap.

Every function here runs inside the container's network namespace (netd calls them
through `hanabi_common.netns.call_in_netns`) and takes an open `IPRoute` made there.
Wiring a link: a persistent tap (no packet info, virtio-net headers) with the link's
MTU, up; an ingress qdisc on both; on each, one u32 filter matching every packet with a
mirred action redirecting it to the other's egress. The link itself is not changed
(its addresses stay: the namespace's stack never sees a packet again), and unwiring
removes exactly the qdiscs and the tap.
"""

from __future__ import annotations

import errno
import logging
import socket

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from hanabi_common.errors import FailedPrecondition, HanabiError, NotFound
from hanabi_common.netns import call_in_netns
from hanabi_netd.topology import Address, Link, RouteEntry

log = logging.getLogger("hanabi.netd.tcfilter")
ETH_P_ALL = 0x0003
INGRESS_PARENT = 0xFFFF0000
ARPHRD_LOOPBACK = 772
IFF_UP = 0x1
TAP_FLAGS = {"no_pi": True, "vnet_hdr": True, "one_queue": False, "multi_queue": False}


def with_ipr(netns_path: str | None, func):
    """`func(ipr)` with an IPRoute made inside the namespace at `netns_path` (in a thread
    that joined it), and its result."""
    def run():
        with IPRoute() as ipr:
            return func(ipr)

    return call_in_netns(netns_path, run)


def snapshot(ipr: IPRoute) -> tuple[list[Link], list[Address], list[RouteEntry]]:
    """The links, addresses and main-table routes of the namespace `ipr` was made in."""
    links = []
    for msg in ipr.get_links():
        info = msg.get_attr("IFLA_LINKINFO")
        kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
        links.append(Link(index=msg["index"], name=msg.get_attr("IFLA_IFNAME"), kind=kind,
                          mac=msg.get_attr("IFLA_ADDRESS"), mtu=msg.get_attr("IFLA_MTU") or 1500,
                          loopback=msg["ifi_type"] == ARPHRD_LOOPBACK, up=bool(msg["flags"] & IFF_UP)))
    addresses = [Address(index=msg["index"], family=msg["family"],
                         address=msg.get_attr("IFA_ADDRESS"), prefixlen=msg["prefixlen"])
                 for msg in ipr.get_addr()]
    routes = []
    for family in (socket.AF_INET, socket.AF_INET6):
        for msg in ipr.get_routes(family=family):
            routes.append(RouteEntry(
                family=family, dst=msg.get_attr("RTA_DST"), dst_len=msg["dst_len"],
                gateway=msg.get_attr("RTA_GATEWAY"), oif=msg.get_attr("RTA_OIF"),
                proto=msg["proto"], table=msg.get_attr("RTA_TABLE") or msg["table"],
                multipath=msg.get_attr("RTA_MULTIPATH") is not None))
    return links, addresses, routes


def _lookup(ipr: IPRoute, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return found[0] if found else None


def _redirect(ipr: IPRoute, source: int, target: int) -> None:
    """Ingress qdisc on `source` and a filter sending all its packets out of `target`."""
    try:
        ipr.tc("add", "ingress", source, "ffff:")
    except NetlinkError as exc:
        if exc.code == errno.EEXIST:
            raise FailedPrecondition(
                f"link #{source} already has an ingress qdisc: something else filters its traffic") from None
        raise
    ipr.tc("add-filter", "u32", source, parent=INGRESS_PARENT, protocol=ETH_P_ALL, prio=1,
           target=0x1, keys=["0x0/0x0+0"],
           action=[{"kind": "mirred", "direction": "egress", "action": "redirect", "ifindex": target}])


def wire(ipr: IPRoute, link_name: str, tap: str, mtu: int) -> None:
    """Make `tap` and redirect all traffic between it and `link_name`, both ways.

    Raises NotFound when the link vanished (Docker removed it mid-attach); whatever this
    call made is removed again before it raises.
    """
    if _lookup(ipr, link_name) is None:
        raise NotFound(f"interface {link_name} is gone from the network namespace")
    try:
        ipr.link("add", ifname=tap, kind="tuntap", mode="tap", ifr=TAP_FLAGS)
        tap_index = _lookup(ipr, tap)
        if tap_index is None:
            raise HanabiError(f"tap {tap} was created but cannot be found")
        ipr.link("set", index=tap_index, mtu=mtu, state="up")
        link_index = _lookup(ipr, link_name)
        if link_index is None:
            raise NotFound(f"interface {link_name} vanished while it was being wired")
        _redirect(ipr, link_index, tap_index)
        _redirect(ipr, tap_index, link_index)
    except NetlinkError as exc:
        unwire(ipr, link_name, tap)
        if exc.code in (errno.ENODEV, errno.ENOENT) and _lookup(ipr, link_name) is None:
            raise NotFound(f"interface {link_name} vanished while it was being wired") from None
        raise FailedPrecondition(f"cannot wire {link_name} to {tap}: {exc}") from None
    except BaseException:
        unwire(ipr, link_name, tap)
        raise


def unwire(ipr: IPRoute, link_name: str, tap: str) -> None:
    """Remove the link's ingress qdisc (and with it the filter) and the tap; idempotent."""
    link_index = _lookup(ipr, link_name)
    if link_index is not None:
        try:
            ipr.tc("del", "ingress", link_index, "ffff:")
        except NetlinkError as exc:
            if exc.code not in (errno.EINVAL, errno.ENOENT, errno.ENODEV):
                raise
    tap_index = _lookup(ipr, tap)
    if tap_index is not None:
        try:
            ipr.link("del", index=tap_index)
        except NetlinkError as exc:
            if exc.code != errno.ENODEV:
                raise
