"""The Firecracker VM's file share, host side: vmmd's ShareServer listens where Firecracker
connects a guest's vsock stream (`<vsock uds>_1025`) and hands each connection to a real diod;
a 9P2000.L client on that stream (the guest kernel's `trans=fd` stands in for) attaches to
the export, reads a file, and cannot walk out of the export. No Firecracker or 9P kernel
needed: the bytes on the stream are what the guest would exchange."""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from hanabi_vmmd import proc
from hanabi_vmmd.firecracker.backend import fail_vm
from hanabi_vmmd.hypervisor import VmHandle
from hanabi_vmmd.share_server import ShareServer, diod_path, listen_path, stop_servers
from hanabi_wire.constants import SHARE_EXPORT_NAME
from tests.helpers.hanabi import mounts_under
from tests.helpers.ninep import LOCK_BLOCKED, LOCK_SUCCESS, LOCK_UNLCK, O_RDWR, NinePClient, NinePError

pytestmark = pytest.mark.integration


@pytest.fixture
def server(tmp_path):
    if diod_path() is None:
        pytest.skip("diod is not installed (apt-get install diod)")
    export = tmp_path / "export"
    (export / "c1").mkdir(parents=True)
    (export / "c1" / "hello").write_text("hi from the host\n")
    (tmp_path / "secret").write_text("outside the export\n")
    share = ShareServer(listen_path(tmp_path / "fc-vsock.sock"), export, diod_path(), tmp_path / "diod.log")
    share.start()
    yield share
    share.close()


def connect(share: ShareServer) -> NinePClient:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(20)
    sock.connect(str(share.path))  # what Firecracker does for the guest's connect to port 1025
    return NinePClient(sock)


def test_diod_serves_the_export_over_the_vsock_stream(server, tmp_path):
    assert server.path == Path(f"{tmp_path}/fc-vsock.sock_1025")
    client = connect(server)
    assert client.version() == "9P2000.L"
    client.attach(1, SHARE_EXPORT_NAME)
    assert client.walk(1, 2, ["c1", "hello"]) == 2
    assert client.read_file(2) == b"hi from the host\n"
    # diod follows `..` out of its export (a hostile guest may send one): confined, it finds
    # only its own empty root there, never the host's files beside or above the export.
    for fid, names in enumerate((["..", "secret"], ["..", "..", "etc", "hostname"], ["..", "root"],
                                 ["..", "..", str(tmp_path).lstrip("/"), "secret"]), start=3):
        try:
            walked = client.walk(1, fid, names)
        except NinePError as exc:
            assert exc.errno == errno.ENOENT, names
        else:
            assert walked < len(names), names
    # Only the export can be attached, not a host path.
    other = connect(server)
    other.version()
    with pytest.raises(NinePError):
        other.attach(1, str(tmp_path))
    assert mounts_under(server.export) == []  # the server's binds live in its own namespace


def test_close_ends_every_diod_of_the_export(server):
    client = connect(server)
    client.version()
    deadline = time.monotonic() + 10
    while not server.served:
        assert time.monotonic() < deadline, "no diod was started"
        time.sleep(0.02)
    pid = server.served[0]
    assert proc.is_alive(pid, None)
    server.close()
    assert not server.path.exists()
    assert proc.wait_gone(pid, None, 5.0)
    assert stop_servers(server.export) == []
    with pytest.raises((EOFError, BrokenPipeError, ConnectionResetError)):  # the stream is gone
        client.version()


def wait_until(condition, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_a_diod_that_dies_mid_session_fails_the_vm_and_never_hangs(server, tmp_path, caplog):
    """Issue 12 item 4: the guest's transport is gone (its file operations fail with EIO from
    then on), there is a log line, and the owning backend's policy ends the VM (a real
    process stands in for Firecracker here: fail_vm SIGKILLs it, vmmd's reaper records the
    exit). The server itself keeps serving: a new connection gets a new diod."""
    vmm = subprocess.Popen(["sleep", "600"], start_new_session=True)
    handle = VmHandle(sandbox_id="sb-share-dies", hypervisor="firecracker", pid=vmm.pid,
                      start_time=proc.start_time(vmm.pid) or 0, control_socket=tmp_path / "api",
                      agent_socket=tmp_path / "vsock", vm_dir=tmp_path, process=vmm)
    reasons: list[str] = []

    def policy(reason: str) -> None:
        reasons.append(reason)
        fail_vm(handle, reason)

    server.on_failure = policy
    caplog.set_level(logging.INFO, logger="hanabi")
    try:
        client = connect(server)
        client.version()
        client.attach(1, SHARE_EXPORT_NAME)
        assert client.walk(1, 2, ["c1", "hello"]) == 2
        wait_until(lambda: server.served, "no diod was started")
        diod = server.served[0]
        os.kill(diod, signal.SIGKILL)
        # The stream is closed at once: the client gets an error, not a hang (timeout 20 s).
        with pytest.raises((EOFError, BrokenPipeError, ConnectionResetError)):
            client.read_file(2)
        wait_until(lambda: reasons, "the failure policy was never called")
        assert f"pid {diod}" in reasons[0] and "died with status 137" in reasons[0]
        assert vmm.wait(timeout=10) == -signal.SIGKILL  # the sandbox's VM is ended
        assert any("9P server died" in r.getMessage() and "EIO" in r.getMessage() for r in caplog.records)
        # The next connection is served by a new diod.
        again = connect(server)
        again.version()
        again.attach(1, SHARE_EXPORT_NAME)
        assert again.walk(1, 2, ["c1", "hello"]) == 2
        assert again.read_file(2) == b"hi from the host\n"
        assert len(server.served) == 2 and server.served[1] != diod
        # A client that hangs up (a guest shutting down) is no failure, whatever diod's status
        # (Debian's 1.0.24 at times dies of SIGSEGV on that way out).
        again.sock.close()
        wait_until(lambda: server.served[1] in server.ended, "the second diod did not end")
        assert server.ended[server.served[1]] in (0, -signal.SIGSEGV) and len(reasons) == 1
    finally:
        if vmm.poll() is None:
            vmm.kill()
            vmm.wait()


def test_a_lock_through_diod_is_a_host_flock(server):
    """Unlike QEMU's 9P server, diod turns a client's Tlock into flock(2) on its own open
    file (whole file, never blocking): a Firecracker guest's lock excludes host processes and
    other VMs, and a host process's lock makes the guest's fail (README)."""
    import fcntl

    target = server.export / "c1" / "hello"
    client = connect(server)
    client.version()
    client.attach(1, SHARE_EXPORT_NAME)
    client.walk(1, 2, ["c1", "hello"])
    client.lopen(2, O_RDWR)
    assert client.lock(2) == LOCK_SUCCESS
    with open(target) as host:
        with pytest.raises(BlockingIOError):
            fcntl.flock(host, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert client.lock(2, LOCK_UNLCK) == LOCK_SUCCESS
        fcntl.flock(host, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free now
        client.walk(1, 3, ["c1", "hello"])
        client.lopen(3, O_RDWR)
        assert client.lock(3) == LOCK_BLOCKED  # the host holds it
