"""Docker with the hanabi runtime: exec, top, stats, pause, tty, VM sizing and the mounts Docker makes.

`busy` is one running container shared by the tests that only look at it (exec, top, stats,
pause, the default VM size); the others each run their own short container.
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import signal
import struct
import termios
import time

import pytest

from tests.e2e.docker_env import IMAGE, RUNTIME

pytestmark = pytest.mark.e2e

DEFAULT_VM_MIB = 256


def mem_total_mib(text: str) -> float:
    match = re.search(r"MemTotal:\s+(\d+) kB", text)
    assert match, f"no MemTotal in {text!r}"
    return int(match.group(1)) / 1024


@pytest.fixture(scope="module")
def busy(docker):
    """A running container (no --memory, no --cpus) that printed its MemTotal and nproc."""
    cname = "e2e-busy"
    docker.remove(cname)
    docker.check("run", "-d", f"--runtime={RUNTIME}", "--network", "none", "--name", cname, IMAGE,
                 "sh", "-c", "grep MemTotal /proc/meminfo; echo nproc=$(nproc); echo ready; exec sleep 3600",
                 timeout=90)
    docker.wait_for_log(cname, "ready")
    yield cname
    docker.remove(cname)


# -- exec, top, stats, pause ------------------------------------------------------------------

def test_exec_runs_in_the_container_with_its_exit_code(docker, busy):
    done = docker.run("exec", busy, "echo", "hi", timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (0, "hi\n", "")
    done = docker.run("exec", busy, "sh", "-c", "exit 5", timeout=60)
    assert done.returncode == 5, done.stderr


def test_exec_many_times_each_returns(docker, busy):
    """Short execs, one after another: each must end (its output and its exit both reach docker)."""
    for index in range(12):
        done = docker.run("exec", busy, "echo", f"n{index}", timeout=20)
        assert (done.returncode, done.stdout) == (0, f"n{index}\n"), done.stderr


def test_top_lists_the_container_command(docker, busy):
    out = docker.check("top", busy, timeout=60)
    assert "sleep 3600" in out, out


def test_stats_shows_memory(docker, busy):
    out = docker.check("stats", "--no-stream", "--format", "{{.MemUsage}}", busy, timeout=60).strip()
    match = re.match(r"([\d.]+)\s*([KMG]i?B|B)\s*/\s*([\d.]+)\s*([KMG]i?B|B)", out)
    assert match, f"no memory figure in {out!r}"
    assert float(match.group(1)) > 0, f"memory usage is zero: {out!r}"


def test_pause_and_unpause(docker, busy):
    docker.check("pause", busy, timeout=60)
    try:
        assert docker.inspect(busy, "{{.State.Status}} {{.State.Paused}}") == "paused true"
    finally:
        docker.check("unpause", busy, timeout=60)
    assert docker.inspect(busy, "{{.State.Status}} {{.State.Paused}}") == "running false"
    done = docker.run("exec", busy, "echo", "alive", timeout=60)
    assert (done.returncode, done.stdout) == (0, "alive\n"), done.stderr


# -- a terminal -------------------------------------------------------------------------------

CURSOR_QUERY = b"\x1b[6n"   # busybox's line editor asks the terminal where the cursor is
# The prompt, possibly redrawn after the cursor answer ("\r/ # \x1b[J": clear to the end).
PROMPT = re.compile(r"[#$] (?:\x1b\[J)?(?:\r|$)", re.M)


class Terminal:
    """A docker command on the slave side of a new pty; the test is the terminal on the master side."""

    def __init__(self, argv: list[str], env: dict[str, str], rows: int = 40, cols: int = 120) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: docker on a real controlling terminal
            try:
                fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
                os.execve(argv[0], argv, env)
            finally:
                os._exit(127)
        self.seen = bytearray()
        self.mark = 0            # expect() looks at what came after the last match only

    def resize(self, rows: int, cols: int) -> None:
        """Set the window size; the kernel sends SIGWINCH to docker, which passes it on."""
        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def type(self, line: str) -> None:
        os.write(self.fd, line.encode() + b"\r")

    def expect(self, pattern: re.Pattern | str, timeout: float) -> bool:
        """Read until `pattern` matches the output since the last match; answer cursor queries."""
        pattern = re.compile(pattern, re.M) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            match = pattern.search(self.seen[self.mark:].decode(errors="replace"))
            if match:
                self.mark += len(self.seen[self.mark:].decode(errors="replace")[:match.end()].encode())
                return True
            left = deadline - time.monotonic()
            if left <= 0 or not self._read(left):
                return False

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return True
        try:
            chunk = os.read(self.fd, 4096)
        except OSError:  # EIO: the other side is closed
            return False
        if not chunk:
            return False
        for _ in range(chunk.count(CURSOR_QUERY)):
            os.write(self.fd, b"\x1b[1;1R")
        self.seen += chunk.replace(CURSOR_QUERY, b"")
        return True

    def wait(self, timeout: float) -> int | None:
        """docker's exit status, or None if it is still running after `timeout`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            waited, status = os.waitpid(self.pid, os.WNOHANG)
            if waited:
                self.pid = 0
                return os.waitstatus_to_exitcode(status)
            self._read(0.2)  # keep draining the terminal
        return None

    def close(self) -> None:
        if self.pid:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        os.close(self.fd)

    def __repr__(self) -> str:
        return f"terminal output {bytes(self.seen)!r}"


