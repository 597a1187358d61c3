"""What a container's network namespace holds, and what the VM and the guest get from it.

Pure: the netlink dumps come in as plain records (`tcfilter.snapshot` reads them), the
plan goes out. The "tcfilter" model of Kata: every ethernet link Docker (or a CNI plugin)
put in the namespace gets a tap of its own, traffic is redirected both ways between the
two with tc, and the guest's NIC takes over the link's MAC, MTU, addresses and routes,
so the VM answers where the container would have.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from hanabi_common.errors import FailedPrecondition
from hanabi_common.models.netd import Interface, Route

TAP_SUFFIX = "_hanabi"
MAX_INTERFACES = 4
# Link kinds that carry a container's traffic; taps, bridges and tunnels are not wired.
WIRED_KINDS = {"veth", "macvlan", "ipvlan", "macvtap", None}
RTPROT_KERNEL = 2
RT_TABLE_MAIN = 254


@dataclass(frozen=True)
class Link:
    """A network link as netlink reports it."""

    index: int
    name: str
    kind: str | None
    mac: str | None
    mtu: int
    loopback: bool = False
    up: bool = True


@dataclass(frozen=True)
class Address:
    """An address on a link."""

    index: int
    family: int
    address: str
    prefixlen: int


@dataclass(frozen=True)
class RouteEntry:
    """A route of the main table."""

    family: int
    dst: str | None
    dst_len: int
    gateway: str | None
    oif: int | None
    proto: int
    table: int = RT_TABLE_MAIN
    multipath: bool = False


@dataclass(frozen=True)
class Wiring:
    """One link to wire: the namespace's link and the tap that stands for it."""

    link: Link
    tap: str
    interface: Interface


@dataclass(frozen=True)
class NetworkPlan:
    """The taps to make and what the guest configures."""

    wirings: list[Wiring]
    routes: list[Route]


def tap_name(position: int) -> str:
    """The tap for the position-th wired link: tap0_hanabi, tap1_hanabi..."""
    return f"tap{position}{TAP_SUFFIX}"


def is_ours(link: Link) -> bool:
    """True for a tap hanabi made (a leftover of a crash is never wired again)."""
    return link.name.endswith(TAP_SUFFIX)


def wired_links(links: list[Link]) -> list[Link]:
    """The links of the namespace that carry container traffic, in index order."""
    chosen = [link for link in links
              if not link.loopback and not is_ours(link) and link.kind in WIRED_KINDS and link.mac]
    return sorted(chosen, key=lambda link: link.index)


def guest_addresses(addresses: list[Address], index: int) -> list[str]:
    """The CIDRs the guest gives the link at `index`: IPv4 and global IPv6, no link-local."""
    result = []
    for entry in addresses:
        if entry.index != index:
            continue
        ip = ipaddress.ip_address(entry.address)
        if ip.is_link_local or ip.is_loopback:
            continue
        result.append(f"{entry.address}/{entry.prefixlen}")
    return result


def guest_routes(routes: list[RouteEntry], names: dict[int, str]) -> list[Route]:
    """The routes the guest needs: gateway and static routes of wired links, in order.

    Connected routes (made by the kernel for an address) and link-local/multicast IPv6
    routes are left out: the guest's kernel makes its own when it gets the addresses.
    """
    result = []
    for entry in routes:
        if entry.table != RT_TABLE_MAIN or entry.multipath or entry.oif not in names:
            continue
        if entry.proto == RTPROT_KERNEL and entry.gateway is None:
            continue
        dest = "default" if entry.dst is None or entry.dst_len == 0 else f"{entry.dst}/{entry.dst_len}"
        if dest != "default":
            net = ipaddress.ip_network(dest, strict=False)
            if net.is_link_local or net.is_multicast:
                continue
        result.append(Route(dest=dest, gateway=entry.gateway, dev=names[entry.oif],
                            family=6 if entry.family == 10 else 4))
    # Routes through a gateway need the gateway's own subnet first: connected routes come
    # from the addresses, so only ordering among the kept routes matters: direct ones first.
    return sorted(result, key=lambda route: route.gateway is not None)


def plan_network(links: list[Link], addresses: list[Address], routes: list[RouteEntry]) -> NetworkPlan:
    """The wiring for a namespace: an empty plan when it holds loopback only."""
    chosen = wired_links(links)
    if len(chosen) > MAX_INTERFACES:
        raise FailedPrecondition(
            f"the network namespace has {len(chosen)} interfaces; a hanabi VM takes at most "
            f"{MAX_INTERFACES} ({', '.join(link.name for link in chosen)})")
    wirings = []
    for position, link in enumerate(chosen):
        tap = tap_name(position)
        interface = Interface(name=link.name, link=link.name, tap=tap, mac=link.mac or "",
                              mtu=link.mtu, addresses=guest_addresses(addresses, link.index))
        wirings.append(Wiring(link=link, tap=tap, interface=interface))
    names = {link.index: link.name for link in chosen}
    return NetworkPlan(wirings=wirings, routes=guest_routes(routes, names))


@dataclass(frozen=True)
class NetworkChange:
    """What changed in a wired namespace since attach: links to wire and to let go."""

    added: list[Wiring]
    removed: list[Interface]
    routes: list[Route]

    @property
    def empty(self) -> bool:
        """True when there is nothing to do."""
        return not self.added and not self.removed


def plan_change(links: list[Link], addresses: list[Address], routes: list[RouteEntry],
                wired: list[Interface]) -> NetworkChange:
    """Links that appeared since `wired` was made (`docker network connect`), once they are
    up and addressed, and wired interfaces whose link is gone (`disconnect`). New links get
    the lowest free tap numbers; `routes` are the new links' own routes."""
    current = {(link.name, (link.mac or "").lower()): link for link in wired_links(links)}
    kept = [i for i in wired if (i.link, i.mac.lower()) in current]
    removed = [i for i in wired if (i.link, i.mac.lower()) not in current]
    known = {(i.link, i.mac.lower()) for i in kept}
    taken = {i.tap for i in kept}
    added = []
    for key, link in sorted(current.items(), key=lambda item: item[1].index):
        addrs = guest_addresses(addresses, link.index)
        if key in known or not link.up or not addrs:
            continue
        tap = next(tap_name(n) for n in range(len(taken) + 1) if tap_name(n) not in taken)
        taken.add(tap)
        added.append(Wiring(link=link, tap=tap, interface=Interface(
            name=link.name, link=link.name, tap=tap, mac=link.mac or "", mtu=link.mtu, addresses=addrs)))
    if len(kept) + len(added) > MAX_INTERFACES:
        raise FailedPrecondition(f"a hanabi VM takes at most {MAX_INTERFACES} interfaces")
    new_routes = guest_routes(routes, {w.link.index: w.link.name for w in added})
    return NetworkChange(added=added, removed=removed, routes=new_routes)
