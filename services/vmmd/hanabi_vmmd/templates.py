"""The VM template store: one booted-and-saved VM per (guest image, size, backend, machine).

A template is a VM booted to agent-ready with its RAM in a file mapped shared, then stopped
and its device state saved (`qemu_snapshot`). A clone starts QEMU with the same command line,
the RAM file mapped private (copy-on-write: clones share the template's pages through the page
cache) and the device state loaded: about 0.1 s instead of a 2-3 s boot here.

On disk, under `<run_dir>/templates/` (tmpfs on a normal host: /run):
  `<key>/template.json`  the record (what it was built from, when, how long it took)
  `<key>/memory`         the guest RAM, never written after the save
  `<key>/state`          the device state
  `build/<key16>/`       a template being built (its VM's sockets and logs too); renamed to
                         `<key>` once complete, so a `<key>` directory is always whole.
  `drives/ph<N>.img`     Firecracker templates' empty placeholder drives: a snapshot names its
                         drives' paths and a clone reopens them at load (before pointing each at
                         its own), so they live where every template build puts them, shared
                         (no guest writes to a placeholder). Not tied to an image: sparse files
                         of no blocks, removed when templates are turned off.
The key is a hash of everything that must match between template and clone (`TemplateParams`).
A template is stale when the guest image or the VMM binary it was built from is no longer the
current one: it is removed when a template of the current image is looked up (or at start),
so templates go with their image. Running clones keep their private mapping of a removed
memory file (the inode lives until the last clone ends).
"""

from __future__ import annotations

import builtins
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from collections.abc import Callable
from contextlib import AbstractContextManager

from hanabi_common.errors import FailedPrecondition, HanabiError
from hanabi_common.locks import KeyedLocks
from hanabi_common.state import VersionedState, atomic_write_bytes

