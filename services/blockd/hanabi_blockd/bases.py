"""Base volumes: one read-only raw ext4 image per image key, shared by that image's containers.

Layout under `<volume_dir>/bases/`: `<key>.raw` (mode 0444 once complete) and `<key>.json`
(its metadata: what it was built from, sizes, last use). A base is built as
`<key>.raw.partial`, its metadata written, then renamed into place: a `.raw` file is always
complete, and a crash leaves only a `.partial` (removed at start-up) or a metadata file
without image (dropped when found). Nothing here decides *when* to collect: see gc.py and
the service.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from collections.abc import Callable
from contextlib import AbstractContextManager

from hanabi_blockd.gc import BaseUsage
from hanabi_common.locks import KeyedLocks
from hanabi_common.state import VersionedState, atomic_write_bytes

log = logging.getLogger("hanabi.blockd.bases")
PARTIAL = ".partial"


class BaseMeta(VersionedState):
    """What `<key>.json` records of one base."""

    key: str
    kind: str
    detail: str
    source: str
    size_bytes: int
    created_at: float
    last_used: float


def allocated_bytes(path: Path) -> int:
    """Bytes a file really occupies on disk (sparse files count only what is written)."""
    try:
        return os.stat(path).st_blocks * 512
    except FileNotFoundError:
        return 0


class BaseStore:
    """The base images under one directory."""

    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # there from the start, like the volumes
        self._guard = threading.Lock()
        self._locks = KeyedLocks(timeout=None, what="base")

    def path(self, key: str) -> Path:
        """The image file of `key`."""
        return self.dir / f"{key}.raw"

    def _meta_path(self, key: str) -> Path:
        return self.dir / f"{key}.json"

    def key_lock(self, key: str) -> AbstractContextManager[None]:
        """Hold the lock serialising the build and removal of one base."""
        return self._locks.hold(key)

    def get(self, key: str) -> BaseMeta | None:
        """The base of `key` if it is complete and its image is present."""
        try:
            meta = BaseMeta.model_validate_json(self._meta_path(key).read_bytes())
        except (FileNotFoundError, ValueError):
            return None
        if not self.path(key).is_file():
            log.warning("a base vanished: its image file is gone, dropping the record",
                        extra={"key": key, "path": str(self.path(key))})
            self._meta_path(key).unlink(missing_ok=True)
            return None
        return meta

    def obtain(self, key: str, kind: str, detail: str, source: str,
               build: Callable[[Path], int]) -> tuple[BaseMeta, bool]:
        """The base of `key`, built with `build(partial_path) -> size` if missing; returns
        (meta, built). Concurrent callers for one key build it once."""
        with self.key_lock(key):
            meta = self.get(key)
            if meta is not None:
                return self.touch(meta), False
            self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            final = self.path(key)
            partial = final.with_name(final.name + PARTIAL)
            try:
                size = build(partial)
                os.chmod(partial, 0o444)
                now = time.time()
                meta = BaseMeta(key=key, kind=kind, detail=detail, source=source[:4096],
                                size_bytes=size, created_at=now, last_used=now)
                atomic_write_bytes(self._meta_path(key), meta.model_dump_json().encode())
                os.replace(partial, final)
            except BaseException:
                partial.unlink(missing_ok=True)
                self._meta_path(key).unlink(missing_ok=True)
                raise
            return meta, True

    def touch(self, meta: BaseMeta) -> BaseMeta:
        """Record a use of the base now."""
        meta = meta.model_copy(update={"last_used": time.time()})
        try:
            atomic_write_bytes(self._meta_path(meta.key), meta.model_dump_json().encode())
        except OSError as exc:  # a full disk must not fail a provisioning that needs no space
            log.warning("could not record a base's use", extra={"key": meta.key, "error": str(exc)})
        return meta

    def remove(self, key: str, unless: Callable[[], bool] | None = None) -> bool:
        """Remove a base (image, then record); True if its image existed. `unless`, asked
        under the key's lock, can still veto it (a provisioning started to use the base)."""
        with self.key_lock(key):
            if unless is not None and unless():
                return False
            existed = self.path(key).exists()
            self.path(key).unlink(missing_ok=True)
            self._meta_path(key).unlink(missing_ok=True)
            return existed

    def all(self) -> list[BaseMeta]:
        """Every complete base."""
        if not self.dir.is_dir():
            return []
        found = []
        for meta_path in sorted(self.dir.glob("*.json")):
            meta = self.get(meta_path.stem)
            if meta is not None:
                found.append(meta)
        return found

    def usage(self) -> list[BaseUsage]:
        """What the collector needs, for every base."""
        return [BaseUsage(key=m.key, bytes=allocated_bytes(self.path(m.key)), last_used=m.last_used)
                for m in self.all()]

    def clean(self) -> list[Path]:
        """Remove what a crash can leave: partial images, temp records, images without a
        record, records without an image. Returns what was removed."""
        if not self.dir.is_dir():
            return []
        removed = []
        for leftover in list(self.dir.glob(f"*{PARTIAL}")) + list(self.dir.glob(".*.json.*")):
            leftover.unlink(missing_ok=True)
            removed.append(leftover)
        for image in self.dir.glob("*.raw"):
            if not self._meta_path(image.stem).exists():
                image.unlink(missing_ok=True)
                removed.append(image)
        for meta_path in self.dir.glob("*.json"):
            if not self.path(meta_path.stem).exists():
                meta_path.unlink(missing_ok=True)
                removed.append(meta_path)
        return removed
