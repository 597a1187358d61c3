"""The guest's network: its NICs configured exactly as netd found the container's links.

``check_network`` validates a ``configure_network`` request (the host may be buggy; its
fields are defined in ``hanabi_wire.messages``);
``plan_commands`` turns it into ``ip`` command lines (pure, unit-tested);
``apply`` brings loopback up (``link_up``: an ioctl, not a process: under TCG an exec of
busybox costs tens of milliseconds, and every container start pays this one), finds each
NIC by its MAC in sysfs (the VMM gave the guest NIC the link's MAC), renames it to the
link's name, and carries out the commands over rtnetlink itself (``rtnl``: the requests
busybox's ``ip`` would send, without its exec). IPv6 duplicate address detection
and router advertisements are turned off on configured NICs: the addresses are already
the container's, and the routes are the ones Docker set.

STDLIB ONLY: runs inside the guest.
"""

from __future__ import annotations

import ipaddress
import os
import re
import time

from hanabi_wire.constants import E_FAILED_PRECONDITION, E_INVALID_ARGUMENT, E_NOT_FOUND, T_CONFIGURE_NETWORK
from hanabi_wire.messages import MESSAGES
from hanabi_wire.schema import WireError, check

from .core import AgentError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

MAC_RE = re.compile(r"([0-9a-f]{2}:){5}[0-9a-f]{2}")
NIC_WAIT_S = 5.0
_FIELDS = MESSAGES[T_CONFIGURE_NETWORK].fields


def _need(cond: bool, message: str) -> None:
    if not cond:
        raise AgentError(E_INVALID_ARGUMENT, message)


def check_network(msg: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[str]]:
    """The request's interfaces, routes and DNS relay addresses (loopback IPv4 only),
    validated and normalised (AgentError if bad): the shapes and bounds of
    ``hanabi_wire.messages``, then what they cannot say (addresses parse, no name or MAC
    twice, routes only over configured interfaces)."""
    try:
        fields = check(_FIELDS, msg)
    except WireError as exc:
        raise AgentError(E_INVALID_ARGUMENT, str(exc)) from None
    clean_ifaces, names, macs = [], set(), set()
    for iface in fields["interfaces"]:
        name, mac, mtu = iface["name"], iface["mac"].lower(), iface["mtu"]
        _need(name != "lo", f"interface name {name!r} is not a valid link name")
        _need(name not in names and mac not in macs, f"interface {name} ({mac}) appears twice")
        clean_addrs = []
        for cidr in iface["addresses"]:
            try:
                clean_addrs.append(str(ipaddress.ip_interface(cidr)))
            except (ValueError, TypeError):
                raise AgentError(E_INVALID_ARGUMENT, f"interface {name}: {cidr!r} is not an address/prefix") from None
        names.add(name)
        macs.add(mac)
        clean_ifaces.append({"name": name, "mac": mac, "mtu": mtu, "addresses": clean_addrs})
    clean_routes = []
    for route in fields["routes"]:
        dest, gateway, dev, family = route["dest"], route["gateway"], route["dev"], route["family"]
        _need(dev is None or dev in names, f"route {dest!r}: device {dev!r} is not a configured interface")
        try:
            if dest != "default":
                dest = str(ipaddress.ip_network(dest, strict=False))
            if gateway is not None:
                gateway = str(ipaddress.ip_address(gateway))
        except (ValueError, TypeError):
            raise AgentError(E_INVALID_ARGUMENT, f"route {dest!r} via {gateway!r} is not valid") from None
        clean_routes.append({"dest": dest, "gateway": gateway, "dev": dev, "family": family})
    clean_relay = []
    for address in fields["dns_relay"]:
        try:
            ip = ipaddress.IPv4Address(address)
        except (ValueError, TypeError):
            raise AgentError(E_INVALID_ARGUMENT, f"dns_relay address {address!r} is not an IPv4 address") from None
        _need(ip.is_loopback, f"dns_relay address {address} is not a loopback address")
        clean_relay.append(str(ip))
    return clean_ifaces, clean_routes, clean_relay


