"""The zygote (hanabi_runtime.zygote) with the real daemons and VMs: `create`, `run` and
`exec` run in a worker with their imports done, and behave as they do without it: the
stand-in is the CLI process's child (a subreaper inherits it, as containerd's shim does),
status, output and signals are the CLI's; without a zygote, or when it refuses, the CLI
runs the command itself; garbage and a kill -9 of the server break nothing."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from hanabi_runtime.zygote import protocol as P
from tests.helpers.hanabi import BIN, ZYGOTE, leftovers, zygote_answers
from tests.helpers.lean import heavy_imports, run_cli

pytestmark = pytest.mark.integration
SO_SNDBUFFORCE = 32  # <asm-generic/socket.h>; not in Python's socket module

# Runs in a subreaper (as containerd's shim is one): `create` through the CLI's zygote
# client, then reports the worker's imports and the stand-in's parent once the CLI's
# part is over (this process, the CLI, is still alive, so the parent must be us).
_SUBREAPER_CREATE = r"""
import ctypes, json, os, sys
ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
run_dir, config, bundle, cid = sys.argv[1:5]
from hanabi_runtime.lean.zygote import run_in_zygote
seen = {}
status = run_in_zygote(run_dir, ["hanabi-runtime", "--config", config, "create", "--bundle", bundle, cid],
                       on_exit=seen.update)
state = json.loads(open(os.path.join(run_dir, "sbs", cid, "state.json")).read())
pid = state["standin_pid"]
ppid = int([l for l in open(f"/proc/{pid}/status") if l.startswith("PPid:")][0].split()[1])
print(json.dumps({"status": status, "imported": seen.get("imported"), "standin": pid, "ppid": ppid,
                  "me": os.getpid()}))
