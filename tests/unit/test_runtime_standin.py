"""The stand-in (hanabi_runtime.standin) runs once per container process for as long as it
runs: what it imports is host memory paid per container (issue 14). These run the real
stand-in in a fresh interpreter against a peer of agentd's io socket that speaks the io
protocol (hanabi_wire frames: attach, attached, output, exit), and pin the modules it
imported: the standard library and the listed hanabi modules, never pydantic, pyzmq, typer,
logging or argparse. The real agentd and VMs are covered by tests/integration/test_runtime_*.py.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from hanabi_agentd.iostream import IO_SOCKET_NAME
from hanabi_runtime.lean import records
from hanabi_runtime.standin import _parse, process_title
from hanabi_wire import FrameDecoder, b64e, encode_frame
from tests.helpers.lean import heavy_imports

# Every non-stdlib module an idle stand-in of a sandbox's init process may import (its
# netfollow thread included). A new entry here costs memory in every container.
ALLOWED = {
    "hanabi_agentd", "hanabi_agentd.iostream",
    "hanabi_common", "hanabi_common.atomic", "hanabi_common.doorbell", "hanabi_common.errors", "hanabi_common.rpc",
    "hanabi_common.rpc.wire",
    "hanabi_runtime", "hanabi_runtime.standin", "hanabi_runtime.proctitle", "hanabi_runtime.netfollow",
    "hanabi_runtime.procs", "hanabi_runtime.lean", "hanabi_runtime.lean.commands", "hanabi_runtime.lean.ids",
    "hanabi_runtime.lean.records", "hanabi_runtime.lean.rpc", "hanabi_runtime.lean.toml",
    "hanabi_wire", "hanabi_wire.constants", "hanabi_wire.framing", "hanabi_wire.messages", "hanabi_wire.schema",
    "_setproctitle",  # setproctitle's C extension, without its package (which imports logging)
}
# Standard library modules that cost a stand-in about 0.4-1 MiB each and that it does not need.
HEAVY_STDLIB = ("logging", "argparse", "asyncio", "concurrent", "email", "http", "pydoc", "unittest", "tomllib")
# Imported by site (the environment's .pth files and hooks), not by the stand-in.
SITE = {"sitecustomize", "_distutils_hack", "__main__"}

_PROBE = """
import atexit, json, sys
target = sys.argv.pop(1)
def _dump():
    with open(target, "w") as handle:
        json.dump(sorted(sys.modules), handle)
atexit.register(_dump)
from hanabi_runtime.standin import main
sys.exit(main())
"""


class IoPeer:
    """agentd's io socket as a stand-in sees it: confirms one attach, then, once told to,
    sends the process's output and its exit."""

    def __init__(self, run_dir: Path) -> None:
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(run_dir / IO_SOCKET_NAME))
        self.server.listen(1)
        self.attach: dict | None = None
        self.finish = threading.Event()
        self.thread = threading.Thread(target=self._serve, args=(b"hi\n", 3), daemon=True)
        self.thread.start()

    def _serve(self, output: bytes, code: int) -> None:
        conn, _ = self.server.accept()
        with conn:
            decoder = FrameDecoder(sync=False)
            while self.attach is None:
                for message in decoder.feed(conn.recv(65536)):
                    self.attach = message
            conn.sendall(encode_frame({"type": "attached"}))
            self.finish.wait(30)
            conn.sendall(encode_frame({"type": "output", "stream": "stdout", "data": b64e(output), "seq": 1}))
            conn.sendall(encode_frame({"type": "exit", "exit_code": code, "signal": None}))
            while conn.recv(65536):  # until the stand-in hangs up (its stdin's close comes first)
                pass

    def close(self) -> None:
        self.server.close()


@pytest.fixture
def run_dir(tmp_path):
    """A run dir with a config file as `create` leaves it: validated, so recorded."""
    run = tmp_path / "run"
    (run / "sbs" / "c1").mkdir(parents=True)
    config = tmp_path / "hanabi.toml"
    config.write_text(f'run_dir = "{run}"\n')
    records.stamp_config(run, config, config.read_text())
    return run, config


