"""A private containerd (Debian's 1.6, CRI plugin on) whose `hanabi` runtime handler is
containerd's runc shim with `BinaryName` = hanabi-runtime, driven through the CRI v1 gRPC API.

Everything of containerd lives under one short temp dir: root, state, the gRPC and ttrpc
sockets, its config.toml, the CNI config dir (one bridge network with a fresh bridge name and
a /24 no host route covers, host-local IPAM state in the temp dir, no masquerade, no
firewall or portmap plugin: no iptables rule on the host) and the pods' network namespaces
(`netns_mounts_under_state_dir`). The plugins are Debian's in /usr/lib/cni. No registry is
reachable: the images are docker-archive tarballs written here (a busybox-static layer, one
config with `sh` and one "pause" config running `sleep`) and imported with `ctr -n k8s.io
images import`; `sandbox_image` is the local pause image. The hanabi config reaches every
runtime call through a two-line wrapper script given as BinaryName (an installed hanabi
reads /etc/hanabi/hanabi.toml and needs none).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.e2e.docker_env import mounts_under, tap_devices
from tests.e2e.podman_env import CNI_PLUGIN_DIR, Network, cni_plugins_missing, free_subnets
from tests.helpers.hanabi import (BIN, Daemons, integration_skip_reason, kept_vmm_pids, loop_devices_on,
                                  processes_mentioning)

IMAGE = "localhost/hanabi-busybox:test"
PAUSE_IMAGE = "localhost/hanabi-pause:test"
HANDLER = "hanabi"
CGROUP_PARENT = "hanabi-cri-test"
START_TIMEOUT_S = 60.0


def cri_skip_reason() -> str | None:
    """Why the CRI end-to-end tests cannot run here, or None."""
    for binary, package in (("containerd", "containerd"), ("containerd-shim-runc-v2", "containerd"),
                            ("ctr", "containerd")):
        if not shutil.which(binary):
            return f"{binary} is not installed (apt-get install {package})"
    return cni_plugins_missing() or integration_skip_reason()


def _layer_tar(rootfs: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for entry in sorted(rootfs.rglob("*")):
            tar.add(entry, arcname=str(entry.relative_to(rootfs)), recursive=False)
    return buf.getvalue()


def docker_archive(out: Path, rootfs: Path, images: dict[str, dict]) -> None:
    """A `docker save` tarball holding one layer (`rootfs`) and one image per tag in
    `images` (tag -> its config's `config` object: Cmd, Entrypoint, Env...)."""
    layer = _layer_tar(rootfs)
    diff_id = "sha256:" + hashlib.sha256(layer).hexdigest()
    manifest, files = [], {"layer/layer.tar": layer}
    for tag, container_config in images.items():
        config = json.dumps({"architecture": "amd64", "os": "linux", "config": container_config,
                             "rootfs": {"type": "layers", "diff_ids": [diff_id]},
                             "history": [{"created_by": "hanabi tests"}]}).encode()
        name = hashlib.sha256(config).hexdigest() + ".json"
        files[name] = config
        manifest.append({"Config": name, "RepoTags": [tag], "Layers": ["layer/layer.tar"]})
    files["manifest.json"] = json.dumps(manifest).encode()
    with tarfile.open(out, "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@dataclass
class PrivateContainerd:
    """containerd with its own root, state, sockets, config, CNI network and images."""

    base: Path
    hanabi: Daemons
    network: Network | None = None
    proc: subprocess.Popen | None = None
    cgroups_before: set[str] = field(default_factory=set)
    setup_seconds: float = 0.0  # hanabi daemons + containerd + image import

    @property
    def socket(self) -> Path:
        return self.base / "containerd.sock"

    @property
    def runtime(self) -> Path:
        return self.base / "hanabi-runtime"

    @property
    def log_path(self) -> Path:
        return self.hanabi.root / "containerd.log"  # pytest's temp dir: kept for a failure's post-mortem

    def config_toml(self) -> str:
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        return f'''version = 2
root = "{self.base}/root"
state = "{self.base}/state"
[grpc]
  address = "{self.socket}"
[ttrpc]
  address = "{self.socket}.ttrpc"
[debug]
  level = "info"
[{cri}]
  sandbox_image = "{PAUSE_IMAGE}"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  disable_apparmor = true
  netns_mounts_under_state_dir = true
  [{cri}.containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [{cri}.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
    [{cri}.containerd.runtimes.{HANDLER}]
      runtime_type = "io.containerd.runc.v2"
      [{cri}.containerd.runtimes.{HANDLER}.options]
        BinaryName = "{self.runtime}"
  [{cri}.cni]
    bin_dir = "{CNI_PLUGIN_DIR}"
    conf_dir = "{self.base}/cni"
'''

    def setup(self) -> None:
        self.cgroups_before = cri_cgroups()
        tag = self.base.name[-4:].lower()
        prefix = free_subnets(1)[0]
        self.network = Network(name=f"hanabi-cri-{tag}", bridge=f"hbc{tag}", prefix=prefix)
        cni = self.base / "cni"
        cni.mkdir(parents=True)
        (cni / "10-hanabi.conflist").write_text(json.dumps(self.network.conflist(self.base / "ipam")))
        self.runtime.write_text(f'#!/bin/sh\nexec {BIN / "hanabi-runtime"} --config {self.hanabi.config_path} "$@"\n')
        self.runtime.chmod(0o755)
        (self.base / "config.toml").write_text(self.config_toml())
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(["containerd", "--config", str(self.base / "config.toml")],
                                     stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"containerd exited: {self.log_tail()}")
            if self.socket.exists() and self.ctr("version", check=False).returncode == 0:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"containerd did not answer within {START_TIMEOUT_S:.0f} s: {self.log_tail()}")
            time.sleep(0.2)

    def ctr(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        done = subprocess.run(["ctr", "--address", str(self.socket), "--namespace", "k8s.io", *args],
                              capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        if check and done.returncode != 0:
            raise AssertionError(f"ctr {' '.join(args)} failed: {done.stderr.strip()}")
        return done

    def import_images(self) -> None:
        from hanabi_runtime.demo_bundle import make_rootfs

        work = Path(tempfile.mkdtemp(prefix="img-", dir=self.base))
        make_rootfs(work / "rootfs")
        env = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]
        docker_archive(work / "images.tar", work / "rootfs", {
            IMAGE: {"Cmd": ["sh"], "Env": env},
            PAUSE_IMAGE: {"Entrypoint": ["/bin/sleep", "2147483647"], "Env": env},
        })
        self.ctr("images", "import", str(work / "images.tar"))
        shutil.rmtree(work, ignore_errors=True)

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def shims(self) -> set[int]:
        """Our containerd's shims (their command line names its socket)."""
        return set(processes_mentioning("containerd-shim")) & set(processes_mentioning(str(self.socket)))

    def standins(self) -> set[int]:
        """Our stand-ins (others' may run on this machine): in our pods' cgroups or children of our shims."""
        shims = self.shims()
        found = set()
        for pid in processes_mentioning("[hanabi "):
            try:
                cgroups = Path(f"/proc/{pid}/cgroup").read_text()
                ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if f"/{CGROUP_PARENT}/" in cgroups or ppid in shims:
                found.add(pid)
        return found

    def leftovers(self) -> dict[str, set[str]]:
        """What hanabi, containerd or CNI have now that a removed pod could leave behind."""
        config = self.hanabi.config
        daemon_pids = {proc.pid for proc in self.hanabi.procs.values()}
        ours = set(processes_mentioning(str(self.hanabi.root))) - daemon_pids - kept_vmm_pids(config)
        qemu = ours & set(processes_mentioning("qemu-system"))
        sbs, volumes = config.sandboxes_dir, config.block.volume_dir
        netns = self.base / "state" / "io.containerd.grpc.v1.cri" / "netns"
        return {
            "hanabi processes": {str(pid) for pid in ours - qemu},
            "qemu": {str(pid) for pid in qemu},
            "stand-ins": {str(pid) for pid in self.standins()},
            "shims": {str(pid) for pid in self.shims()},
            "state dirs": set(os.listdir(sbs)) if sbs.exists() else set(),
            "volumes": {v for v in (os.listdir(volumes) if volumes.exists() else []) if v not in ("bases", "kept")},
            "loop devices": set(loop_devices_on(self.hanabi.root)),
            "taps": tap_devices(),
            "share mounts": set(mounts_under(config.shares_dir)),
            "pod netns": set(os.listdir(netns)) if netns.exists() else set(),
            "cgroups": cri_cgroups() - self.cgroups_before,
        }

    def close(self) -> None:
        """Remove what a failed test left in hanabi (a pod sandbox's delete removes its
        containers too), stop containerd and its shims, unmount what it left, delete the
        bridge and the cgroups, remove the dir."""
        sbs = self.hanabi.config.sandboxes_dir
        for cid in sorted(os.listdir(sbs)) if sbs.exists() else []:
            self.hanabi.runtime("delete", "--force", cid, timeout=120)
        for pid in self.shims():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for point in mounts_under(self.base):
            if subprocess.run(["umount", point], capture_output=True, timeout=20).returncode != 0:
                subprocess.run(["umount", "-l", point], capture_output=True, timeout=20)
        if self.network is not None:
            subprocess.run(["ip", "link", "del", self.network.bridge], capture_output=True, timeout=10)
        for directory in sorted(cri_cgroup_dirs(), key=lambda p: len(str(p)), reverse=True):
            try:
                directory.rmdir()
            except OSError:
                pass
        shutil.rmtree(self.base, ignore_errors=True)


def cri_cgroup_dirs() -> list[Path]:
    """The cgroup directories under our pods' cgroup parent, in any v1 hierarchy (parent included)."""
    found: list[Path] = []
    for parent in Path("/sys/fs/cgroup").glob(f"*/{CGROUP_PARENT}"):
        found.append(parent)
        found += [p for p in parent.rglob("*") if p.is_dir()]
    return found


def cri_cgroups() -> set[str]:
    """The cgroups our pods' containers have (below the parent), by hierarchy and name."""
    return {f"{p.relative_to('/sys/fs/cgroup')}" for p in cri_cgroup_dirs() if p.name != CGROUP_PARENT}