"""


def _run_dir(hanabi) -> str:
    return str(hanabi.config.run_dir)


def _running(hanabi, bundle_path: str, cid: str, stdin) -> subprocess.Popen:
    """`hanabi-runtime run` of the bundle in the background, its stdout a pipe."""
    return subprocess.Popen([str(BIN / "hanabi-runtime"), "--config", str(hanabi.config_path), "run",
                             "--bundle", bundle_path, cid], stdout=subprocess.PIPE, stdin=stdin)


def test_create_in_a_worker_leaves_the_standin_to_the_cli_and_imports_nothing_more(hanabi, bundle, cid, tmp_path):
    path = bundle(["sleep", "600"])
    out = tmp_path / "out"  # a file, not a pipe: the stand-in keeps the stdio it was given
    with out.open("wb") as handle:
        done = subprocess.run([sys.executable, "-c", _SUBREAPER_CREATE, _run_dir(hanabi), str(hanabi.config_path),
                               path, cid], stdout=handle, stderr=handle, stdin=subprocess.DEVNULL, timeout=120)
    try:
        assert done.returncode == 0, out.read_text()
        report = json.loads(out.read_text().splitlines()[-1])
        assert report["status"] == 0
        assert report["imported"] == [], "add these to hanabi_runtime.zygote.server.PRELOAD"
        assert report["ppid"] == report["me"]  # the CLI's child, not the worker's
        assert hanabi.state(cid)["status"] == "created"
        hanabi.runtime("start", cid, check=True)
        assert hanabi.state(cid)["status"] == "running"
    finally:
        hanabi.runtime("delete", "--force", cid)
    assert leftovers(hanabi, cid) == []


def test_the_cli_side_of_a_create_stays_lean(hanabi, bundle, cid):
    done, modules = run_cli(["--config", str(hanabi.config_path), "create", "--bundle", bundle(["true"]), cid])
    try:
        assert done.returncode == 0, done.stderr.decode()
        assert heavy_imports(modules) == []  # the worker did the work
        assert hanabi.state(cid)["status"] == "created"
    finally:
        hanabi.runtime("delete", "--force", cid)


def test_run_gives_the_containers_status_and_output(hanabi, bundle, cid):
    done = hanabi.runtime("run", "--bundle", bundle(["sh", "-c", "echo out; echo err >&2; exit 3"]), cid)
    assert (done.returncode, done.stdout, done.stderr) == (3, b"out\n", b"err\n")
    assert leftovers(hanabi, cid) == []


def test_run_passes_sigterm_to_the_container(hanabi, bundle, cid):
    path = bundle(["sh", "-c", "trap 'echo got-term; exit 7' TERM; echo ready; while :; do sleep 0.1; done"])
    proc = _running(hanabi, path, cid, stdin=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"ready\n"
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        assert (proc.returncode, out) == (7, b"got-term\n")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        hanabi.runtime("delete", "--force", cid)
    assert leftovers(hanabi, cid) == []


def test_a_worker_takes_the_clis_environment_umask_and_limits(hanabi, bundle, cid, tmp_path):
    """HANABI_CONFIG (not --config) names the config, as the environment is the worker's
    too; a createRuntime hook the worker runs sees the CLI's umask and open-files limit."""
    seen = tmp_path / "seen"
    hook = tmp_path / "hook.sh"
    hook.write_text(f"#!/bin/sh\necho \"$(umask) $(ulimit -n)\" > {seen}\n")
    hook.chmod(0o755)
    path = bundle(["true"])
    config_path = os.path.join(path, "config.json")
    with open(config_path) as handle:
        config = json.load(handle)
    config["hooks"] = {"createRuntime": [{"path": str(hook)}]}
    with open(config_path, "w") as handle:
        json.dump(config, handle)
    log = hanabi.root / f"{ZYGOTE}.log"
    before = log.read_text()
    done = subprocess.run(["sh", "-c", 'umask 0027; ulimit -n 777; exec "$@"', "sh",
                           str(BIN / "hanabi-runtime"), "run", "--bundle", path, cid],
                          env={**os.environ, "HANABI_CONFIG": str(hanabi.config_path)},
                          stdin=subprocess.DEVNULL, capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode()
    assert seen.read_text().split() == ["0027", "777"]
    assert "running a command" in log.read_text()[len(before):]  # in a worker, not in the CLI
    assert leftovers(hanabi, cid) == []


def test_exec_in_a_worker(hanabi, bundle, cid):
    hanabi.runtime("run", "--detach", "--bundle", bundle(["sleep", "600"]), cid, check=True)
    try:
        done = hanabi.runtime("exec", cid, "sh", "-c", "echo from-exec; exit 4")
        assert (done.returncode, done.stdout) == (4, b"from-exec\n"), done.stderr.decode()
    finally:
        hanabi.runtime("delete", "--force", cid)
    assert leftovers(hanabi, cid) == []


def test_another_mount_namespace_is_refused_and_the_cli_runs_create_itself(hanabi, bundle, cid):
    log = hanabi.root / f"{ZYGOTE}.log"
    before = log.read_text()
    path = bundle(["true"])
    done = hanabi.runtime("create", "--bundle", path, cid, prefix=["unshare", "--mount", "--propagation", "unchanged"])
    try:
        assert done.returncode == 0, done.stderr.decode()
        assert hanabi.state(cid)["status"] == "created"
        assert "another mount or pid namespace" in log.read_text()[len(before):]
    finally:
        hanabi.runtime("delete", "--force", cid)


@pytest.mark.parametrize("datagram", [b"", b"not json", b"[1, 2]", b'{"op": "nope"}', b'{"op": "run"}',
                                      b'{"op": "spawn", "argv": ["x"]}', b"x" * (P.MAX_MESSAGE_BYTES + 10)],
                         ids=["empty", "garbage", "not-an-object", "unknown-op", "missing-fields", "wrong-op",
                              "oversized"])
def test_garbage_is_refused_and_the_zygote_keeps_serving(hanabi, datagram):
    path = P.socket_path(_run_dir(hanabi))
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.settimeout(30)
        sock.connect(path)
        sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, 4 << 20)  # root: past wmem_max
        sock.send(datagram)
        reply, _ = P.recv(sock)
        assert reply["op"] == P.REFUSE and reply["reason"]
    assert zygote_answers(path)


def test_without_the_zygote_the_cli_runs_create_itself_and_a_new_one_takes_the_stale_socket(hanabi, bundle, cid):
    path = P.socket_path(_run_dir(hanabi))
    hanabi.stop(ZYGOTE, signal.SIGKILL)
    try:
        assert os.path.exists(path) and not zygote_answers(path)  # stale after kill -9
        done = hanabi.runtime("run", "--bundle", bundle(["sh", "-c", "echo alone"]), cid)
        assert (done.returncode, done.stdout) == (0, b"alone\n"), done.stderr.decode()
    finally:
        hanabi.start_zygote()
    assert zygote_answers(path)
    assert leftovers(hanabi, cid) == []


def test_a_kill_9_of_the_server_leaves_a_command_in_flight_running(hanabi, bundle, cid):
    path = bundle(["sh", "-c", "echo started; read line; echo done-$line"])
    proc = _running(hanabi, path, cid, stdin=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline() == b"started\n"  # the worker is waiting for it now
        hanabi.stop(ZYGOTE, signal.SIGKILL)
        proc.stdin.write(b"ok\n")
        proc.stdin.close()
        assert proc.stdout.read() == b"done-ok\n"
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if ZYGOTE not in hanabi.procs:
            hanabi.start_zygote()
        hanabi.runtime("delete", "--force", cid)
    assert leftovers(hanabi, cid) == []
