"""Root layers kept between a Docker container's stop and its next start.

With runc, what a container writes to its root filesystem lands in Docker's upper
directory and is there again after `docker stop` / `docker start`. Here the writes land
in the container's copy-on-write layer inside the VM, and `docker stop` deletes the task
(runtime `delete`, blockd `release`). So when the rootfs is Docker's overlay2 layout
(`<layer dir>/merged`, next to `<layer dir>/diff`), release keeps the layer in
`<volume_dir>/kept/` instead of deleting it, and the next provisioning of the same
container (same id, same base) takes it back. The layer dir is the anchor: once Docker
removes it (`docker rm`), the kept layer goes too (`sweep`, run by blockd every few
seconds and at start). A kept layer holds its base: the collector never removes it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger("hanabi.blockd.kept")


@dataclass(frozen=True)
class KeptLayer:
    """A root layer waiting for its container to start again."""

    sandbox_id: str
    base_key: str
    format: str
    size_bytes: int
    anchor: str
    kept_at: float


def anchor_of(rootfs: str) -> Path | None:
    """Docker's layer directory of an overlay2 rootfs (`.../<id>/merged` beside `diff`),
    or None for any other rootfs (nothing is kept for those)."""
    path = Path(rootfs)
    if path.name == "merged" and (path.parent / "diff").is_dir():
        return path.parent
    return None


class KeptLayers:
    """The kept/ directory: one `<sid>.<fmt>` layer and `<sid>.json` record per container."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)

    def _record(self, sandbox_id: str) -> Path:
        return self.directory / f"{sandbox_id}.json"

    def _layer(self, kept: KeptLayer) -> Path:
        return self.directory / f"{kept.sandbox_id}.{kept.format}"

    def keep(self, sandbox_id: str, layer: Path, base_key: str, fmt: str, size_bytes: int, anchor: Path) -> None:
        """Move a released layer here (record first: a crash leaves a record, not a stray file)."""
        kept = KeptLayer(sandbox_id, base_key, fmt, size_bytes, str(anchor), time.time())
        self._record(sandbox_id).write_text(json.dumps(asdict(kept)))
        os.replace(layer, self._layer(kept))
        log.info("root layer kept for the next start", extra={"sandbox": sandbox_id, "anchor": str(anchor)})

    def all(self) -> list[KeptLayer]:
        """Every kept layer with a readable record."""
        found = []
        for record in sorted(self.directory.glob("*.json")):
            try:
                found.append(KeptLayer(**json.loads(record.read_text())))
            except (OSError, ValueError, TypeError):
                record.unlink(missing_ok=True)
        return found

    def take(self, sandbox_id: str, base_key: str, fmt: str, target: Path) -> bool:
        """Move the kept layer of `sandbox_id` to `target` if it is over the same base and
        in the format asked for; a kept layer that does not fit is dropped. True if taken."""
        kept = next((k for k in self.all() if k.sandbox_id == sandbox_id), None)
        if kept is None:
            return False
        if kept.base_key != base_key or kept.format != fmt or not self._layer(kept).exists():
            self.drop(kept)
            return False
        os.replace(self._layer(kept), target)
        self._record(sandbox_id).unlink(missing_ok=True)
        log.info("kept root layer taken back", extra={"sandbox": sandbox_id})
        return True

    def drop(self, kept: KeptLayer) -> None:
        """Delete a kept layer and its record."""
        self._layer(kept).unlink(missing_ok=True)
        self._record(kept.sandbox_id).unlink(missing_ok=True)

    def sweep(self) -> list[str]:
        """Drop the kept layers whose container Docker removed; their sandbox ids. Layer
        files without a record (a crash mid-keep) go too."""
        dropped = []
        for kept in self.all():
            if not Path(kept.anchor).is_dir():
                self.drop(kept)
                dropped.append(kept.sandbox_id)
        recorded = {self._layer(k).name for k in self.all()}
        for stray in self.directory.iterdir():
            if stray.suffix != ".json" and stray.name not in recorded:
                stray.unlink(missing_ok=True)
        if dropped:
            log.info("kept root layers dropped: their containers are gone", extra={"sandboxes": dropped})
        return dropped

    def base_keys(self) -> set[str]:
        """The bases the kept layers stand on (never to be collected)."""
        return {k.base_key for k in self.all()}
