"""Test harness: the four real daemons under a temp run dir, the real CLI, leak checks."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable, Iterator

from hanabi_common.config import DAEMONS, load_config
from hanabi_common.rpc.client import RpcClient

BIN = Path(sys.executable).parent
GUEST_DIR = Path(os.environ.get("HANABI_GUEST_DIR", "/var/lib/hanabi/guest/current"))
ZYGOTE = "zygote"  # not one of DAEMONS: no RPC endpoint (hanabi_runtime.zygote)


def integration_skip_reason() -> str | None:
    """Why the real-VM tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (QEMU, loop files, netns)"
    if not shutil.which("qemu-system-x86_64"):
        return "qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)"
    for name in ("vmlinux", "initrd.img"):
        if not (GUEST_DIR / name).exists():
            return f"no guest image: {GUEST_DIR / name} is missing (run `make guest`)"
    return None


@dataclass
class Daemons:
    """Four running daemons and how to reach them."""

    root: Path
    config_path: Path
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def config(self):
        return load_config(self.config_path)

    def start(self, name: str) -> None:
        log = open(self.root / f"{name}.log", "ab")
        self.procs[name] = subprocess.Popen([str(BIN / f"hanabi-{name}"), "serve", "--config", str(self.config_path)],
                                            stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        client = RpcClient(name, self.config.endpoint(name), timeout=2)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.procs[name].poll() is not None:
                raise RuntimeError(f"hanabi-{name} exited: {(self.root / f'{name}.log').read_text()[-2000:]}")
            try:
                client.ping(timeout=0.5)
                return
            except Exception:
                time.sleep(0.1)
        raise RuntimeError(f"hanabi-{name} did not answer in time")

    def start_zygote(self) -> None:
        """Start hanabi-zygote with this config and wait until it answers a ping."""
        from hanabi_runtime.zygote import protocol as P

        log = open(self.root / f"{ZYGOTE}.log", "ab")
        proc = self.procs[ZYGOTE] = subprocess.Popen(
            [str(BIN / "hanabi-zygote"), "serve", "--config", str(self.config_path)],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        path = P.socket_path(self.config.run_dir)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"hanabi-zygote exited: {(self.root / f'{ZYGOTE}.log').read_text()[-2000:]}")
            if zygote_answers(path):
                return
            time.sleep(0.1)
        raise RuntimeError("hanabi-zygote did not answer in time")

    def stop(self, name: str, sig: int = signal.SIGTERM) -> None:
        proc = self.procs.pop(name)
        proc.send_signal(sig)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def stop_all(self) -> None:
        """Stop the daemons, then kill whatever they left running under this root (VMs, stand-ins).

        vmmd leaves VMs running when it stops, by design (a restart re-adopts them); a test
        session that ends must not leave them behind.
        """
        for name in list(self.procs):
            self.stop(name)
        for pid in processes_mentioning(str(self.root)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def runtime(self, *args: str, input: bytes | None = None, timeout: float = 120,
                check: bool = False, prefix: list[str] | None = None) -> subprocess.CompletedProcess:
        """Run `hanabi-runtime --config CFG ARGS...` (after the command line `prefix`, as
        `unshare ...`) and capture stdout and stderr apart.

        Output goes through temp files, not pipes: after `create`, the stand-in keeps the
        stdio it was given (as containerd's shim expects), so a pipe would never reach EOF.
        """
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            done = subprocess.run([*(prefix or []), str(BIN / "hanabi-runtime"), "--config", str(self.config_path), *args],
                                  input=input, stdout=out, stderr=err, timeout=timeout,
                                  stdin=None if input is not None else subprocess.DEVNULL)
            out.seek(0)
            err.seek(0)
            done.stdout, done.stderr = out.read(), err.read()
        if check and done.returncode != 0:
            raise AssertionError(f"hanabi-runtime {' '.join(args)} failed ({done.returncode}): {done.stderr.decode()}")
        return done

    def state(self, cid: str) -> dict:
        return json.loads(self.runtime("state", cid, check=True).stdout)

    def wait_stopped(self, cid: str, timeout: float, why: str = "the container never stopped") -> None:
        """Poll `state` until container `cid` is stopped; AssertionError(`why`) after `timeout`."""
        deadline = time.monotonic() + timeout
        while self.state(cid)["status"] != "stopped":
            assert time.monotonic() < deadline, why
            time.sleep(0.05)


def zygote_answers(path: str) -> bool:
    """Whether a zygote answers a ping on socket `path`."""
    import socket

    from hanabi_runtime.zygote import protocol as P

    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.settimeout(2)
        try:
            sock.connect(path)
            P.send(sock, P.PING)
            return P.recv(sock)[0]["op"] == P.PONG
        except (OSError, P.ProtocolError):
            return False


def start_daemons(root: Path, extra_toml: str = "", vmm_toml: str = "", zygote: bool = True) -> Daemons:
    """Write a config under `root` and start the four daemons with it (`vmm_toml`: more
    keys of the [vmm] table, `extra_toml`: more tables), and the zygote unless `zygote`
    is false (then each create, run and exec imports its modules itself)."""
    root.mkdir(parents=True, exist_ok=True)
    config_path = root / "hanabi.toml"
    config_path.write_text(
        f'run_dir = "{root}/run"\nlog_level = "debug"\n'
        f'[vmm]\nguest_dir = "{GUEST_DIR}"\n{vmm_toml}\n'
        f'[block]\nvolume_dir = "{root}/volumes"\n' + extra_toml)
    daemons = Daemons(root=root, config_path=config_path)
    try:
        for name in DAEMONS:
            daemons.start(name)
        if zygote:
            daemons.start_zygote()
    except BaseException:
        daemons.stop_all()
        raise
    return daemons


@contextmanager
def daemons_for_test(root: Path, skip_reason: Callable[[], str | None] | None = None,
                     **options: str) -> Iterator[Daemons]:
    """Skip the test if `skip_reason()` (default: why real VMs cannot run here) gives a
    reason, else the four daemons started under `root` (options as for `start_daemons`),
    stopped after."""
    import pytest

    reason = (skip_reason or integration_skip_reason)()
    if reason:
        pytest.skip(reason)
    daemons = start_daemons(root, **options)
    try:
        yield daemons
    finally:
        daemons.stop_all()


def processes_mentioning(text: str) -> list[int]:
    """Pids whose command line contains `text`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if text.encode() in cmdline:
                found.append(int(entry.name))
    return found


def _cmdlines(pids: list[int]) -> list[str]:
    """What each leftover process is (for the failure message)."""
    out = []
    for pid in pids:
        try:
            out.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:200])
        except OSError:
            out.append("(gone)")
    return out


def loop_devices_on(path: Path) -> list[str]:
    """Loop devices whose backing file lies under `path`."""
    out = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if str(path) in line]


DRAIN_METHODS = {"vmmd": "vm.drain", "netd": "net.drain", "blockd": "volume.drain"}
DRAIN_TIMEOUT_S = 60.0


def drain(daemons: Daemons, timeout: float = DRAIN_TIMEOUT_S) -> dict[str, list[str]]:
    """Ask each running daemon that tears down in the background (hanabi_common.releasing)
    to finish its released sandboxes; {daemon: sandboxes still pending} (empty lists: done).
    A daemon that is down is skipped: its queue stays on disk for its next start."""
    left: dict[str, list[str]] = {}
    for name, method in DRAIN_METHODS.items():
        proc = daemons.procs.get(name)
        if proc is None or proc.poll() is not None:
            continue
        client = RpcClient(name, daemons.config.endpoint(name), timeout=timeout + 10)
        left[name] = client.call(method, {"timeout_s": timeout})["pending"]
    return left


def leftovers(daemons: Daemons, cid: str, in_pod: bool = False) -> list[str]:
    """Everything a deleted container might have left behind; empty when clean. `delete`
    returns before the daemons have removed what it held: this first drains them (`drain`:
    each daemon answers once its release queue is empty), then looks. `in_pod`: an app
    container of a pod whose VM still runs (its VM dir and share root are the pod's: only
    the container's own entries in the share are looked for)."""
    config = daemons.config
    found = []
    pending = {name: sids for name, sids in drain(daemons).items() if sids}
    if pending:
        found.append(f"releases not finished {pending}")
    if in_pod:
        return found + _pod_member_leftovers(daemons, cid)
    releasing = config.run_dir / "releasing"
    records = sorted(str(p.relative_to(releasing)) for p in releasing.glob("*/*.json")) if releasing.exists() else []
    if records:
        found.append(f"release records {records}")
    pids = (processes_mentioning(f"hanabi-{cid} ") + processes_mentioning(f"--sandbox {cid} ")
            + processes_mentioning(f"[hanabi {cid[:12]}]"))
    if pids:
        found.append(f"processes {pids} {_cmdlines(pids)}")
    if (config.sandboxes_dir / cid).exists():
        found.append(f"sandbox dir {config.sandboxes_dir / cid}: {os.listdir(config.sandboxes_dir / cid)}")
    volumes = list(config.block.volume_dir.glob(f"{cid}*")) if config.block.volume_dir.exists() else []
    if volumes:
        found.append(f"volumes {volumes}")
    loops = loop_devices_on(daemons.root)
    if loops:
        found.append(f"loop devices {loops}")
    vm_dir = config.run_dir / "vm"
    kept = kept_vm_records(config)  # the warm pool's VMs and the spare VMMs, by design
    kept_dirs = {Path(r["vm_dir"]).name for r in kept}
    if vm_dir.exists() and set(os.listdir(vm_dir)) - kept_dirs:
        found.append(f"vm dirs {sorted(set(os.listdir(vm_dir)) - kept_dirs)}")
    strays = unrecorded_vmms(config, kept)
    if strays:
        found.append(f"vmms no record refers to {strays} {_cmdlines(strays)}")
    netns_dir = config.run_dir / "netns"
    if netns_dir.exists() and any(netns_dir.iterdir()):
        found.append(f"network namespaces {os.listdir(netns_dir)}")
    kept_shares = {Path(r.get("share_dir") or "/").name for r in kept}
    shares = config.shares_dir
    if shares.exists() and set(os.listdir(shares)) - kept_shares:
        found.append(f"share roots {sorted(set(os.listdir(shares)) - kept_shares)}")
    share_mounts = mounts_under(shares)
    if share_mounts:
        found.append(f"share mounts {share_mounts}")
    servers = share_servers_under(shares)
    if servers:
        found.append(f"file servers {servers}")
    return found


def kept_vm_records(config) -> list[dict]:
    """vmmd's records of the VMs it keeps for no container: the warm pool's and the spare VMMs."""
    return [json.loads(p.read_text()) for store in ("pool", "spares")
            for p in (config.run_dir / store).glob("*/hypervisor.json")]


def kept_vmm_pids(config) -> set[int]:
    """Pids of the VMMs vmmd keeps for no container (the warm pool's, the spares): not leftovers."""
    return {r["pid"] for r in kept_vm_records(config)}


def unrecorded_vmms(config, kept: list[dict] | None = None) -> list[int]:
    """Pids of VMMs running from a VM directory of `config`'s run dir that no record of vmmd
    (a sandbox's, the pool's, a spare's; `kept`: the last two, read already) names: leaked
    VMs, whatever their QEMU `-name` says."""
    vm_root = f"{config.run_dir}/vm/"
    recorded = {Path(r["vm_dir"]).name for r in (kept_vm_records(config) if kept is None else kept)}
    recorded |= {Path(json.loads(p.read_text())["vm_dir"]).name
                 for p in config.sandboxes_dir.glob("*/hypervisor.json")}
    strays = []
    for pid in processes_mentioning(vm_root):
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        dirs = {a.decode(errors="replace").split(vm_root, 1)[1].split("/", 1)[0] for a in args if vm_root.encode() in a}
        if dirs - recorded:
            strays.append(pid)
    return strays


def share_servers_under(shares_dir: Path) -> list[int]:
    """Pids of 9P file servers (Firecracker's diods, hanabi_vmmd.share_server) serving an
    export root under `shares_dir`, known by the HANABI_SHARE_EXPORT in their environment.
    (QEMU's 9P server is QEMU itself: the process checks cover it.)"""
    from hanabi_vmmd.share_server import EXPORT_ENV

    want = f"{EXPORT_ENV}={str(shares_dir).rstrip('/')}/".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                environ = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(var.startswith(want) for var in environ):
                found.append(int(entry.name))
    return found


def _pod_member_leftovers(daemons: Daemons, cid: str) -> list[str]:
    config = daemons.config
    found = []
    pids = processes_mentioning(f"--container {cid} ") + processes_mentioning(f"[hanabi {cid[:12]}]")
    if pids:
        found.append(f"processes {pids} {_cmdlines(pids)}")
    if (config.sandboxes_dir / cid).exists():
        found.append(f"sandbox dir {config.sandboxes_dir / cid}: {os.listdir(config.sandboxes_dir / cid)}")
    own = list(config.shares_dir.glob(f"*/{cid}")) if config.shares_dir.exists() else []
    if own:
        found.append(f"share entries {own}")
    mounts = [m for m in mounts_under(config.shares_dir) if f"/{cid}/" in m or m.endswith(f"/{cid}")]
    if mounts:
        found.append(f"share mounts {mounts}")
    return found


def mounts_under(path: Path) -> list[str]:
    """The mount points at or below `path` in this mount namespace."""
    prefix = str(path).rstrip("/") + "/"
    points = []
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            point = line.split(" ")[4].replace("\\040", " ")
            if point == str(path) or point.startswith(prefix):
                points.append(point)
    return points
