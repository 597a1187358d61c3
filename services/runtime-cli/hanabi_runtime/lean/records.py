"""The lean paths' view of the config file and of state.json, as plain dicts.

The checks are done by hand, and only as far as they can be done exactly: whatever they
cannot vouch for raises `Fallback`, and the full CLI (pydantic models) does the command
instead, with its own messages. The config file is the full CLI's to validate: each time
its models accept one, it records the file's exact text in `<run_dir>/CONFIG_STAMP`; a hot
path reads a config file only when its text is recorded there (else: Fallback, and the full
CLI refuses it in its words or records it), so an invalid setting is never passed over. The field lists
and defaults mirror `hanabi_common.config`,
`hanabi_common.state`, `RuntimeState` and `ExecRecord`; tests/unit/test_runtime_lean.py
pins them to those definitions.
"""

from __future__ import annotations

import json
import os

from hanabi_common.atomic import write_atomic
from hanabi_common.errors import FailedPrecondition, Internal, InvalidArgument, NotFound

# hanabi_common.config
DEFAULT_CONFIG_PATH = "/etc/hanabi/hanabi.toml"
CONFIG_ENV = "HANABI_CONFIG"
CONFIG_SECTIONS = ("vmm", "agent", "block", "rpc", "metrics")
CONFIG_KEYS = ("run_dir", "log_dir", "log_level", "source") + CONFIG_SECTIONS
DEFAULTS = {"run_dir": "/run/hanabi", "rpc.default_timeout_s": 30.0,
            "agent.request_timeout_s": 30.0, "vmm.stop_timeout_s": 5.0}
# hanabi_common.state.VersionedState.SCHEMA_VERSION
SCHEMA_VERSION = 1
_NUMBER = (int, float)
# RuntimeState: field -> (accepted types, default; REQUIRED if none)
REQUIRED = object()
RUNTIME_STATE = {
    "schema_version": ((int,), 1), "id": ((str,), REQUIRED), "bundle": ((str,), REQUIRED),
    "rootfs": ((str,), REQUIRED), "created_at": (_NUMBER, REQUIRED),
    "standin_pid": ((int, type(None)), None), "standin_start_time": ((int, type(None)), None),
    "started": ((bool,), False), "paused": ((bool,), False), "annotations": ((dict,), {}),
    "root": ((str, type(None)), None), "timings": ((dict,), {}), "cgroups": ((list,), []),
    "oci_version": ((str,), "1.0.2"), "hooks": ((dict,), {}), "sandbox": ((str, type(None)), None),
}
EXEC_RECORD = {"schema_version": ((int,), 1), "exec_id": ((str,), REQUIRED), "args": ((list,), REQUIRED),
               "standin_pid": ((int,), REQUIRED), "standin_start_time": ((int, type(None)), None)}
EXEC_PREFIX = "exec-"  # hanabi_runtime.execs
CONFIG_STAMP = "cli-config.json"  # {absolute config path: its text}, as last validated


class Fallback(Exception):
    """The lean path cannot do this exactly: let the full CLI do it."""


class LeanConfig:
    """The few settings the hot paths read."""

    def __init__(self, values: dict) -> None:
        self.run_dir = values["run_dir"]
        self.default_timeout_s = float(values["rpc.default_timeout_s"])
        self.request_timeout_s = float(values["agent.request_timeout_s"])
        self.stop_timeout_s = float(values["vmm.stop_timeout_s"])

    @classmethod
    def of(cls, config: object) -> LeanConfig:
        """The same settings (the keys of DEFAULTS) taken from a validated
        `hanabi_common.config.Config`, for a file the lean reader could not vouch for."""
        values = {}
        for key in DEFAULTS:
            value = config
            for part in key.split("."):
                value = getattr(value, part)
            values[key] = os.fspath(value) if isinstance(value, os.PathLike) else value
        return cls(values)

    @property
    def sandboxes_dir(self) -> str:
        """hanabi_common.config.Config.sandboxes_dir."""
        return os.path.join(self.run_dir, "sbs")

    def socket_path(self, daemon: str) -> str:
        """hanabi_common.config.Config.socket_path."""
        return os.path.join(self.run_dir, f"{daemon}.sock")


def _config_path(explicit: str | None) -> str | None:
    if explicit:
        return explicit
    env = os.environ.get(CONFIG_ENV)
    if env:
        return env
    return DEFAULT_CONFIG_PATH if os.path.exists(DEFAULT_CONFIG_PATH) else None


def load_config(explicit: str | None) -> LeanConfig:
    """The settings, as hanabi_common.config.load_config reads them; Fallback when in doubt."""
    values = dict(DEFAULTS)
    path = _config_path(explicit)
    if path is None:
        return LeanConfig(values)
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
    except FileNotFoundError:
        raise InvalidArgument(f"config file {path} does not exist") from None
    except OSError:
        raise Fallback() from None
    from hanabi_runtime.lean.toml import simple_toml

    try:
        text = raw.decode()
    except UnicodeDecodeError:
        raise Fallback() from None  # the full path words it
    data = simple_toml(text)
    if data is None:
        import tomllib

        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError:
            raise Fallback() from None
    run_dir = data.get("run_dir", DEFAULTS["run_dir"])
    if not isinstance(run_dir, str) or _stamped(run_dir).get(os.path.abspath(path)) != text:
        raise Fallback()  # not validated as it is now
    if "source" in data or any(key not in CONFIG_KEYS for key in data):
        raise Fallback()
    if any(not isinstance(data.get(section, {}), dict) for section in CONFIG_SECTIONS):
        raise Fallback()
    for dotted in DEFAULTS:
        section, _, key = dotted.rpartition(".")
        table = data.get(section, {}) if section else data
        if key not in table:
            continue
        value = table[key]
        if key == "run_dir":
            if not isinstance(value, str) or not value:
                raise Fallback()
        elif isinstance(value, bool) or not isinstance(value, _NUMBER) or not value > 0:
            raise Fallback()
        values[dotted] = value
    return LeanConfig(values)


