"""Debian packages for the guest image: resolve candidates, download, verify, unpack.

Uses the ordinary apt clients: ``apt-cache show --no-all-versions`` for the candidate
version, SHA256 and Depends of each package (``apt-get update`` runs first only when the
kernel meta-package has no candidate), ``apt-get download name=version`` into a cache
directory (files are re-used when their SHA256 still matches the index), and
``dpkg-deb -x`` to unpack.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
from dataclasses import dataclass

DEFAULT_CACHE = "/var/cache/hanabi/debs"
# The generic kernel: unlike the cloud flavour it has 9P (9p, 9pnet_virtio, 9pnet_fd) as
# modules, which the live file shares need (see GUEST-FACTS and hanabi_guest/shares.py).
KERNEL_META = "linux-image-amd64"


class DebError(RuntimeError):
    """apt could not resolve, download or verify a package."""


@dataclass(frozen=True)
class Deb:
    """One resolved package: candidate version, architecture and index checksum."""

    name: str
    version: str
    arch: str
    sha256: str
    depends: str

    @property
    def filename(self) -> str:
        """The file name ``apt-get download`` gives it (epoch colon quoted as %3a)."""
        return f"{self.name}_{self.version.replace(':', '%3a')}_{self.arch}.deb"


def _run(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise DebError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return proc.stdout


def has_candidate(name: str) -> bool:
    out = subprocess.run(["apt-cache", "policy", name], capture_output=True, text=True, check=False).stdout
    m = re.search(r"^\s*Candidate:\s*(\S+)", out, re.M)
    return m is not None and m.group(1) != "(none)"


def ensure_indexes() -> None:
    """Run ``apt-get update`` only if the kernel meta-package has no candidate yet."""
    if not has_candidate(KERNEL_META):
        _run(["apt-get", "update"])
        if not has_candidate(KERNEL_META):
            raise DebError(f"{KERNEL_META} has no installation candidate even after apt-get update")


def show(names: list[str]) -> dict[str, Deb]:
    """Candidate stanzas of ``names`` from ``apt-cache show --no-all-versions``."""
    out = _run(["apt-cache", "show", "--no-all-versions", *names])
    debs: dict[str, Deb] = {}
    for stanza in out.strip().split("\n\n"):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line and not line[0].isspace() and ":" in line:
                k, _, v = line.partition(":")
                fields[k] = v.strip()
        if "Package" in fields and fields["Package"] not in debs:
            debs[fields["Package"]] = Deb(fields["Package"], fields["Version"], fields.get("Architecture", "amd64"),
                                          fields.get("SHA256", ""), fields.get("Depends", ""))
    missing = [n for n in names if n not in debs]
    if missing:
        raise DebError(f"no candidate for {', '.join(missing)}")
    return debs


def resolve(names: list[str]) -> dict[str, Deb]:
    """Resolve ``names``; the kernel meta-package is replaced by its concrete image package.

    Two ``apt-cache show`` calls (each loads the package cache, ~0.5 s here); only when
    that fails is ``apt-cache policy`` consulted and, without a kernel candidate,
    ``apt-get update`` run.
    """
    try:
        found = show(names)
    except DebError:
        ensure_indexes()
        found = show(names)
    if KERNEL_META in found:
        meta = found.pop(KERNEL_META)
        m = re.search(r"(linux-image-\d[^\s,(]*-amd64)", meta.depends)
        if not m:
            raise DebError(f"cannot find the concrete kernel in {KERNEL_META} Depends: {meta.depends}")
        found.update(show([m.group(1)]))
    return found


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(debs: list[Deb], cache: str = DEFAULT_CACHE) -> dict[str, str]:
    """Make every package file present and verified in ``cache``; return name -> path."""
    os.makedirs(cache, exist_ok=True)
    paths = {d.name: os.path.join(cache, d.filename) for d in debs}
    todo = [d for d in debs if not (os.path.exists(paths[d.name]) and sha256_file(paths[d.name]) == d.sha256)]
    if todo:
        proc = subprocess.run(["apt-get", "-q", "-o", "APT::Sandbox::User=root", "download",
                               *[f"{d.name}={d.version}" for d in todo]],
                              cwd=cache, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise DebError(f"apt-get download failed: {proc.stderr.strip()[-2000:]}")
    for d in debs:
        if not os.path.exists(paths[d.name]):
            raise DebError(f"apt-get download did not produce {paths[d.name]}")
        if d.sha256 and sha256_file(paths[d.name]) != d.sha256:
            raise DebError(f"{paths[d.name]}: SHA256 does not match the apt index")
    return paths


def extract(path: str, dest: str) -> None:
    """Unpack a package's data into ``dest`` (``dpkg-deb -x``)."""
    _run(["dpkg-deb", "-x", path, dest])
