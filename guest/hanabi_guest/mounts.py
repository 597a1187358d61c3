"""Container mounts in the guest: binds from the binds disk, and tmpfs (stdlib only).

The host copies each bind mount's source onto a small second disk (one entry per mount,
named m0, m1, ...); the agent mounts that disk and bind-mounts the entries into the
container's root. tmpfs mounts are made here. Everything in a request is validated before
any path is built from it.
"""

from __future__ import annotations

import os
import re

from hanabi_wire.constants import E_INVALID_ARGUMENT

from .core import AgentError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any
    from collections.abc import Callable

    from .sandbox import Rootfs

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC = 32, 4096, 16384
FLAG_OPTIONS = {"ro": MS_RDONLY, "nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC,
                "rw": 0, "bind": 0, "rbind": MS_REC}
TMPFS_DATA = re.compile(r"^(size=[0-9]+[kmg%]?|mode=[0-7]{3,4}|nr_inodes=[0-9]+[kmg]?|uid=[0-9]+|gid=[0-9]+)$")
SOURCE_RE = re.compile(r"^m[0-9]{1,4}$")
MAX_MOUNTS = 256


def _destination(value: object) -> str:
    if not isinstance(value, str) or not value.startswith("/") or len(value) > 4096 or "\0" in value:
        raise AgentError(E_INVALID_ARGUMENT, "mount destination must be an absolute path")
    parts = value.split("/")
    if ".." in parts:
        raise AgentError(E_INVALID_ARGUMENT, f"mount destination {value!r} must not contain '..'")
    return os.path.normpath(value)


def check_mounts(value: object) -> list[dict[str, Any]]:
    """Validate the ``mounts`` field of create_container (absent: no mounts)."""
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > MAX_MOUNTS:
        raise AgentError(E_INVALID_ARGUMENT, f"'mounts' must be a list of at most {MAX_MOUNTS}")
    checked = []
    for item in value:
        if not isinstance(item, dict):
            raise AgentError(E_INVALID_ARGUMENT, "each mount must be an object")
        kind = item.get("type")
        options = item.get("options") or []
        if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
            raise AgentError(E_INVALID_ARGUMENT, "mount options must be a list of strings")
        if kind == "bind":
            source = item.get("source")
            if not isinstance(source, str) or not SOURCE_RE.fullmatch(source):
                raise AgentError(E_INVALID_ARGUMENT, "bind mount source must name an entry like m0")
            bad = [o for o in options if o not in FLAG_OPTIONS]
        elif kind == "tmpfs":
            source = None
            bad = [o for o in options if o not in FLAG_OPTIONS and not TMPFS_DATA.fullmatch(o)]
        else:
            raise AgentError(E_INVALID_ARGUMENT, f"mount type {kind!r} is not bind or tmpfs")
        if bad:
            raise AgentError(E_INVALID_ARGUMENT, f"unsupported mount options {bad}")
        checked.append({"destination": _destination(item.get("destination")), "type": kind,
                        "source": source, "options": options})
    return checked


def tmpfs_in_user_namespace(mounts: list[dict[str, Any]], uid_map: list[tuple[int, int, int]],
                            gid_map: list[tuple[int, int, int]]) -> list[dict[str, Any]]:
    """The tmpfs mounts of a container with a user namespace as runc makes them there: its
    ``uid=``/``gid=`` options are ids of the namespace (the ids outside are written), and
    without them the tmpfs belongs to the container's root (runc mounts it as that root)."""
    from hanabi_wire.ocispec.linux import host_id

    out = []
    for spec in mounts:
        if spec["type"] != "tmpfs":
            out.append(spec)
            continue
        options, seen = [], set()
        for o in spec["options"]:
            key, _, value = o.partition("=")
            if key in ("uid", "gid") and value.isdigit():
                outside = host_id(int(value), uid_map if key == "uid" else gid_map)
                if outside is None:
                    raise AgentError(E_INVALID_ARGUMENT, f"mount {spec['destination']!r}: option {o} names "
                                     f"a {key} that linux.{key}Mappings does not map")
                o = f"{key}={outside}"
                seen.add(key)
            options.append(o)
        for key, maps in (("uid", uid_map), ("gid", gid_map)):
            if key not in seen:
                options.append(f"{key}={host_id(0, maps)}")
        out.append({**spec, "options": options})
    return out


def _flags(options: list[str]) -> int:
    flags = 0
    for option in options:
        flags |= FLAG_OPTIONS.get(option, 0)
    return flags


def make_mounts(root: Rootfs, binds_dir: str | None, mounts: list[dict[str, Any]],
                mount: Callable[..., None]) -> None:
    """Make every mount under ``root`` in order, recording each in ``root.mounts``."""
    for spec in mounts:
        target = os.path.join(root.path, spec["destination"].lstrip("/"))
        flags = _flags(spec["options"])
        if spec["type"] == "bind":
            if binds_dir is None:
                raise AgentError(E_INVALID_ARGUMENT, "bind mounts need a mounts_disk")
            source = os.path.join(binds_dir, spec["source"])
            _mountpoint(target, directory=os.path.isdir(source))
            mount(source, target, "", MS_BIND | (flags & MS_REC))
            root.mounts.append(target)
            extra = flags & (MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
            if extra:
                mount("", target, "", MS_BIND | MS_REMOUNT | extra)
        else:
            data = ",".join(o for o in spec["options"] if TMPFS_DATA.fullmatch(o))
            _mountpoint(target, directory=True)
            mount("tmpfs", target, "tmpfs", flags & ~MS_REC, data)
            root.mounts.append(target)


def _mountpoint(target: str, directory: bool) -> None:
    if directory:
        os.makedirs(target, mode=0o755, exist_ok=True)
        return
    os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
    if not os.path.exists(target):
        with open(target, "a"):
            pass
