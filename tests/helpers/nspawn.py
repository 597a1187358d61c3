"""A Debian 12 machine booted with systemd as PID 1 in systemd-nspawn, for the install tests.

The root filesystem is made once with debootstrap from the host's Debian mirror (the one its
apt sources name) and cached under /var/cache/hanabi/nspawn, keyed by what it holds; each
machine boots on an overlayfs over it (upper dir in a temp dir), so the cache never changes.
The machine has its own network namespace with loopback only (`--private-network`), is not
registered with a host systemd (`--register=no --keep-unit`: the host's PID 1 need not be
systemd), and commands run inside it through nsenter into its PID 1's namespaces, with a clean
environment.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

CACHE_DIR = Path(os.environ.get("HANABI_NSPAWN_CACHE", "/var/cache/hanabi/nspawn"))
SUITE = "bookworm"
VARIANT = "minbase"
PACKAGES = ("systemd", "systemd-sysv", "python3", "python3-venv", "make", "iproute2", "procps")
BUILD_TIMEOUT_S = 900.0
BOOT_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 60.0
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
TOOLS = {"debootstrap": "debootstrap", "systemd-nspawn": "systemd-container", "nsenter": "util-linux"}
COMPLETE = ".hanabi-rootfs-complete"


def rootfs_key(suite: str = SUITE, variant: str = VARIANT, packages: tuple[str, ...] = PACKAGES) -> str:
    """A short hash of what the root filesystem is made of (a change makes a new one)."""
    text = f"{suite}:{variant}:{','.join(sorted(packages))}"
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def rootfs_path() -> Path:
    return CACHE_DIR / f"debian-{SUITE}-{rootfs_key()}"


def mirror_from_sources(text: str, suite: str = SUITE) -> str | None:
    """The main Debian mirror for `suite` in apt sources text (deb822 or one-line), or None."""
    for stanza in re.split(r"\n\s*\n", text):
        fields = dict(re.findall(r"^([A-Za-z-]+):\s*(.*)$", stanza, re.M))
        if "deb" in fields.get("Types", "").split() and suite in fields.get("Suites", "").split():
            for uri in fields.get("URIs", "").split():
                return uri.rstrip("/")
    for line in text.splitlines():
        parts = re.sub(r"\[[^]]*\]", "", line).split()
        if len(parts) >= 3 and parts[0] == "deb" and parts[2] == suite:
            return parts[1].rstrip("/")
    return None


def host_mirror() -> str | None:
    """The mirror the host's apt uses for the suite."""
    paths = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in paths:
        try:
            found = mirror_from_sources(path.read_text())
        except OSError:
            continue
        if found:
            return found
    return None


def skip_reason() -> str | None:
    """Why a machine cannot be booted here, or None."""
    if os.geteuid() != 0:
        return "needs root (debootstrap, overlayfs, systemd-nspawn)"
    for tool, package in TOOLS.items():
        if not shutil.which(tool):
            return f"{tool} is not installed (apt-get install {package})"
    if "overlay" not in Path("/proc/filesystems").read_text():
        return "the kernel has no overlayfs (the machine boots on an overlay over the cached rootfs)"
    if not (rootfs_path() / COMPLETE).exists():
        mirror = host_mirror()
        if mirror is None:
            return f"no cached rootfs at {rootfs_path()} and no Debian {SUITE} mirror in /etc/apt sources"
        try:
            urllib.request.urlopen(f"{mirror}/dists/{SUITE}/Release", timeout=15).close()
        except OSError as exc:
            return f"no cached rootfs at {rootfs_path()} and the Debian mirror {mirror} is not reachable: {exc}"
    return None