def test_an_idle_standin_imports_only_the_stdlib_and_its_few_modules(run_dir, tmp_path):
    run, config = run_dir
    # A network state file: the init's netfollow thread asks netd (absent: it warns, retries).
    (run / "sbs" / "c1" / "network.json").write_text("{}")
    fifo = run / "sbs" / "c1" / "start"
    os.mkfifo(fifo)
    peer = IoPeer(run)
    ready_r, ready_w = os.pipe()
    modules_file = tmp_path / "modules.json"
    try:
        proc = subprocess.Popen(
            [sys.executable, "-c", _PROBE, str(modules_file), "--sandbox", "c1", "--container", "c1",
             "--ready-fd", str(ready_w), "--start-fifo", str(fifo), "--config", str(config), "--title", "sleep 9"],
            pass_fds=(ready_w,), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        os.close(ready_w)
        with os.fdopen(ready_r, "rb") as ready:
            assert ready.readline() == b"ok\n"
        assert peer.attach == {"type": "attach", "sandbox_id": "c1", "container_id": "c1", "exec_id": "init"}
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        assert cmdline.startswith(process_title("sleep 9", "c1").encode())  # what ps and docker top show
        with open(fifo, "wb") as start:  # what `start` does
            start.write(b"x")
        # the netfollow thread runs after the start: let it ask netd (absent) once
        said = b""
        while b"network change not applied yet" not in said:
            line = proc.stderr.readline()
            assert line, f"the stand-in's netfollow did not ask netd: {said!r}"
            said += line
        peer.finish.set()
        out, _ = proc.communicate(timeout=30)
    finally:
        peer.close()
    assert proc.returncode == 3 and out == b"hi\n"  # the process's exit status and output
    modules = set(json.loads(modules_file.read_text()))
    assert heavy_imports(modules) == []
    ours = {m for m in modules if m.split(".")[0] not in sys.stdlib_module_names
            and not m.startswith("__editable__")} - SITE
    assert ours <= ALLOWED, sorted(ours - ALLOWED)
    assert "setproctitle" not in modules  # its C function only (hanabi_runtime.proctitle)
    assert not [m for m in modules if m.split(".")[0] in HEAVY_STDLIB]


def test_command_line():
    args = _parse(["--sandbox", "s", "--container=c", "--ready-fd", "7", "--tty", "--title", "sh -c x"])
    assert (args.sandbox, args.container, args.exec_id, args.ready_fd, args.tty, args.title, args.start_fifo,
            args.config, args.console_socket) == ("s", "c", "init", 7, True, "sh -c x", None, None, None)
    assert _parse(["--sandbox", "s", "--container", "c", "--ready-fd", "3", "--exec-id", "e1",
                   "--console-socket", "/x.sock", "--config", "/h.toml", "--start-fifo", "/f", "--go-fd=9"]).__dict__ == {
        "sandbox": "s", "container": "c", "exec_id": "e1", "ready_fd": 3, "go_fd": 9, "start_fifo": "/f",
        "config": "/h.toml", "console_socket": "/x.sock", "title": "", "tty": False}
    for argv, word in ((["--sandbox", "s", "--container", "c"], "--ready-fd required"),
                       (["--sandbox", "s", "--container", "c", "--ready-fd", "x"], "--ready-fd must be a number"),
                       (["--sandbox", "s", "--container", "c", "--ready-fd", "3", "--go-fd", "y"], "--go-fd must be a number"),
                       (["--sandbox", "s", "--container", "c", "--ready-fd", "3", "--bogus"], "unknown argument"),
                       (["--sandbox"], "--sandbox needs a value")):
        with pytest.raises(ValueError, match=word):
            _parse(argv)


def test_a_bad_command_line_exits_2_and_says_why():
    done = subprocess.run([sys.executable, "-m", "hanabi_runtime.standin", "--sandbox", "s"],
                          capture_output=True, timeout=30)
    assert done.returncode == 2 and b"--container, --ready-fd required" in done.stderr
