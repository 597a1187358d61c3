"""A private podman (Debian's podman 4.3 with conmon and CNI) that runs containers with hanabi.

Nothing of the host's podman state is used or touched: storage root, run root, tmp dir (events,
locks), containers.conf and the CNI network configs all live under one temp dir, and every
podman call gets them on its command line or in its environment. The networks are CNI bridge
networks this session makes (a fresh bridge name and a /24 that no host route covers, no
masquerade, no firewall or portmap plugin: no iptables rule on the host) with their IPAM state
in the temp dir too; the bridges are deleted at the end. The image is made locally:
`podman import` of a busybox-static rootfs.

podman 4.3 drops `--runtime-flag` from the `podman container cleanup` it has conmon run when a
container exits (that cleanup calls `RUNTIME delete --force` with podman's own flags only), so
the test's hanabi config reaches every runtime call through a two-line wrapper script given as
`--runtime` (an installed hanabi reads /etc/hanabi/hanabi.toml and needs none).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from tests.e2e.docker_env import mounts_under, tap_devices
from tests.e2e.engines import import_busybox, wait_for
from tests.helpers.hanabi import (BIN, Daemons, integration_skip_reason, kept_vmm_pids, loop_devices_on,
                                  processes_mentioning)

IMAGE = "localhost/hanabi-busybox:test"
CNI_PLUGIN_DIR = Path("/usr/lib/cni")
CNI_RESULTS = Path("/var/lib/cni/results")  # libcni's cache (podman 4.3 gives no way to move it)
CGROUP_ROOT = Path("/sys/fs/cgroup")


def libpod_cgroups() -> set[str]:
    """The per-container cgroups podman's cgroupfs manager made (libpod_parent/libpod-<id>), any hierarchy."""
    found = set()
    for parent in [*CGROUP_ROOT.glob("libpod_parent"), *CGROUP_ROOT.glob("*/libpod_parent")]:
        found |= {f"{parent.parent.name}/{entry.name}" for entry in parent.glob("libpod-*")}
    return found


def podman_skip_reason() -> str | None:
    """Why the podman end-to-end tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (rootful podman, QEMU, loop files)"
    for binary, package in (("podman", "podman"), ("conmon", "conmon")):
        if not shutil.which(binary):
            return f"{binary} is not installed (apt-get install {package})"
    return cni_plugins_missing() or integration_skip_reason()


def cni_plugins_missing() -> str | None:
    """Which CNI plugin the bridge networks need is not installed, or None."""
    for plugin in ("bridge", "host-local", "loopback"):
        if not (CNI_PLUGIN_DIR / plugin).exists():
            return f"the CNI {plugin} plugin is missing from {CNI_PLUGIN_DIR} (apt-get install containernetworking-plugins)"
    return None


def free_subnets(count: int) -> list[str]:
    """`count` /24s in 10.200-249.x.0 that no route of the host covers (nor each other)."""
    routes = subprocess.run(["ip", "-4", "route", "show", "table", "all"], capture_output=True, text=True,
                            timeout=10).stdout
    used = {".".join(word.split("/")[0].split(".")[:3]) for word in routes.split() if word.startswith("10.")}
    picked: list[str] = []
    while len(picked) < count:
        prefix = f"10.{random.randint(200, 249)}.{random.randint(1, 254)}"
        if prefix not in used and prefix not in picked:
            picked.append(prefix)
    return picked


def container_volumes(volume_dir: Path) -> set[str]:
    """A container's volumes and kept root layers (blockd's sweep drops those of removed
    containers within seconds); the shared per-image bases in bases/ are not a container's."""
    if not volume_dir.exists():
        return set()
    found = set(os.listdir(volume_dir)) - {"bases", "kept"}
    kept = volume_dir / "kept"
    return found | ({f"kept/{entry}" for entry in os.listdir(kept)} if kept.exists() else set())


@dataclass
class Network:
    name: str
    bridge: str
    prefix: str  # the /24's first three octets

    @property
    def gateway(self) -> str:
        return f"{self.prefix}.1"

    def conflist(self, ipam_dir: Path) -> dict:
        return {"cniVersion": "0.4.0", "name": self.name, "plugins": [{
            "type": "bridge", "bridge": self.bridge, "isGateway": True, "ipMasq": False, "hairpinMode": True,
            "ipam": {"type": "host-local", "dataDir": str(ipam_dir / self.name),
                     "routes": [{"dst": "0.0.0.0/0"}],
                     "ranges": [[{"subnet": f"{self.prefix}.0/24", "gateway": self.gateway}]]}}]}


