"""Register hanabi as Docker runtimes in a daemon.json (`hanabi-runtime install-docker`).

Docker picks OCI runtimes by name from the "runtimes" object of `/etc/docker/daemon.json`:

    {"runtimes": {"hanabi": {"path": "/usr/bin/hanabi-runtime",
                             "runtimeArgs": ["--hypervisor", "auto"]}}}

Three entries are managed here, the runtimeArgs choosing the hypervisor: `hanabi` (auto),
`hanabi-qemu` and `hanabi-fc` (Firecracker); with a config path, `--config PATH` follows.
Everything else in daemon.json is kept as it is (key order included; the file is rewritten
with an indent of 2 and a trailing newline). `add_runtimes`/`remove_runtimes` are pure; `install`
and `uninstall` read and write the file atomically. dockerd reloads its runtimes on SIGHUP.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from hanabi_common.errors import FailedPrecondition, InvalidArgument

DEFAULT_DAEMON_JSON = Path("/etc/docker/daemon.json")
HYPERVISOR_OF: dict[str, str] = {"hanabi": "auto", "hanabi-qemu": "qemu", "hanabi-fc": "firecracker"}
RUNTIME_NAMES: tuple[str, ...] = tuple(HYPERVISOR_OF)
RELOAD_HINT = "reload dockerd to apply it: `systemctl reload docker` or `kill -HUP $(pidof dockerd)`"
NEW_FILE_MODE = 0o644


@dataclass(frozen=True)
class InstallResult:
    """What `install`/`uninstall` did to a daemon.json."""

    path: Path
    changed: bool
    created: bool = False

    @property
    def reload_needed(self) -> bool:
        """dockerd only sees the new runtimes after a reload (SIGHUP) or a restart."""
        return self.changed


def runtime_entries(runtime_path: str, config_path: str | None = None) -> dict[str, dict]:
    """The three runtime entries, by name, as daemon.json spells them."""
    if not isinstance(runtime_path, str) or not runtime_path.strip():
        raise InvalidArgument("the hanabi-runtime path must be a non-empty string")
    if config_path is not None and (not isinstance(config_path, str) or not config_path.strip()):
        raise InvalidArgument("the hanabi config path, when given, must be a non-empty string")
    entries = {}
    for name, hypervisor in HYPERVISOR_OF.items():
        args = ["--hypervisor", hypervisor]
        if config_path is not None:
            args += ["--config", config_path]
        entries[name] = {"path": runtime_path, "runtimeArgs": args}
    return entries


def _runtimes_of(doc: object) -> dict | None:
    """The "runtimes" object of a daemon.json document (None when absent); refuses bad shapes."""
    if not isinstance(doc, dict):
        raise InvalidArgument(f"daemon.json must hold a JSON object, not {type(doc).__name__}")
    runtimes = doc.get("runtimes")
    if runtimes is not None and not isinstance(runtimes, dict):
        raise InvalidArgument(f'"runtimes" in daemon.json must be an object, not {type(runtimes).__name__}')
    return runtimes


def add_runtimes(doc: dict, runtime_path: str, config_path: str | None = None) -> dict:
    """A copy of `doc` with the hanabi runtimes added (or replaced); nothing else changes."""
    runtimes = _runtimes_of(doc)
    result = copy.deepcopy(doc)
    merged = copy.deepcopy(runtimes) if runtimes is not None else {}
    merged.update(runtime_entries(runtime_path, config_path))
    result["runtimes"] = merged
    return result


def remove_runtimes(doc: dict) -> dict:
    """A copy of `doc` without the hanabi runtimes; "runtimes" goes too if nothing is left in it.

    Refuses (FailedPrecondition) while "default-runtime" names one of them: dockerd would not
    start with a default runtime that does not exist.
    """
    runtimes = _runtimes_of(doc)
    default = doc.get("default-runtime")
    if default in RUNTIME_NAMES and runtimes is not None and default in runtimes:
        raise FailedPrecondition(f'daemon.json makes {default!r} the "default-runtime": change that first '
                                 "(dockerd would not start without it)")
    result = copy.deepcopy(doc)
    if runtimes is None:
        return result
    kept = {name: entry for name, entry in result["runtimes"].items() if name not in RUNTIME_NAMES}
    if kept:
        result["runtimes"] = kept
    else:
        del result["runtimes"]
    return result


def parse_daemon_json(text: str) -> dict:
    """Parse daemon.json text; an empty file is an empty object."""
    if not text.strip():
        return {}
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise InvalidArgument(f"daemon.json is not valid JSON: {exc}") from None
    _runtimes_of(doc)
    return doc


def render_daemon_json(doc: dict) -> bytes:
    """The bytes written back: indent 2, keys in their order, a trailing newline."""
    return (json.dumps(doc, indent=2) + "\n").encode()


def default_runtime_path() -> str:
    """The hanabi-runtime next to this Python (the venv's), else the one on PATH."""
    beside = Path(sys.executable).parent / "hanabi-runtime"
    if beside.exists():
        return str(beside)
    found = shutil.which("hanabi-runtime")
    if found:
        return os.path.abspath(found)
    raise FailedPrecondition("hanabi-runtime is not on PATH: pass --runtime-path")


def _read(path: Path) -> tuple[dict, bool, int]:
    """The document, whether the file existed, and its mode."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}, False, NEW_FILE_MODE
    except OSError as exc:
        raise FailedPrecondition(f"cannot read {path}: {exc.strerror}") from None
    return parse_daemon_json(text), True, path.stat().st_mode & 0o7777


def _write(path: Path, doc: dict, mode: int) -> None:
    from hanabi_common.state import atomic_write_bytes
    try:
        atomic_write_bytes(path, render_daemon_json(doc), mode=mode)
    except OSError as exc:
        raise FailedPrecondition(f"cannot write {path}: {exc.strerror}") from None


def install(path: Path = DEFAULT_DAEMON_JSON, runtime_path: str | None = None,
            config_path: str | None = None) -> InstallResult:
    """Add the hanabi runtimes to the daemon.json at `path` (created if missing)."""
    path = Path(path)
    runtime_path = runtime_path or default_runtime_path()
    if config_path is not None:
        config_path = os.path.abspath(config_path)  # dockerd runs the runtime from elsewhere
    doc, existed, mode = _read(path)
    updated = add_runtimes(doc, runtime_path, config_path)
    if existed and updated == doc:
        return InstallResult(path=path, changed=False)
    _write(path, updated, mode)
    return InstallResult(path=path, changed=True, created=not existed)


def uninstall(path: Path = DEFAULT_DAEMON_JSON) -> InstallResult:
    """Remove the hanabi runtimes from the daemon.json at `path` (a missing file is left missing)."""
    path = Path(path)
    doc, existed, mode = _read(path)
    if not existed:
        return InstallResult(path=path, changed=False)
    updated = remove_runtimes(doc)
    if updated == doc:
        return InstallResult(path=path, changed=False)
    _write(path, updated, mode)
    return InstallResult(path=path, changed=True)


def describe(result: InstallResult, action: str) -> str:
    """A human line for the CLI: what happened, and the reload hint when one is needed."""
    if not result.changed:
        return f"{result.path}: hanabi runtimes already {action}; nothing to do"
    made = " (created)" if result.created else ""
    names = ", ".join(RUNTIME_NAMES)
    return f"{result.path}{made}: runtimes {names} {action}\n{RELOAD_HINT}"
