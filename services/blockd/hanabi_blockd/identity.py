"""Which image a bundle's rootfs holds: the key under which its base volume is shared.

Two kinds of key, both meaning "a base built from this rootfs directory now would be
byte-for-byte equivalent to the one already stored under the key":

* `ovl-…` for an overlayfs rootfs (Docker's overlay2) whose upper layer is empty. The
  merged view is then exactly: Docker's init layer over the image layers. The image layers
  are named by the lowerdir chain (each a layer directory, resolved through Docker's `l/`
  short links; layers are immutable once committed). Docker's init layer, the first lowerdir
  ending in `-init/diff`, is per container, so its *path* is left out of the key; its
  *content* (the skeleton /etc/hosts, /etc/hostname, /etc/resolv.conf, /.dockerenv, /dev
  and /proc mount points: the same for every container) goes in as a digest of paths,
  modes, owners, symlink targets and file contents (timestamps excluded). So two
  containers of one image share a base even though each has its own init layer, and a
  changed init layer gives another key, never a wrong base. The base is built from the
  merged rootfs itself; the real /etc/hosts etc. arrive later as bind mounts on the binds disk.
* `cnt-…`, a content key, for everything else: a plain directory (demo bundles, vfs,
  unpacked images), an overlay without an upper dir we can read, and an overlay whose upper
  layer is *not* empty (`docker cp` before start, a restarted container): there the merged
  view differs from the image, so the key is taken from the merged tree itself. The key
  hashes the sorted listing (path, mode, uid, gid, size, mtime_ns, ctime_ns, symlink
  target). ctime cannot be set from user space, so any change to a file's data or metadata
  after a base was built changes the key: a stale base is never reused. The price: a copy
  of the same tree elsewhere has other ctimes and gets a base of its own (no sharing, still
  correct), and a content-keyed base of a per-container tree is used once, then collected.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable, Iterable

from hanabi_blockd.mountinfo import MountEntry, mount_at

INIT_SUFFIX = "-init/diff"


@dataclass(frozen=True)
class OverlayLayers:
    """The layers of one overlayfs mount, top first."""

    layers: tuple[str, ...]
    init_layer: str | None
    upperdir: str | None


@dataclass(frozen=True)
class Identity:
    """The image key of a rootfs and how it was found."""

    key: str
    kind: str  # "overlay-layers" | "content"
    detail: str


def _split_unescaped(value: str, sep: str) -> list[str]:
    return [p.replace("\\" + sep, sep) for p in re.split(rf"(?<!\\){re.escape(sep)}", value) if p]


def overlay_layers(entry: MountEntry, resolve: Callable[[str], str] = lambda p: p) -> OverlayLayers:
    """The lowerdir chain of an overlay mount, with Docker's init layer told apart.

    Docker mounts with relative lowerdirs (`l/ABC…`, relative to the overlay2 root, which
    is the grandparent of upperdir=<root>/<id>/diff); `resolve` turns a path into the real
    layer directory (realpath; identity in tests). `lowerdir+=` options (the new mount API)
    are accepted too.
    """
    upper = entry.super_option("upperdir")
    lowers: list[str] = []
    for part in re.split(r"(?<!\\),", entry.super_options):
        key, _, value = part.partition("=")
        if key == "lowerdir":
            lowers += _split_unescaped(value.replace("\\,", ","), ":")
        elif key == "lowerdir+":
            lowers.append(value.replace("\\,", ","))
    base = os.path.dirname(os.path.dirname(upper)) if upper else None
    resolved = [resolve(p if os.path.isabs(p) or base is None else os.path.join(base, p)) for p in lowers]
    init = None
    if resolved and resolved[0].rstrip("/").endswith(INIT_SUFFIX):
        init = resolved.pop(0)
    return OverlayLayers(layers=tuple(resolved), init_layer=init, upperdir=upper)


def overlay_key(layers: Iterable[str], init_digest: str) -> str:
    """The key of an image given by its layer directories (top first) and init-layer digest."""
    h = hashlib.sha256(b"hanabi-overlay-v1\n")
    for layer in layers:
        h.update(layer.encode("utf-8", "surrogateescape") + b"\n")
    h.update(b"init:" + init_digest.encode())
    return "ovl-" + h.hexdigest()[:32]


def content_key(records: Iterable[tuple]) -> str:
    """The key of a tree given its listing records (any order: they are sorted here)."""
    h = hashlib.sha256(b"hanabi-content-v1\n")
    for record in sorted(records):
        h.update(repr(record).encode("utf-8", "surrogateescape") + b"\n")
    return "cnt-" + h.hexdigest()[:32]


def listing(root: Path, contents: bool = False) -> list[tuple]:
    """(path, mode, uid, gid, size, mtime_ns, ctime_ns, link) for every entry below `root`;
    with `contents`, timestamps are replaced by a digest of each regular file's data."""
    records: list[tuple] = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            try:
                st = os.lstat(full)
            except FileNotFoundError:
                continue
            rel = os.path.relpath(full, root)
            link = os.readlink(full) if stat.S_ISLNK(st.st_mode) else ""
            if contents:
                data = _file_digest(full) if stat.S_ISREG(st.st_mode) else ""
                records.append((rel, st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_rdev, link, data))
            else:
                records.append((rel, st.st_mode, st.st_uid, st.st_gid, st.st_size,
                                st.st_mtime_ns, st.st_ctime_ns, link))
    return records


def _file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _is_empty_dir(path: str) -> bool:
    try:
        with os.scandir(path) as it:
            return next(it, None) is None
    except OSError:
        return False  # unreadable: treat as changed, fall back to the content key


def identify(rootfs: Path, entries: list[MountEntry]) -> Identity:
    """The image key of `rootfs` (a directory), from its mount and, if need be, its content."""
    real = os.path.realpath(rootfs)
    mount = mount_at(real, entries)
    if mount is not None and mount.fstype == "overlay" and mount.root == "/":
        layers = overlay_layers(mount, os.path.realpath)
        if layers.layers and (layers.upperdir is None or _is_empty_dir(layers.upperdir)):
            init_digest = content_key(listing(Path(layers.init_layer), contents=True)) if layers.init_layer else "none"
            return Identity(key=overlay_key(layers.layers, init_digest), kind="overlay-layers",
                            detail=f"{len(layers.layers)} layers" + (", init layer" if layers.init_layer else ""))
        why = "overlay with changes in its upper layer"
    else:
        why = "plain directory" if mount is None else f"{mount.fstype} mount"
    return Identity(key=content_key(listing(Path(real))), kind="content", detail=why)
