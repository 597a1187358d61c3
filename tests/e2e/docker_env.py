"""A private dockerd (Debian's docker.io) that runs containers with the test session's hanabi daemons.

Everything lives under two temp dirs: a short one (AF_UNIX paths are limited to 108 bytes and
containerd puts sockets under the exec root) with the data root, exec root, API socket, pid
file and daemon.json, and pytest's own temp dir with the hanabi daemons and the logs. The host's
network is never touched: `--bridge none --iptables=false --ip-masq=false`.
Every docker call gets DOCKER_HOST (and a private DOCKER_CONFIG) in its own environment and a
timeout.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.e2e.engines import import_busybox
from tests.helpers.hanabi import (BIN, Daemons, integration_skip_reason, kept_vmm_pids, loop_devices_on,
                                  processes_mentioning)

IMAGE = "hanabi-busybox:test"
RUNTIME = "hanabi"
DOCKER_CANDIDATES = ("/usr/bin/docker",)  # Debian's client matches Debian's dockerd (20.10)
START_TIMEOUT_S = 60.0


def docker_binary() -> str | None:
    """The docker client to use: Debian's if installed, else the one on PATH."""
    for candidate in DOCKER_CANDIDATES:
        if os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("docker")


def e2e_skip_reason() -> str | None:
    """Why the Docker end-to-end tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (dockerd, QEMU, loop files)"
    for binary in ("dockerd", "containerd", "containerd-shim-runc-v2"):
        if not shutil.which(binary):
            return f"{binary} is not installed (apt-get install docker.io)"
    if not docker_binary():
        return "the docker client is not installed (apt-get install docker.io)"
    if not shutil.which("tar"):
        return "tar is not installed"
    return integration_skip_reason()


def mounts_under(*roots: Path) -> list[str]:
    """Mount points (from /proc/self/mountinfo) at or below any of `roots`, deepest first."""
    found = []
    prefixes = [str(root).rstrip("/") for root in roots]
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].encode().decode("unicode_escape")  # \040 and friends
        if any(point == p or point.startswith(p + "/") for p in prefixes):
            found.append(point)
    return sorted(set(found), key=lambda p: p.count("/"), reverse=True)


def tap_devices() -> set[str]:
    """Names of the tun/tap devices on the host."""
    out = subprocess.run(["ip", "-o", "link", "show", "type", "tun"], capture_output=True, text=True,
                         timeout=10).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line}


def _terminate(pids: list[int], grace: float = 10.0) -> None:
    """SIGTERM, wait up to `grace`, then SIGKILL."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
        time.sleep(0.1)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


