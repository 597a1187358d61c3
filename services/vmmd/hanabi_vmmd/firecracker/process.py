"""How a Firecracker process is started: its argv, directly or through `jailer`, and where
its files are as the host sees them and as Firecracker sees them (pure, unit-tested).

Without the jailer, Firecracker runs in the VM's directory and every path it is given is
the host path. With the jailer (`JailerConfig`), it runs chrooted in
`<chroot_base>/<exec file name>/<jail id>/root` as `uid:gid`, in the container's network
namespace (`--netns`) and in its own cgroup; the files it opens must be inside that root,
and it names them relative to it ("/vmlinux"). `Layout` does that translation both ways.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Sequence

from hanabi_common.errors import InvalidArgument
from hanabi_wire.constants import (CHANNEL_VSOCK, CMDLINE_CHANNEL, CMDLINE_POWEROFF, POWEROFF_REBOOT,
                                   VSOCK_PORT, CMDLINE_SHARE, SHARE_EXPORT_NAME, cmdline_word)

API_SOCK_NAME = "fc.sock"
VSOCK_NAME = "fc-vsock.sock"
LOG_NAME = "fc.log"
METRICS_NAME = "fc.metrics"
AGENT_VSOCK_PORT = VSOCK_PORT  # where the agent listens (hanabi_wire.constants)
_JAIL_ID = re.compile(r"^[A-Za-z0-9-]{1,64}$")


@dataclass(frozen=True)
class JailerConfig:
    """Options of Firecracker's jailer (`vmm.firecracker.jailer` in hanabi.toml)."""

    binary: str = "jailer"
    uid: int = 0
    gid: int = 0
    chroot_base: Path = Path("/srv/jailer")
    cgroup_version: int = 2
    parent_cgroup: str | None = None
    cgroups: tuple[str, ...] = field(default_factory=tuple)  # "cpu.max=50000 100000", ...


@dataclass(frozen=True)
class Layout:
    """Where Firecracker's files live: `root` on the host, `inside` as Firecracker names it."""

    root: Path
    inside: str
    jail_dir: Path | None = None  # what to remove after the VM (the jailer's per-id folder)

    def host(self, name: str) -> Path:
        """The host path of a file Firecracker knows as `name` (relative to its root)."""
        return self.root / name

    def fc(self, name: str) -> str:
        """The path Firecracker is given for `name`."""
        return os.path.join(self.inside, name)

    @property
    def api_socket(self) -> Path:
        return self.host(API_SOCK_NAME)

    @property
    def vsock_socket(self) -> Path:
        return self.host(VSOCK_NAME)


def jail_id(vm_dir: Path) -> str:
    """The jailer/instance id of a VM: its directory's name (16 hex digits, see state.py)."""
    name = Path(vm_dir).name
    if not _JAIL_ID.match(name):
        raise InvalidArgument(f"VM directory name {name!r} is not a valid Firecracker instance id")
    return name


def layout_for(vm_dir: Path, exec_file: str, jailer: JailerConfig | None) -> Layout:
    """The file layout of one VM's Firecracker process."""
    if jailer is None:
        return Layout(root=Path(vm_dir), inside=str(vm_dir))
    jail_dir = Path(jailer.chroot_base) / Path(exec_file).name / jail_id(vm_dir)
    return Layout(root=jail_dir / "root", inside="/", jail_dir=jail_dir)


def firecracker_argv(binary: str, layout: Layout, instance_id: str) -> list[str]:
    """`firecracker --api-sock <sock> --id <id>`: configuration comes over the API."""
    return [binary, "--api-sock", layout.fc(API_SOCK_NAME), "--id", instance_id]


def jailer_argv(jailer: JailerConfig, exec_file: str, instance_id: str, netns: str | None) -> list[str]:
    """The jailer command line; Firecracker's own arguments follow `--`."""
    if not os.path.isabs(exec_file):
        raise InvalidArgument(f"the jailer needs an absolute Firecracker path, not {exec_file!r}")
    if "firecracker" not in Path(exec_file).name:
        raise InvalidArgument(f"the jailer only runs executables named *firecracker*, not {exec_file!r}")
    if not _JAIL_ID.match(instance_id):
        raise InvalidArgument(f"jailer id {instance_id!r} must be 1-64 letters, digits or '-'")
    if jailer.cgroup_version not in (1, 2):
        raise InvalidArgument(f"cgroup version {jailer.cgroup_version} is neither 1 nor 2")
    argv = [jailer.binary, "--id", instance_id, "--exec-file", exec_file,
            "--uid", str(jailer.uid), "--gid", str(jailer.gid),
            "--chroot-base-dir", str(jailer.chroot_base),
            "--cgroup-version", str(jailer.cgroup_version)]
    if netns:
        argv += ["--netns", netns]
    if jailer.parent_cgroup:
        argv += ["--parent-cgroup", jailer.parent_cgroup]
    for setting in jailer.cgroups:
        if "=" not in setting:
            raise InvalidArgument(f"cgroup setting {setting!r} is not FILE=VALUE")
        argv += ["--cgroup", setting]
    return argv + ["--", "--api-sock", "/" + API_SOCK_NAME, "--id", instance_id]


def nics_netns(paths: Sequence[str | None]) -> str | None:
    """The one network namespace every boot NIC's tap lives in (None: the host's).

    Firecracker opens taps by name in its own namespace, so all of a VM's taps must share one.
    """
    distinct = set(paths)
    if len(distinct) > 1:
        raise InvalidArgument(f"a Firecracker VM's taps must all be in one network namespace, "
                              f"not {sorted(str(p) for p in distinct)}")
    return next(iter(distinct), None)


def kernel_args(base: str, share: bool = False) -> str:
    """The guest cmdline under Firecracker: the image's, plus
    - `hanabi.channel=vsock`: the agent listens on AF_VSOCK port AGENT_VSOCK_PORT;
    - `reboot=k`: a guest reboot goes through the i8042 reset, which ends Firecracker;
    - `pci=off`: no PCI bus to probe (devices are virtio-mmio, described by ACPI);
    - `sysctl.kernel.ctrl-alt-del=1`: SendCtrlAltDel restarts the guest kernel at once
      (so Firecracker exits) instead of signalling the agent, which is PID 1;
    - `hanabi.poweroff=reboot`: the agent ends the VM with a restart (Firecracker has no
      power-off device);
    - with `share`, `hanabi.share=/export`: the file share is 9P over vsock, attach name
      SHARE_EXPORT_NAME (the export root as the confined diod sees it, share_server.py)."""
    extra = [cmdline_word(CMDLINE_CHANNEL, CHANNEL_VSOCK), "reboot=k", "pci=off", "sysctl.kernel.ctrl-alt-del=1",
             cmdline_word(CMDLINE_POWEROFF, POWEROFF_REBOOT)]
    if share:
        extra.append(cmdline_word(CMDLINE_SHARE, SHARE_EXPORT_NAME))
    words = base.split()
    return " ".join(words + [w for w in extra if w not in words])