@dataclass
class PrivatePodman:
    """podman with its own storage, run root, tmp dir, containers.conf and CNI networks."""

    base: Path
    hanabi: Daemons
    networks: list[Network] = field(default_factory=list)
    cgroups_before: set[str] = field(default_factory=set)
    setup_seconds: float = 0.0  # hanabi daemons + podman setup + image import

    @property
    def runtime(self) -> Path:
        return self.base / "hanabi-runtime"

    def setup(self, network_count: int = 2) -> None:
        self.cgroups_before = libpod_cgroups()
        tag = self.base.name[-4:].lower()
        for index, prefix in enumerate(free_subnets(network_count)):
            self.networks.append(Network(name=f"hanabi-e2e-{tag}-{index}", bridge=f"hbp{tag}{index}", prefix=prefix))
        cni = self.base / "cni"
        cni.mkdir(parents=True)
        for network in self.networks:
            (cni / f"{network.name}.conflist").write_text(json.dumps(network.conflist(self.base / "ipam")))
        (self.base / "tmp").mkdir()
        (self.base / "containers.conf").write_text(
            "[engine]\n"
            'cgroup_manager = "cgroupfs"\n'
            'events_logger = "file"\n'
            f'tmp_dir = "{self.base}/tmp"\n'
            "[network]\n"
            f'network_config_dir = "{cni}"\n'
            f'default_network = "{self.networks[0].name}"\n'
            f'cni_plugin_dirs = ["{CNI_PLUGIN_DIR}"]\n')
        (self.base / "storage.conf").write_text(
            f'[storage]\ndriver = "overlay"\ngraphroot = "{self.base}/storage"\nrunroot = "{self.base}/runroot"\n')
        (self.base / "registries.conf").write_text("unqualified-search-registries = []\n")  # no registry here
        self.runtime.write_text(f'#!/bin/sh\nexec {BIN / "hanabi-runtime"} --config {self.hanabi.config_path} "$@"\n')
        self.runtime.chmod(0o755)

    def argv(self, *args: str) -> list[str]:
        return ["podman", "--root", str(self.base / "storage"), "--runroot", str(self.base / "runroot"),
                "--tmpdir", str(self.base / "tmp"), "--storage-driver", "overlay", "--cgroup-manager", "cgroupfs",
                "--runtime", str(self.runtime), *args]

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CONTAINERS_", "XDG_RUNTIME"))}
        env["CONTAINERS_CONF"] = str(self.base / "containers.conf")
        env["CONTAINERS_STORAGE_CONF"] = str(self.base / "storage.conf")
        env["CONTAINERS_REGISTRIES_CONF"] = str(self.base / "registries.conf")
        return env

    def run(self, *args: str, timeout: float = 120, input: str | None = None) -> subprocess.CompletedProcess:
        try:
            return subprocess.run(self.argv(*args), capture_output=True, text=True, timeout=timeout, input=input,
                                  env=self.env(), stdin=None if input is not None else subprocess.DEVNULL)
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(f"`podman {' '.join(args)}` did not finish within {timeout} s: "
                                 f"{exc.stdout!r} {exc.stderr!r}") from None

    def check(self, *args: str, timeout: float = 120) -> str:
        done = self.run(*args, timeout=timeout)
        assert done.returncode == 0, f"`podman {' '.join(args)}` failed ({done.returncode}): {done.stderr.strip()}"
        return done.stdout

    def import_busybox(self) -> None:
        """The test image: a busybox rootfs through `podman import`."""
        import_busybox(self.argv(), IMAGE, self.base, self.env(), "podman")

    def wait_for(self, what: str, probe, timeout: float = 30.0):
        """Poll probe() until it returns something true; fail with its last value."""
        return wait_for(what, probe, timeout)

    def cni_results(self) -> set[str]:
        """libcni's cached results that belong to our networks."""
        names = tuple(f"{n.name}-" for n in self.networks)
        try:
            return {entry for entry in os.listdir(CNI_RESULTS) if entry.startswith(names)}
        except FileNotFoundError:
            return set()

    def leftovers(self) -> dict[str, set[str]]:
        """What hanabi, podman or CNI have now that a removed container could leave behind."""
        config = self.hanabi.config
        daemon_pids = {proc.pid for proc in self.hanabi.procs.values()}
        ours = set(processes_mentioning(str(self.hanabi.root))) - daemon_pids - kept_vmm_pids(self.hanabi.config)
        conmons = {pid for pid in processes_mentioning("conmon") if pid in set(processes_mentioning(str(self.base)))}
        sbs, volumes = config.sandboxes_dir, config.block.volume_dir
        return {
            "hanabi processes": {str(pid) for pid in ours},
            "conmon processes": {str(pid) for pid in conmons},
            "state dirs": set(os.listdir(sbs)) if sbs.exists() else set(),
            "volumes": container_volumes(volumes),
            "loop devices": set(loop_devices_on(self.hanabi.root)),
            "taps": tap_devices(),
            "cni results": self.cni_results(),
            "cgroups": libpod_cgroups() - self.cgroups_before,
            "containers": set(self.check("ps", "-aq").split()),
        }

    def close(self) -> None:
        """Remove every container, reset storage mounts, delete our bridges, remove the temp dir."""
        try:
            ids = self.run("ps", "-aq", timeout=60).stdout.split()
            if ids:
                self.run("rm", "-f", "-t", "0", *ids, timeout=180)
        finally:
            subprocess.run(["umount", "-R", str(self.base / "storage" / "overlay")], capture_output=True, timeout=30)
            for point in mounts_under(self.base):
                if subprocess.run(["umount", point], capture_output=True, timeout=20).returncode != 0:
                    subprocess.run(["umount", "-l", point], capture_output=True, timeout=20)
            for network in self.networks:
                subprocess.run(["ip", "link", "del", network.bridge], capture_output=True, timeout=10)
            shutil.rmtree(self.base, ignore_errors=True)