class LineReader:
    """Lines of a subprocess's stdout, read by a thread, waited for with a deadline."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for raw in iter(self.proc.stdout.readline, b""):
            self._queue.put(raw.decode(errors="replace").rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, text: str, timeout: float) -> bool:
        """True once a line containing `text` has arrived (or had already); False on timeout or EOF."""
        if any(text in line for line in self.lines):
            return True
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._queue.get(timeout=left)
            except queue.Empty:
                return False
            if line is None:
                return False
            self.lines.append(line)
            if text in line:
                return True
        return False

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


@dataclass
class PrivateDocker:
    """A dockerd of our own, and the docker client pointed at it."""

    base: Path                       # short temp dir: data root, exec root, socket, pid file
    logs: Path                       # pytest temp dir: dockerd.log
    hanabi: Daemons
    docker: str = field(default_factory=lambda: docker_binary() or "docker")
    proc: subprocess.Popen | None = None
    storage_driver: str = ""
    setup_seconds: float = 0.0       # hanabi daemons + dockerd + image import, for the report

    @property
    def socket(self) -> Path:
        return self.base / "docker.sock"

    @property
    def exec_root(self) -> Path:
        return self.base / "x"

    @property
    def data_root(self) -> Path:
        return self.base / "data"

    @property
    def log_path(self) -> Path:
        return self.logs / "dockerd.log"

    def env(self) -> dict[str, str]:
        """The environment of one docker client call."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
        env["DOCKER_HOST"] = f"unix://{self.socket}"
        env["DOCKER_CONFIG"] = str(self.base / "client-config")
        return env

    # -- dockerd ------------------------------------------------------------------------
    def write_daemon_json(self) -> Path:
        from hanabi_runtime.docker_install import add_runtimes, render_daemon_json
        doc = add_runtimes({}, str(BIN / "hanabi-runtime"), str(self.hanabi.config_path))
        path = self.base / "daemon.json"
        path.write_bytes(render_daemon_json(doc))
        return path

    def start(self) -> None:
        """Start dockerd with overlay2 (vfs if overlay2 does not work here) and wait for it."""
        config = self.write_daemon_json()
        errors = []
        for driver in ("overlay2", "vfs"):
            try:
                self._start_with(config, driver)
                self.storage_driver = driver
                return
            except RuntimeError as exc:
                errors.append(f"{driver}: {exc}")
                self.stop_dockerd()
                self._unmount_all()
                shutil.rmtree(self.data_root, ignore_errors=True)
        raise RuntimeError("dockerd did not start: " + " | ".join(errors))

    def _start_with(self, config: Path, driver: str) -> None:
        argv = ["dockerd", "--data-root", str(self.data_root), "--exec-root", str(self.exec_root),
                "-H", f"unix://{self.socket}", "--pidfile", str(self.base / "docker.pid"),
                "--config-file", str(config), "--bridge", "none", "--iptables=false", "--ip-masq=false",
                "--ip6tables=false", "--storage-driver", driver, "--log-level", "debug",
                "--containerd-namespace", "hanabi-e2e", "--containerd-plugins-namespace", "hanabi-e2e-plugins"]
        log = open(self.log_path, "ab")
        log.write(f"\n=== {' '.join(argv)}\n".encode())
        log.flush()
        self.proc = subprocess.Popen(argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                     start_new_session=True, env=self.env())
        log.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dockerd exited with {self.proc.returncode}: {self.log_tail(15)}")
            if self.socket.exists():
                info = self.run("info", "--format", "{{json .}}", timeout=10)
                if info.returncode == 0:
                    got = json.loads(info.stdout).get("Driver")
                    if got != driver:
                        raise RuntimeError(f"dockerd runs with storage driver {got!r}, not {driver!r}")
                    return
            time.sleep(0.2)
        raise RuntimeError(f"`docker info` did not answer within {START_TIMEOUT_S:.0f} s: {self.log_tail(15)}")

    def stop_dockerd(self) -> None:
        """SIGTERM dockerd, wait, SIGKILL; then end its containerd and shims."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None
        # containerd (--config <exec root>/...) and the shims (-address <exec root>/...)
        _terminate(processes_mentioning(str(self.base)))

    def _unmount_all(self) -> list[str]:
        """Unmount whatever is left under our temp dirs; returns what was mounted."""
        left = mounts_under(self.base, self.hanabi.root)
        for point in left:
            done = subprocess.run(["umount", point], capture_output=True, timeout=20)
            if done.returncode != 0:
                subprocess.run(["umount", "-l", point], capture_output=True, timeout=20)
        return left

    def close(self) -> None:
        """Remove every container, stop dockerd, containerd, the shims and the hanabi daemons."""
        try:
            if self.proc is not None and self.proc.poll() is None:
                ids = self.run("ps", "-aq", timeout=30).stdout.split()
                if ids:
                    self.run("rm", "-f", *ids, timeout=90)
        finally:
            self.stop_dockerd()
            self.hanabi.stop_all()
            self._unmount_all()
            shutil.rmtree(self.base, ignore_errors=True)

    def log_tail(self, lines: int = 40, since: int = 0) -> str:
        """The end of dockerd's log (from byte offset `since`)."""
        try:
            with open(self.log_path, "rb") as handle:
                handle.seek(since)
                text = handle.read().decode(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # -- the client ---------------------------------------------------------------------
    def run(self, *args: str, input: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
        """`docker ARGS...` against our dockerd, output captured as text."""
        try:
            return subprocess.run([self.docker, *args], input=input, capture_output=True, text=True,
                                  timeout=timeout, env=self.env(),
                                  stdin=None if input is not None else subprocess.DEVNULL)
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(f"`docker {' '.join(args)}` did not finish within {timeout} s; "
                                 f"output so far: {exc.stdout!r} {exc.stderr!r}") from None

    def check(self, *args: str, input: str | None = None, timeout: float = 60) -> str:
        """`docker ARGS...` that must succeed; returns stdout."""
        done = self.run(*args, input=input, timeout=timeout)
        assert done.returncode == 0, f"`docker {' '.join(args)}` failed ({done.returncode}): {done.stderr.strip()}"
        return done.stdout

    def popen(self, *args: str, **kwargs) -> subprocess.Popen:
        """Start `docker ARGS...` in the background (stdout piped unless told otherwise)."""
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("stderr", subprocess.STDOUT)
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.Popen([self.docker, *args], env=self.env(), **kwargs)

    def run_hanabi(self, *options: str, cmd: tuple[str, ...] | list[str] = (), rm: bool = True,
                   input: str | None = None, timeout: float = 90, runtime: str = RUNTIME) -> subprocess.CompletedProcess:
        """`docker run [--rm] --runtime=hanabi --network none OPTIONS IMAGE CMD...`."""
        args = ["run", *(["--rm"] if rm else []), f"--runtime={runtime}", "--network", "none", *options,
                IMAGE, *cmd]
        return self.run(*args, input=input, timeout=timeout)

    def import_busybox(self) -> None:
        """Build the test image locally: a busybox rootfs through `docker import`."""
        import_busybox([self.docker], IMAGE, self.logs, self.env(), "docker")

    def wait_for_log(self, name: str, text: str, timeout: float = 30) -> str:
        """Poll `docker logs NAME` until it contains `text`; returns the logs."""
        deadline = time.monotonic() + timeout
        logs = ""
        while time.monotonic() < deadline:
            done = self.run("logs", name, timeout=20)
            logs = done.stdout + done.stderr
            if text in logs:
                return logs
            time.sleep(0.3)
        raise AssertionError(f"{text!r} did not appear in the logs of {name} within {timeout} s: {logs!r}")

    def inspect(self, name: str, template: str) -> str:
        return self.check("inspect", "-f", template, name, timeout=20).strip()

    def remove(self, *names: str) -> None:
        """`docker rm -f` that does not care whether the containers exist."""
        if names:
            self.run("rm", "-f", *names, timeout=60)


def make_base_dir() -> Path:
    """A short temp dir for dockerd (containerd's sockets live under the exec root); the
    tests' fixture makes the same (tests/e2e/engines.py), bench/ calls this."""
    return Path(tempfile.mkdtemp(prefix="hbe-", dir="/tmp"))


def hanabi_leftovers(env: PrivateDocker) -> dict[str, set[str]]:
    """What hanabi and docker have right now that a removed container could leave behind."""
    daemons = env.hanabi
    config = daemons.config
    daemon_pids = {proc.pid for proc in daemons.procs.values()}
    ours = set(processes_mentioning(str(daemons.root))) - daemon_pids - kept_vmm_pids(config)
    qemu = ours & set(processes_mentioning("-name hanabi-"))
    # A stand-in's process title is the command it stands for, then "[hanabi <id12>]".
    standins = set(processes_mentioning("[hanabi ")) - daemon_pids
    processes = ({f"qemu {pid}" for pid in qemu} | {f"stand-in {pid}" for pid in standins}
                 | {f"other {pid}: {_cmdline(pid)}" for pid in ours - qemu - standins})
    sbs = config.sandboxes_dir
    volume_dir = config.block.volume_dir
    return {
        "processes": processes,
        "shims": {str(pid) for pid in processes_mentioning("containerd-shim")
                  if pid in set(processes_mentioning(str(env.base)))},
        "state dirs": set(os.listdir(sbs)) if sbs.exists() else set(),
        "volumes": set(os.listdir(volume_dir)) if volume_dir.exists() else set(),
        "loop devices": set(loop_devices_on(daemons.root)),
        "mounts": set(mounts_under(env.base, daemons.root)),
        "taps": tap_devices(),
    }


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:160]
    except OSError:
        return "?"