def ensure_rootfs(log: Path) -> tuple[Path, float]:
    """The cached rootfs, made with debootstrap if missing; and the seconds spent building it."""
    target = rootfs_path()
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with open(CACHE_DIR / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time; a second caller waits and reuses it
        if (target / COMPLETE).exists():
            return target, 0.0
        started = time.monotonic()
        staging = Path(tempfile.mkdtemp(prefix=f"{target.name}.build-", dir=CACHE_DIR))
        argv = ["debootstrap", f"--variant={VARIANT}", f"--include={','.join(PACKAGES)}", SUITE, str(staging)]
        mirror = host_mirror()
        if mirror:
            argv.append(mirror)
        with open(log, "ab") as out:
            done = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                  timeout=BUILD_TIMEOUT_S)
        if done.returncode != 0:
            shutil.rmtree(staging, ignore_errors=True)
            tail = log.read_text(errors="replace").splitlines()[-15:]
            raise RuntimeError(f"debootstrap failed ({done.returncode}):\n" + "\n".join(tail))
        (staging / COMPLETE).write_text(" ".join(argv) + "\n")
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
        return target, time.monotonic() - started


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


@dataclass
class Machine:
    """One booted machine: overlay over the rootfs, systemd-nspawn, and its PID 1."""

    rootfs: Path
    base: Path                                  # temp dir: upper, work, root, console.log
    name: str
    binds: list[tuple[Path, str]] = field(default_factory=list)  # read-only (host, machine path)
    proc: subprocess.Popen | None = None
    leader: int = 0

    @property
    def root(self) -> Path:
        return self.base / "root"

    @property
    def console_log(self) -> Path:
        return self.base / "console.log"

    def boot(self) -> float:
        """Mount the overlay, start systemd-nspawn -b, wait until systemd says it is up; seconds taken."""
        started = time.monotonic()
        for sub in ("upper", "work", "root"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                        f"lowerdir={self.rootfs},upperdir={self.base / 'upper'},workdir={self.base / 'work'}",
                        str(self.root)], check=True, capture_output=True, timeout=30)
        argv = ["systemd-nspawn", "--quiet", "-D", str(self.root), "--boot", "--register=no", "--keep-unit",
                "--private-network", f"--machine={self.name}", "--console=passive",
                *[f"--bind-ro={host}:{inside}" for host, inside in self.binds]]
        with open(self.console_log, "ab") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        deadline = time.monotonic() + BOOT_TIMEOUT_S
        while not self.leader:
            if self.proc.poll() is not None:
                raise RuntimeError(f"systemd-nspawn exited with {self.proc.returncode}: {self.console_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"no systemd under systemd-nspawn within {BOOT_TIMEOUT_S:.0f} s")
            self.leader = next((pid for pid in _children(self.proc.pid) if _comm(pid) == "systemd"), 0)
            time.sleep(0.1)
        # is-system-running --wait needs systemd's private socket, which appears a moment after exec.
        while True:
            state = self.run("systemctl", "is-system-running", "--wait", check=False,
                             timeout=max(deadline - time.monotonic(), 1)).stdout.strip()
            if state in ("running", "degraded"):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the machine's systemd is {state!r} after {BOOT_TIMEOUT_S:.0f} s: "
                                   f"{self.console_tail()}")
            time.sleep(0.2)
        return time.monotonic() - started

    def run(self, *argv: str, check: bool = True, timeout: float = 120,
            input: str | None = None) -> subprocess.CompletedProcess:
        """Run a command inside the machine (all of PID 1's namespaces, a clean environment)."""
        full = ["nsenter", "-t", str(self.leader), "-a", "env", "-i", f"PATH={PATH}", "LANG=C.UTF-8", *argv]
        done = subprocess.run(full, capture_output=True, text=True, timeout=timeout, input=input,
                              stdin=None if input is not None else subprocess.DEVNULL)
        if check and done.returncode != 0:
            raise AssertionError(f"`{' '.join(argv)}` in the machine failed ({done.returncode}):\n"
                                 f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        return done

    def console_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.console_log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def close(self) -> None:
        """Power the machine off (SIGTERM to nspawn asks systemd to), unmount, remove the temp dir."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        if os.path.ismount(self.root):
            if subprocess.run(["umount", str(self.root)], capture_output=True, timeout=30).returncode != 0:
                subprocess.run(["umount", "-l", str(self.root)], capture_output=True, timeout=30)
        shutil.rmtree(self.base, ignore_errors=True)