def _stamped(run_dir: str) -> dict:
    try:
        with open(os.path.join(run_dir, CONFIG_STAMP), "rb") as handle:
            stamped = json.loads(handle.read())
    except (OSError, ValueError):
        return {}
    return stamped if isinstance(stamped, dict) else {}


def stamp_config(run_dir, path, text: str) -> None:
    """Record that the full CLI's models accepted config file `path` as `text` (called by
    `hanabi_runtime.cli` after `load_config`; best effort, only where the run dir exists)."""
    run_dir, path = str(run_dir), os.path.abspath(str(path))
    stamped = _stamped(run_dir)
    if stamped.get(path) == text or not os.path.isdir(run_dir):
        return
    stamped[path] = text
    try:
        write_atomic(os.path.join(run_dir, CONFIG_STAMP), json.dumps(stamped).encode())
    except OSError:
        pass


def check_fields(data: object, fields: dict) -> dict | None:
    """`data` with defaults filled in when it matches the fields exactly, else None."""
    if not isinstance(data, dict) or any(key not in fields for key in data):
        return None
    result = {}
    for name, (types, default) in fields.items():
        if name in data:
            value = data[name]
            if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
                return None
            result[name] = value
        elif default is REQUIRED:
            return None
        else:
            result[name] = type(default)(default) if isinstance(default, (dict, list)) else default
    return result


def _valid_runtime_state(state: dict) -> bool:
    return (all(isinstance(k, str) and isinstance(v, str) for k, v in state["annotations"].items())
            and all(isinstance(k, str) and isinstance(v, _NUMBER) and not isinstance(v, bool)
                    for k, v in state["timings"].items())
            and all(isinstance(c, str) for c in state["cgroups"])
            and all(isinstance(k, str) and isinstance(v, list) and all(isinstance(h, dict) for h in v)
                    for k, v in state["hooks"].items()))


def state_path(config: LeanConfig, cid: str, name: str = "state") -> str:
    """Where a sandbox's state file is (the id validated already)."""
    return os.path.join(config.sandboxes_dir, cid, f"{name}.json")


def read_state(config: LeanConfig, cid: str) -> dict | None:
    """state.json as StateStore.read and RuntimeState read it; None when absent."""
    target = state_path(config, cid)
    try:
        with open(target, "rb") as handle:
            raw = handle.read()
    except FileNotFoundError:
        return None
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise Internal(f"state file {target} is corrupt: {exc}") from None
    version = data.get("schema_version") if isinstance(data, dict) else None
    if version != SCHEMA_VERSION:
        raise FailedPrecondition(f"state file {target} has schema version {version!r}, "
                                 f"this hanabi reads version {SCHEMA_VERSION}")
    state = check_fields(data, RUNTIME_STATE)
    if state is None or not _valid_runtime_state(state):
        raise Fallback()  # pydantic's own words for what is wrong
    if state["sandbox"] is not None:
        from hanabi_runtime.lean.ids import checked_id

        checked_id(state["sandbox"])  # else Fallback: the full CLI names what is wrong
    state["created_at"] = float(state["created_at"])  # as RuntimeState holds it
    return state


def load_state(config: LeanConfig, cid: str) -> dict:
    """Runtime.load: the recorded state; NotFound if there is none."""
    state = read_state(config, cid)
    if state is None:
        raise NotFound(f"container {cid} does not exist")
    return state


def write_state(config: LeanConfig, cid: str, state: dict) -> None:
    """StateStore.write: atomically (temp file, fsync, rename, fsync of the directory)."""
    target = state_path(config, cid)
    directory = os.path.dirname(target)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    data = json.dumps(dict(state, schema_version=SCHEMA_VERSION), indent=1, ensure_ascii=False).encode()
    write_atomic(target, data)


def exec_standins(config: LeanConfig, cid: str) -> list[tuple[int, int | None]]:
    """(pid, start time) of the stand-ins of the recorded execs (Runtime.exec_records)."""
    directory = os.path.join(config.sandboxes_dir, cid)
    try:
        names = sorted(n for n in os.listdir(directory) if n.startswith(EXEC_PREFIX) and n.endswith(".json"))
    except (FileNotFoundError, NotADirectoryError):
        return []
    result = []
    for name in names:
        try:
            with open(os.path.join(directory, name), "rb") as handle:
                data = json.loads(handle.read())
        except (OSError, ValueError):
            continue
        record = check_fields(data, EXEC_RECORD)
        if record is not None and record["schema_version"] == SCHEMA_VERSION:
            result.append((record["standin_pid"], record["standin_start_time"]))
    return result
