"""An OCI bundle as the runtime needs it: config.json validated, paths resolved."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from hanabi_common.errors import InvalidArgument, NotFound

SUPPORTED_MAJOR = "1."
# What `runc spec` (1.1) writes: its capabilities (every set but inheritable), masked and
# read-only paths.
RUNC_SPEC_CAPS = ("CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE")
RUNC_SPEC_MASKED = ("/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                    "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware", "/proc/scsi")
RUNC_SPEC_READONLY = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")


@dataclass(frozen=True)
class Bundle:
    """A validated bundle."""

    path: Path
    config: dict
    rootfs: Path
    readonly: bool
    process: dict
    hostname: str | None
    annotations: dict[str, str]
    netns_path: str | None
    new_netns: bool = False
    pod_sandbox: str | None = None  # a CRI app container: its pod's sandbox container (pod.py)

    @property
    def oci_version(self) -> str:
        """The spec version the bundle was written for."""
        return str(self.config.get("ociVersion", "1.0.2"))


def _network_namespace(config: dict) -> tuple[str | None, bool]:
    """(path of the network namespace to join, whether a new one is asked for); (None,
    False) when the config lists none (the host's network: the VM gets loopback only)."""
    for namespace in config.get("linux", {}).get("namespaces", []) or []:
        if namespace.get("type") == "network":
            path = namespace.get("path") or None
            return path, path is None
    return None, False


def check_process(process: dict) -> None:
    """Rules the schema does not express but runc enforces."""
    if not process.get("args"):
        raise InvalidArgument("config.json: process.args must name a program to run")
    cwd = process.get("cwd", "")
    if not cwd.startswith("/"):
        raise InvalidArgument(f"config.json: process.cwd {cwd!r} must be an absolute path")


def load_bundle(bundle: str | Path, cid: str | None = None) -> Bundle:
    """Read `<bundle>/config.json`, validate it against the OCI schema, resolve the rootfs
    (`cid`: the container's id, for the messages)."""
    from hanabi_common.oci import validate_config

    path = Path(bundle).resolve()
    if not path.is_dir():
        raise NotFound(f"bundle {bundle} does not exist or is not a directory")
    config_file = path / "config.json"
    try:
        raw = config_file.read_bytes()
    except FileNotFoundError:
        raise NotFound(f"bundle {path} has no config.json") from None
    try:
        config = json.loads(raw)
    except ValueError as exc:
        raise InvalidArgument(f"{config_file} is not valid JSON: {exc}") from None
    validate_config(config, str(config_file))
    if not str(config.get("ociVersion", "")).startswith(SUPPORTED_MAJOR):
        raise InvalidArgument(f"{config_file}: unsupported ociVersion {config.get('ociVersion')!r}")
    root = config.get("root")
    if not root or not root.get("path"):
        raise InvalidArgument(f"{config_file}: root.path is required")
    rootfs = (path / root["path"]).resolve()
    if not rootfs.is_dir():
        raise NotFound(f"rootfs {rootfs} of bundle {path} does not exist or is not a directory")
    process = config.get("process")
    if not process:
        raise InvalidArgument(f"{config_file}: process is required to create a container")
    check_process(process)
    from hanabi_runtime.guest_linux import check_guest_settings
    from hanabi_runtime.pod import own_settings, pod_sandbox_of

    annotations = dict(config.get("annotations") or {})
    pod_sandbox = pod_sandbox_of(cid or str(path), annotations)
    # An app container's namespace paths name its pod's (checked by the runtime, which
    # knows the pod): the guest checks the rest.
    check_guest_settings(own_settings(config) if pod_sandbox else config)
    netns_path, new_netns = (None, False) if pod_sandbox else _network_namespace(config)
    return Bundle(path=path, config=config, rootfs=rootfs, readonly=bool(root.get("readonly")),
                  process=process, hostname=config.get("hostname"), annotations=annotations,
                  netns_path=netns_path, new_netns=new_netns, pod_sandbox=pod_sandbox)


def default_spec(args: list[str] | None = None) -> dict:
    """The config.json `hanabi-runtime spec` writes, like `runc spec`."""
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": 0, "gid": 0},
            "args": args or ["sh"],
            "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "TERM=xterm"],
            "cwd": "/",
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": True,
            "capabilities": {k: list(RUNC_SPEC_CAPS) for k in ("bounding", "effective", "permitted", "ambient")},
        },
        "root": {"path": "rootfs", "readonly": False},
        "hostname": "hanabi",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        ],
        "linux": {"namespaces": [{"type": "pid"}, {"type": "network"}, {"type": "ipc"},
                                 {"type": "uts"}, {"type": "mount"}],
                  "maskedPaths": list(RUNC_SPEC_MASKED), "readonlyPaths": list(RUNC_SPEC_READONLY)},
    }