def plan_commands(interfaces: list[dict[str, Any]], routes: list[dict[str, Any]],
                  current: dict[str, str]) -> list[list[str]]:
    """The ``ip`` argv lists (without the busybox prefix) that configure the NICs.

    ``current`` maps each interface's MAC to the name the guest kernel gave that NIC.
    Addresses and routes are replaced, not added: configuring a NIC again (a retry after a
    half-done attempt) does the same and succeeds.
    """
    cmds: list[list[str]] = []
    renames = [(current[iface["mac"]], iface["name"]) for iface in interfaces
               if current[iface["mac"]] != iface["name"]]
    # Through temporary names: the kernel's eth0 may be the NIC that must become eth1.
    for position, (old, _) in enumerate(renames):
        cmds.append(["ip", "link", "set", "dev", old, "name", f"hanabitmp{position}"])
    for position, (_, name) in enumerate(renames):
        cmds.append(["ip", "link", "set", "dev", f"hanabitmp{position}", "name", name])
    for iface in interfaces:
        name = iface["name"]
        cmds.append(["ip", "link", "set", "dev", name, "mtu", str(iface["mtu"]), "up"])
        for cidr in iface["addresses"]:
            family = "-6" if ":" in cidr else "-4"
            cmds.append(["ip", family, "addr", "replace", cidr, "dev", name])
    for route in routes:
        cmd = ["ip", "-6" if route["family"] == 6 else "-4", "route", "replace", route["dest"]]
        if route["gateway"]:
            cmd += ["via", route["gateway"]]
        if route["dev"]:
            cmd += ["dev", route["dev"]]
        cmds.append(cmd)
    return cmds


def nics_by_mac(sysfs: str = "/sys") -> dict[str, str]:
    """MAC -> name of every ethernet NIC the guest kernel has (loopback excluded)."""
    base = os.path.join(sysfs, "class", "net")
    found: dict[str, str] = {}
    try:
        names = os.listdir(base)
    except OSError:
        return found
    for name in names:
        try:
            with open(os.path.join(base, name, "address"), encoding="ascii") as f:
                mac = f.read().strip().lower()
        except OSError:
            continue
        if name != "lo" and MAC_RE.fullmatch(mac):
            found[mac] = name
    return found


def wait_for_nics(macs: list[str], timeout: float, sysfs: str = "/sys") -> dict[str, str]:
    """MAC -> guest name, once every MAC in ``macs`` is present (AgentError after timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        found = nics_by_mac(sysfs)
        missing = [mac for mac in macs if mac not in found]
        if not missing:
            return found
        if time.monotonic() >= deadline:
            raise AgentError(E_NOT_FOUND, f"no NIC with MAC {', '.join(missing)} appeared "
                                          f"within {timeout:.0f}s (present: {sorted(found) or 'none'})")
        time.sleep(0.02)


SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
IFREQ = "16sh22x"  # struct ifreq: the name, ifr_flags, the rest of the union (40 bytes)


_ioctl_socket: Any = None  # kept: a VM template makes it, its clones use it (one less to make)


def link_up(name: str) -> None:
    """``ip link set dev NAME up``, done in this process (SIOCGIFFLAGS/SIOCSIFFLAGS)."""
    import fcntl
    import socket
    import struct

    global _ioctl_socket
    try:
        if _ioctl_socket is None:
            _ioctl_socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        sock = _ioctl_socket
        flags = struct.unpack(IFREQ, fcntl.ioctl(sock, SIOCGIFFLAGS, struct.pack(IFREQ, name.encode(), 0)))[1]
        if not flags & IFF_UP:
            fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack(IFREQ, name.encode(), flags | IFF_UP))
    except OSError as exc:
        raise AgentError(E_FAILED_PRECONDITION, f"ip link set dev {name} up failed: {exc}") from None


def carry_out(commands: list[list[str]]) -> None:
    """The ``ip`` commands of ``plan_commands``, over rtnetlink (``rtnl``); AgentError
    naming the command the kernel refused."""
    if not commands:
        return
    from .rtnl import Rtnl

    rtnl = Rtnl()
    try:
        for argv in commands:
            try:
                rtnl.run(argv)
            except (OSError, ValueError) as exc:
                text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                raise AgentError(E_FAILED_PRECONDITION, f"{' '.join(argv)} failed: {text}") from None
    finally:
        rtnl.close()


def _sysctl(path: str, value: str) -> None:
    try:
        with open(path, "w", encoding="ascii") as f:
            f.write(value)
    except OSError:
        pass  # IPv6 disabled in the guest kernel: nothing to turn off


def apply(interfaces: list[dict[str, Any]], routes: list[dict[str, Any]], sysfs: str = "/sys") -> None:
    """Configure the guest's NICs and routes (the real guest only)."""
    link_up("lo")
    if not interfaces and not routes:
        return
    current = wait_for_nics([iface["mac"] for iface in interfaces], NIC_WAIT_S, sysfs)
    for iface in interfaces:
        for old_or_new in {current[iface["mac"]], iface["name"]}:
            for key, value in (("accept_dad", "0"), ("accept_ra", "0"), ("autoconf", "0")):
                _sysctl(f"/proc/sys/net/ipv6/conf/{old_or_new}/{key}", value)
    carry_out(plan_commands(interfaces, routes, current))
