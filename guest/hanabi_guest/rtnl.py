"""The ``ip`` commands of ``network.plan_commands``, carried out over rtnetlink in the agent.

Under TCG every exec of busybox costs tens of milliseconds in a fresh VM (its code is
translated anew in every clone of a VM template), and a container with one NIC needed three
of them; this sends the same requests busybox's ``ip`` sends, on one NETLINK_ROUTE socket,
and waits for each acknowledgement. The commands understood are exactly the forms
``plan_commands`` writes (``ip link set dev D name N``, ``ip link set dev D mtu M up``,
``ip -4|-6 addr replace CIDR dev D``, ``ip -4|-6 route replace DEST [via GW] [dev D]``), with
iproute2's defaults: an address of scope global (host for a loopback one) and no broadcast,
a route of protocol boot in the main table, of scope link when it has no gateway (IPv4).
A refusal raises ``RtnlError`` with the kernel's errno.

``encode`` (the message of one command, pure) is unit-tested byte by byte; ``Rtnl`` does
the I/O.

STDLIB ONLY: runs inside the guest.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

NETLINK_ROUTE = 0
RTM_NEWLINK, RTM_NEWADDR, RTM_NEWROUTE = 16, 20, 24
NLM_F_REQUEST, NLM_F_ACK, NLM_F_REPLACE, NLM_F_CREATE = 0x1, 0x4, 0x100, 0x400
NLMSG_ERROR = 2
IFLA_MTU, IFLA_IFNAME = 4, 3
IFA_ADDRESS, IFA_LOCAL = 1, 2
RTA_DST, RTA_OIF, RTA_GATEWAY = 1, 4, 5
IFF_UP = 0x1
RT_TABLE_MAIN, RTPROT_BOOT, RTN_UNICAST = 254, 3, 1
RT_SCOPE_UNIVERSE, RT_SCOPE_LINK, RT_SCOPE_HOST = 0, 253, 254
NLMSG_HDR = "=IHHII"  # len, type, flags, seq, pid
IFINFOMSG = "=BxHiII"  # family, type, index, flags, change
IFADDRMSG = "=BBBBI"  # family, prefixlen, flags, scope, index
RTMSG = "=BBBBBBBBI"  # family, dst_len, src_len, tos, table, protocol, scope, type, flags


class RtnlError(OSError):
    """The kernel refused a request (``errno``), or a command is not one this carries out."""


def _attr(kind: int, payload: bytes) -> bytes:
    """One rtattr, padded to 4 bytes."""
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


def _family(flag: str) -> int:
    return socket.AF_INET6 if flag == "-6" else socket.AF_INET


def encode(argv: list[str], index_of: Callable[[str], int], seq: int) -> bytes:
    """The netlink message (header included) that carries out ``argv`` (an ``ip`` command
    of ``plan_commands``); ``index_of(name)`` gives a link's ifindex. RtnlError (EINVAL)
    for any other command."""
    flags = NLM_F_REQUEST | NLM_F_ACK
    if argv[:4] == ["ip", "link", "set", "dev"] and len(argv) == 7 and argv[5] == "name":
        kind = RTM_NEWLINK
        body = struct.pack(IFINFOMSG, socket.AF_UNSPEC, 0, index_of(argv[4]), 0, 0)
        body += _attr(IFLA_IFNAME, argv[6].encode() + b"\0")
    elif argv[:4] == ["ip", "link", "set", "dev"] and len(argv) == 8 and argv[5] == "mtu" and argv[7] == "up":
        kind = RTM_NEWLINK
        body = struct.pack(IFINFOMSG, socket.AF_UNSPEC, 0, index_of(argv[4]), IFF_UP, IFF_UP)
        body += _attr(IFLA_MTU, struct.pack("=I", int(argv[6])))
    elif len(argv) == 7 and argv[2:4] == ["addr", "replace"] and argv[1] in ("-4", "-6") and argv[5] == "dev":
        kind, flags = RTM_NEWADDR, flags | NLM_F_CREATE | NLM_F_REPLACE
        iface = ipaddress.ip_interface(argv[4])
        raw = iface.ip.packed
        scope = RT_SCOPE_HOST if iface.ip.is_loopback else RT_SCOPE_UNIVERSE
        body = struct.pack(IFADDRMSG, _family(argv[1]), iface.network.prefixlen, 0, scope, index_of(argv[6]))
        body += _attr(IFA_LOCAL, raw) + _attr(IFA_ADDRESS, raw)
    elif len(argv) >= 5 and argv[2:4] == ["route", "replace"] and argv[1] in ("-4", "-6"):
        kind, flags = RTM_NEWROUTE, flags | NLM_F_CREATE | NLM_F_REPLACE
        family = _family(argv[1])
        opts = dict(zip(argv[5::2], argv[6::2], strict=False))
        if len(argv[5:]) % 2 or set(opts) - {"via", "dev"}:
            raise RtnlError(22, f"not a command this agent carries out: {' '.join(argv)}")
        attrs = b""
        dst_len = 0
        if argv[4] != "default":
            net = ipaddress.ip_network(argv[4], strict=False)
            dst_len = net.prefixlen
            attrs += _attr(RTA_DST, net.network_address.packed)
        if "via" in opts:
            attrs += _attr(RTA_GATEWAY, ipaddress.ip_address(opts["via"]).packed)
        if "dev" in opts:
            attrs += _attr(RTA_OIF, struct.pack("=i", index_of(opts["dev"])))
        scope = RT_SCOPE_LINK if family == socket.AF_INET and "via" not in opts else RT_SCOPE_UNIVERSE
        body = struct.pack(RTMSG, family, dst_len, 0, 0, RT_TABLE_MAIN, RTPROT_BOOT, scope, RTN_UNICAST, 0)
        body += attrs
    else:
        raise RtnlError(22, f"not a command this agent carries out: {' '.join(argv)}")
    return struct.pack(NLMSG_HDR, struct.calcsize(NLMSG_HDR) + len(body), kind, flags, seq, 0) + body


def ack_errno(reply: bytes, seq: int) -> int | None:
    """The errno of the NLMSG_ERROR acknowledging ``seq`` in ``reply`` (0: done), or None
    when ``reply`` holds no acknowledgement of it."""
    off = 0
    hdr = struct.calcsize(NLMSG_HDR)
    while off + hdr <= len(reply):
        length, kind, _flags, got_seq, _pid = struct.unpack_from(NLMSG_HDR, reply, off)
        if length < hdr:
            break
        if kind == NLMSG_ERROR and got_seq == seq and off + hdr + 4 <= len(reply):
            (err,) = struct.unpack_from("=i", reply, off + hdr)
            return -err
        off += (length + 3) & ~3
    return None


class Rtnl:
    """One NETLINK_ROUTE socket; ``run(argv)`` carries out one command and waits for its ack."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE)
        self.sock.bind((0, 0))
        self.seq = 0

    def run(self, argv: list[str]) -> None:
        self.seq += 1
        self.sock.send(encode(argv, socket.if_nametoindex, self.seq))
        while True:
            err = ack_errno(self.sock.recv(65536), self.seq)
            if err is None:
                continue
            if err:
                raise RtnlError(err, os.strerror(err))
            return

    def close(self) -> None:
        self.sock.close()
