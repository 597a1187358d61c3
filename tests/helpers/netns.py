"""Test-made network namespaces (pyroute2-fixture style): two namespaces joined by a veth
pair with a /30, torn down after the test. Traffic stays inside them."""

from __future__ import annotations

import itertools
import os
import subprocess
from dataclasses import dataclass

_counter = itertools.count()


def ip(*args: str, netns: str | None = None, check: bool = True) -> str:
    """Run `ip` (in `netns` when given); its stdout."""
    argv = ["ip"] + (["-n", netns] if netns else []) + list(args)
    done = subprocess.run(argv, capture_output=True, text=True)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")
    return done.stdout


@dataclass
class NetnsPair:
    """Namespace `inner` (the container's) with link `inner_link` = `inner_ip`, joined to
    `outer` (a peer host) with `outer_link` = `outer_ip`."""

    inner: str
    outer: str
    inner_link: str = "eth0"
    outer_link: str = "peer0"
    inner_ip: str = "10.213.0.1"
    outer_ip: str = "10.213.0.2"
    prefix: int = 30

    @property
    def inner_path(self) -> str:
        return f"/run/netns/{self.inner}"

    def create(self) -> NetnsPair:
        ip("netns", "add", self.inner)
        ip("netns", "add", self.outer)
        tmp_a, tmp_b = f"hnt{os.getpid() % 10000}a{next(_counter)}", f"hnt{os.getpid() % 10000}b{next(_counter)}"
        ip("link", "add", tmp_a, "type", "veth", "peer", "name", tmp_b)
        ip("link", "set", tmp_a, "netns", self.inner, "name", self.inner_link)
        ip("link", "set", tmp_b, "netns", self.outer, "name", self.outer_link)
        for ns, link, addr in ((self.inner, self.inner_link, self.inner_ip),
                               (self.outer, self.outer_link, self.outer_ip)):
            ip("addr", "add", f"{addr}/{self.prefix}", "dev", link, netns=ns)
            ip("link", "set", link, "up", netns=ns)
            ip("link", "set", "lo", "up", netns=ns)
        return self

    def link_info(self, link: str | None = None) -> str:
        """A link of the inner namespace: name, state, MAC, MTU, flags, global addresses
        (not the IPv6 link-local one, whose DAD state changes by itself)."""
        name = link or self.inner_link
        return (ip("-o", "link", "show", "dev", name, netns=self.inner)
                + ip("-o", "addr", "show", "dev", name, "scope", "global", netns=self.inner))

    def mac(self) -> str:
        return ip("-br", "link", "show", "dev", self.inner_link, netns=self.inner).split()[2]

    def leftovers(self) -> list[str]:
        """Taps, qdiscs and filters hanabi might have left in the inner namespace."""
        found = []
        links = ip("-br", "link", netns=self.inner)
        if "_hanabi" in links:
            found.append(f"taps: {links}")
        qdiscs = subprocess.run(
            ["tc", "-n", self.inner, "qdisc", "show"], capture_output=True, text=True).stdout
        if "ingress" in qdiscs:
            found.append(f"qdiscs: {qdiscs}")
        filters = subprocess.run(["tc", "-n", self.inner, "filter", "show", "dev", self.inner_link, "ingress"],
                                 capture_output=True, text=True).stdout
        if filters.strip():
            found.append(f"filters: {filters}")
        return found

    def destroy(self) -> None:
        for ns in (self.inner, self.outer):
            ip("netns", "del", ns, check=False)


def netns_pair() -> NetnsPair:
    """A fresh pair with unique names."""
    tag = f"{os.getpid()}-{next(_counter)}"
    return NetnsPair(inner=f"hanabi-t{tag}-in", outer=f"hanabi-t{tag}-out").create()
