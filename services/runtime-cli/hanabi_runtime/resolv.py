"""The container's resolv.conf, as Docker gave it: which nameservers are loopback ones.

Docker's user-defined networks point the container at its embedded DNS server,
`nameserver 127.0.0.11`, which listens inside the container's network namespace. In a
VM that address is the guest's own loopback, so the guest relays queries for it to the
host (agentd) instead; this module finds those addresses in the bind-mounted file.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

RESOLV_CONF = "/etc/resolv.conf"
MAX_BYTES = 64 << 10


def loopback_nameservers(text: str) -> list[str]:
    """The IPv4 loopback nameservers of a resolv.conf, in order, without repeats."""
    found: list[str] = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            try:
                address = ipaddress.ip_address(fields[1])
            except ValueError:
                continue
            if address.version == 4 and address.is_loopback and str(address) not in found:
                found.append(str(address))
    return found[:4]


def relayed_nameservers(mounts: list[dict] | None) -> list[str]:
    """Loopback nameservers of the resolv.conf bind-mounted into the container (none
    when there is no such mount or it cannot be read)."""
    for mount in mounts or []:
        if mount.get("destination") == RESOLV_CONF and mount.get("source"):
            try:
                with open(Path(mount["source"]), "rb") as handle:
                    return loopback_nameservers(handle.read(MAX_BYTES).decode(errors="replace"))
            except OSError:
                return []
    return []