def _size_becomes(term: Terminal, size: str, timeout: float) -> bool:
    """Ask `stty size` until the guest answers `size` (docker forwards SIGWINCH asynchronously)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        term.type("stty size")
        if not term.expect(r"^\d+ \d+\r?$", max(0.1, deadline - time.monotonic())):
            return False
        if term.seen[:term.mark].decode(errors="replace").rstrip().endswith(size):
            return True
    return False


def _answer_and_resize(term: Terminal) -> None:
    """The shell answers a typed command, sees the window size, and follows a resize."""
    assert term.expect(PROMPT, 60), f"no shell prompt: {term!r}"
    term.type("echo $((6*7))")
    assert term.expect(r"^42\r?$", 30), f"no 42: {term!r}"
    term.type("stty size")
    assert term.expect(r"^40 120\r?$", 30), f"the initial window size did not reach the guest: {term!r}"
    term.resize(50, 132)
    assert _size_becomes(term, "50 132", 30), f"the resize did not reach the guest: {term!r}"
    term.type("exit")
    status = term.wait(30)
    assert status == 0, f"docker ended with {status} after `exit` (None: still running): {term!r}"


def test_run_interactive_tty_answers_typed_commands_and_follows_resizes(docker, name):
    term = Terminal([docker.docker, "run", "-it", "--rm", f"--runtime={RUNTIME}", "--network", "none",
                     "--name", name, IMAGE, "sh"], docker.env())
    try:
        _answer_and_resize(term)
    finally:
        term.close()


def test_exec_interactive_tty(docker, busy):
    term = Terminal([docker.docker, "exec", "-it", busy, "sh"], docker.env())
    try:
        _answer_and_resize(term)
    finally:
        term.close()


# -- VM sizing --------------------------------------------------------------------------------

def test_default_vm_memory_is_about_256_mib(docker, busy):
    total = mem_total_mib(docker.wait_for_log(busy, "ready"))
    assert 0.7 * DEFAULT_VM_MIB <= total <= 1.1 * DEFAULT_VM_MIB, f"MemTotal {total:.0f} MiB"


def test_memory_and_cpus_size_the_vm(docker, name):
    """--memory 512m: guest memory is the limit plus the overhead; --cpus 2: two vCPUs."""
    done = docker.run_hanabi("--name", name, "--memory", "512m", "--cpus", "2",
                             cmd=["sh", "-c", "grep MemTotal /proc/meminfo; echo nproc=$(nproc)"])
    assert done.returncode == 0, done.stderr
    total = mem_total_mib(done.stdout)
    assert total >= 512 * 0.9 and "nproc=2" in done.stdout, f"MemTotal {total:.0f} MiB; {done.stdout!r}"


# -- what Docker mounts -------------------------------------------------------------------------

def test_read_only_root_with_a_tmpfs(docker, name):
    """--read-only refuses writes to the root; --tmpfs /scratch is a writable tmpfs there."""
    done = docker.run_hanabi("--name", name, "--read-only", "--tmpfs", "/scratch",
                             cmd=["sh", "-c", "touch /x 2>/dev/null && echo root-wrote || echo root-refused; "
                                              "mount | grep ' /scratch '; touch /scratch/y && echo scratch-wrote"])
    assert done.returncode == 0, done.stderr
    assert "root-refused" in done.stdout, done.stdout
    assert re.search(r"^tmpfs on /scratch type tmpfs", done.stdout, re.M), done.stdout
    assert "scratch-wrote" in done.stdout, done.stdout


def test_hostname_hosts_and_resolv_conf(docker, name):
    """The files Docker makes and bind-mounts reach the guest.

    With --network none Docker itself (runc too) writes no line for the hostname into
    /etc/hosts, so an --add-host entry shows that the guest sees Docker's file, not the image's.
    """
    done = docker.run_hanabi("--name", name, "--hostname", "foo", "--add-host", "db.example:10.1.2.3",
                             cmd=["sh", "-c", "hostname; echo ---; cat /etc/hostname; echo ---; cat /etc/hosts; "
                                              "echo ---; test -e /etc/resolv.conf && echo resolv-ok"])
    assert done.returncode == 0, done.stderr
    name_out, hostname_file, hosts, resolv = done.stdout.split("---\n")
    assert name_out.strip() == "foo"
    assert hostname_file.strip() == "foo"
    assert re.search(r"^127\.0\.0\.1\s+localhost", hosts, re.M), hosts
    assert re.search(r"^10\.1\.2\.3\s+db\.example$", hosts, re.M), hosts
    assert resolv.strip() == "resolv-ok"


def test_bind_mounts_of_a_host_directory_and_file(docker, name, tmp_path):
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "hello.txt").write_text("from the host dir\n")
    (tmp_path / "single.conf").write_text("from the host file\n")
    done = docker.run_hanabi("--name", name, "-v", f"{tmp_path / 'dir'}:/data",
                             "-v", f"{tmp_path / 'single.conf'}:/etc/single.conf:ro",
                             cmd=["sh", "-c", "cat /data/hello.txt /etc/single.conf"])
    assert done.returncode == 0, done.stderr
    assert done.stdout == "from the host dir\nfrom the host file\n"


def test_init_runs_the_process_under_docker_init(docker, name):
    done = docker.run_hanabi("--name", name, "--init",
                             cmd=["sh", "-c", "ps -o pid,args; echo init-ran"])
    assert done.returncode == 0, done.stderr
    assert "init-ran" in done.stdout
    assert "docker-init" in done.stdout, done.stdout