log = logging.getLogger("hanabi.vmmd.templates")
RECORD_NAME = "template.json"
MEMORY_NAME = "memory"
STATE_NAME = "state"
BUILD_DIR = "build"
DRIVES_DIR = "drives"
RETRY_AFTER_FAILURE_S = 60.0
MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True)
class TemplateParams:
    """Everything a clone's command line shares with its template's (pure data)."""

    backend: str
    image_id: str
    vmm_id: str
    memory_mib: int
    vcpus: int
    machine: str
    accel: str
    cmdline: str
    hotplug_slots: int
    share: bool

    def key(self) -> str:
        """The template's name: a hash of every parameter."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:32]


class TemplateRecord(VersionedState):
    """`template.json`: what a template was built from and what it cost."""

    key: str
    params: dict
    created_at: float
    boot_to_ready_s: float
    state_bytes: int


@dataclass(frozen=True)
class Template:
    """A complete template on disk."""

    key: str
    dir: Path
    record: TemplateRecord

    @property
    def memory_file(self) -> Path:
        return self.dir / MEMORY_NAME

    @property
    def state_file(self) -> Path:
        return self.dir / STATE_NAME


def image_id(guest_dir: Path, kernel: Path, initrd: Path) -> str:
    """The identity of a guest image: its manifest's inputs hash and file hashes, or (no
    manifest) the kernel's and initrd's paths, sizes and mtimes."""
    try:
        manifest = json.loads((guest_dir / MANIFEST_NAME).read_text())
        doc: object = {"inputs": manifest.get("inputs_hash"),
                       "files": {k: v.get("sha256") for k, v in sorted((manifest.get("files") or {}).items())}}
    except (OSError, ValueError, AttributeError):
        doc = None
    stats = []
    for path in (kernel, initrd):
        st = path.stat()
        stats.append([str(path.resolve()), st.st_size, st.st_mtime_ns])
    return hashlib.sha256(json.dumps({"manifest": doc, "files": stats}).encode()).hexdigest()[:32]


def vmm_id(binary: str) -> str:
    """The identity of the VMM binary (path, size, mtime): a new QEMU needs new templates."""
    path = shutil.which(binary) or binary
    try:
        st = os.stat(path)
    except OSError as exc:
        raise FailedPrecondition(f"VMM binary {binary!r}: {exc.strerror}") from None
    return f"{os.path.realpath(path)}:{st.st_size}:{st.st_mtime_ns}"


class TemplateUnsupported(FailedPrecondition):
    """The guest image cannot make templates (its agent lacks `restored`): not retried."""


# (params, build_dir) -> (boot-to-ready seconds); writes build_dir/memory and build_dir/state
Builder = Callable[[TemplateParams, Path], float]


class TemplateStore:
    """Finds, builds (once per key, under a lock) and removes templates."""

    def __init__(self, root: Path, builder: Builder) -> None:
        self.root = Path(root)
        self.builder = builder
        self._locks = KeyedLocks(timeout=None, what="template")
        self._failed: dict[str, float] = {}
        self._unsupported: dict[str, str] = {}
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)

    def _lock(self, key: str) -> AbstractContextManager[None]:
        return self._locks.hold(key)

    def get(self, params: TemplateParams) -> Template:
        """The template for `params`, built now if there is none (stale ones of the same
        backend are removed first). FailedPrecondition while a failed build waits to retry."""
        key = params.key()
        with self._lock(key):
            found = self.find(key)
            if found is not None:
                return found
            if key in self._unsupported:
                raise FailedPrecondition(self._unsupported[key])
            failed_at = self._failed.get(key)
            if failed_at is not None and time.monotonic() - failed_at < RETRY_AFTER_FAILURE_S:
                raise FailedPrecondition(f"VM template {key[:12]} failed "
                                         f"{time.monotonic() - failed_at:.0f}s ago; retried after "
                                         f"{RETRY_AFTER_FAILURE_S:.0f}s")
            self.remove_stale(params.backend, params.image_id, params.vmm_id)
            try:
                template = self._build(key, params)
            except TemplateUnsupported as exc:
                self._unsupported[key] = exc.message  # the same image will not do better
                raise
            except BaseException:
                self._failed[key] = time.monotonic()
                raise
            self._failed.pop(key, None)
            return template

    def find(self, key: str) -> Template | None:
        """The complete template named `key`, if there is one."""
        path = self.root / key
        try:
            record = TemplateRecord.model_validate_json((path / RECORD_NAME).read_bytes())
        except (OSError, ValueError):
            return None
        template = Template(key=key, dir=path, record=record)
        if not (template.memory_file.is_file() and template.state_file.is_file()):
            return None
        return template

    def list(self) -> list[Template]:
        """Every complete template."""
        found = []
        for entry in sorted(self.root.iterdir()) if self.root.is_dir() else []:
            if entry.name not in (BUILD_DIR, DRIVES_DIR) and (template := self.find(entry.name)) is not None:
                found.append(template)
        return found

    def remove_stale(self, backend: str, image: str, vmm: str) -> builtins.list[str]:
        """Remove the templates of `backend` built from another image or VMM binary, and
        incomplete directories; the keys removed."""
        removed = []
        for entry in sorted(self.root.iterdir()):
            if entry.name in (BUILD_DIR, DRIVES_DIR) or not entry.is_dir():
                continue
            template = self.find(entry.name)
            if template is not None:
                params = template.record.params
                if params.get("backend") != backend or (params.get("image_id"), params.get("vmm_id")) == (image, vmm):
                    continue
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry.name)
            log.info("removed a stale vm template", extra={"template": entry.name})
        return removed

    def discard(self, key: str) -> None:
        """Remove one template (a clone of it did not start): rebuilt at a use after
        RETRY_AFTER_FAILURE_S, so a clone that keeps failing does not cost a boot each time."""
        with self._lock(key):
            shutil.rmtree(self.root / key, ignore_errors=True)
            self._failed[key] = time.monotonic()

    def remove_all(self) -> None:
        """Remove every template (templates turned off), and the placeholders they named."""
        for template in self.list():
            shutil.rmtree(template.dir, ignore_errors=True)
        shutil.rmtree(self.root / DRIVES_DIR, ignore_errors=True)

    def build_dir(self, key: str) -> Path:
        """Where the template `key` is built (short: its VM's sockets live there)."""
        return self.root / BUILD_DIR / key[:16]

    def _build(self, key: str, params: TemplateParams) -> Template:
        build = self.build_dir(key)
        shutil.rmtree(build, ignore_errors=True)
        build.mkdir(mode=0o700, parents=True)
        began = time.monotonic()
        try:
            ready_s = self.builder(params, build)
            record = TemplateRecord(key=key, params=asdict(params), created_at=time.time(),
                                    boot_to_ready_s=round(ready_s, 3),
                                    state_bytes=(build / STATE_NAME).stat().st_size)
            for leftover in build.iterdir():  # sockets, logs, the template's share root
                if leftover.name not in (MEMORY_NAME, STATE_NAME):
                    shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
            atomic_write_bytes(build / RECORD_NAME, record.model_dump_json().encode())
            final = self.root / key
            shutil.rmtree(final, ignore_errors=True)
            os.rename(build, final)
        except BaseException as exc:
            shutil.rmtree(build, ignore_errors=True)
            if isinstance(exc, HanabiError):
                log.warning("vm template build failed", extra={"template": key[:12], "error": exc.message})
            raise
        log.info("vm template built", extra={"template": key[:12], "boot_to_ready_s": round(ready_s, 2),
                                             "state_bytes": record.state_bytes,
                                             "ms": round((time.monotonic() - began) * 1000, 1)})
        found = self.find(key)
        assert found is not None
        return found
