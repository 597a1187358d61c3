"""Per-sandbox state files: one JSON file per owner, schema-versioned, written atomically.

Layout: `<run_dir>/sbs/<sandbox id>/<name>.json`, where each daemon owns its own name
(vmmd: hypervisor.json, agentd: agent.json, blockd: devices.json, netd: network.json,
the runtime: state.json). Writes go to a temp file, are fsynced, renamed over the target,
and the directory is fsynced, so a crash leaves either the old or the new file.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from hanabi_common.atomic import write_atomic
from hanabi_common.errors import FailedPrecondition, Internal
from hanabi_common.ids import is_valid_id, validate_id


class VersionedState(BaseModel):
    """Base of every state file model: carries the schema version it was written with."""

    model_config = ConfigDict(extra="forbid")
    SCHEMA_VERSION: ClassVar[int] = 1
    schema_version: int = 1


S = TypeVar("S", bound=VersionedState)


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write `data` to `path` atomically, making its directory (hanabi_common.atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, data, mode)


class StateStore:
    """Reads and writes the state files of sandboxes under one run directory."""

    def __init__(self, sandboxes_dir: Path) -> None:
        self.root = Path(sandboxes_dir)

    def sandbox_dir(self, sandbox_id: str) -> Path:
        """The directory of one sandbox (the id is validated first)."""
        return self.root / validate_id(sandbox_id, "sandbox id")

    def path(self, sandbox_id: str, name: str) -> Path:
        """The path of one state file."""
        return self.sandbox_dir(sandbox_id) / f"{name}.json"

    def write(self, sandbox_id: str, name: str, state: VersionedState) -> Path:
        """Atomically write one state file, creating the sandbox directory (0700)."""
        directory = self.sandbox_dir(sandbox_id)
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        target = directory / f"{name}.json"
        payload = state.model_copy(update={"schema_version": state.SCHEMA_VERSION})
        atomic_write_bytes(target, payload.model_dump_json(indent=1).encode())
        return target

    def read(self, sandbox_id: str, name: str, model: type[S]) -> S | None:
        """Read one state file; None when absent; FailedPrecondition on a version mismatch."""
        target = self.path(sandbox_id, name)
        try:
            raw = target.read_bytes()
        except FileNotFoundError:
            return None
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise Internal(f"state file {target} is corrupt: {exc}") from None
        version = data.get("schema_version") if isinstance(data, dict) else None
        if version != model.SCHEMA_VERSION:
            raise FailedPrecondition(
                f"state file {target} has schema version {version!r}, "
                f"this hanabi reads version {model.SCHEMA_VERSION}"
            )
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            raise Internal(f"state file {target} does not match its schema: {exc}") from None

    def remove(self, sandbox_id: str, name: str) -> None:
        """Remove one state file, then the sandbox directory if nothing else is left."""
        self.path(sandbox_id, name).unlink(missing_ok=True)
        self.remove_dir_if_empty(sandbox_id)

    def remove_dir_if_empty(self, sandbox_id: str) -> bool:
        """Remove the sandbox directory when it is empty; True if it is gone."""
        directory = self.sandbox_dir(sandbox_id)
        try:
            directory.rmdir()
        except FileNotFoundError:
            return True
        except OSError:
            return False
        return True

    def purge(self, sandbox_id: str) -> None:
        """Remove the whole sandbox directory, whatever is in it."""
        shutil.rmtree(self.sandbox_dir(sandbox_id), ignore_errors=True)

    def list_sandboxes(self, having: str | None = None) -> list[str]:
        """The ids of the sandboxes with a directory (and, if given, that state file)."""
        if not self.root.is_dir():
            return []
        result = []
        for entry in sorted(self.root.iterdir()):
            if entry.is_dir() and is_valid_id(entry.name):
                if having is None or (entry / f"{having}.json").exists():
                    result.append(entry.name)
        return result
