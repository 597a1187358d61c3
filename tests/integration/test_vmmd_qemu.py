"""vmmd with real QEMU and the real guest image: lifecycle, hot-plug, restart recovery, errors.

Each test starts its own `hanabi-vmmd serve` (only vmmd) under a temp run dir, and kills
every QEMU it started on the way out, whatever happened (by the VM dir in their argv).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import struct
import subprocess
import time
from pathlib import Path

import pytest
import zmq

from hanabi_common.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from hanabi_common.rpc.client import RpcClient
from hanabi_common.rpc.envelope import PROTOCOL, decode_reply
from hanabi_vmmd import proc
from hanabi_vmmd.agent_probe import wait_agent_ready
from hanabi_vmmd.client import VmmdClient
from hanabi_vmmd.qmp import QmpClient
from tests.helpers.hanabi import GUEST_DIR, Daemons, integration_skip_reason, processes_mentioning

pytestmark = pytest.mark.integration


class Vmmd(Daemons):
    """One vmmd under a temp dir, with a typed client."""

    @property
    def client(self) -> VmmdClient:
        return VmmdClient(self.config, timeout=60)

    @property
    def vm_root(self) -> Path:
        return self.root / "run" / "vm"


def kill_all_vms(vm_root: Path) -> None:
    """SIGKILL every process whose argv mentions a VM dir under `vm_root`; wait for them."""
    for pid in processes_mentioning(str(vm_root) + "/"):
        started = proc.start_time(pid)
        if proc.kill_verified(pid, started):
            proc.wait_gone(pid, started, 10)


@pytest.fixture
def make_vmmd(tmp_path_factory):
    """make_vmmd(guest_dir=..., extra_vmm=...) -> a running vmmd; all torn down after the test."""
    reason = integration_skip_reason()
    if reason:
        pytest.skip(reason)
    started: list[Vmmd] = []

    def make(guest_dir: Path = GUEST_DIR, extra_vmm: str = "") -> Vmmd:
        root = tmp_path_factory.mktemp("vmmd")
        config = root / "hanabi.toml"
        config.write_text(f'run_dir = "{root}/run"\nlog_level = "debug"\n'
                          f'[vmm]\nguest_dir = "{guest_dir}"\nstop_timeout_s = 5.0\n'
                          # these tests count VM directories and VMMs: no spare VMMs (test_spare_vmms)
                          f'spare_vmms = 0\n{extra_vmm}')
        daemon = Vmmd(root=root, config_path=config)
        started.append(daemon)
        daemon.start("vmmd")
        return daemon

    yield make
    for daemon in started:
        try:
            daemon.stop_all()
        finally:
            kill_all_vms(daemon.vm_root)


@pytest.fixture
def vmmd(make_vmmd) -> Vmmd:
    return make_vmmd()


def read_frame(sock: socket.socket) -> dict:
    """One agent protocol frame (4-byte big-endian length, JSON)."""
    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            assert chunk, "agent socket closed"
            data += chunk
        return data
    (length,) = struct.unpack(">I", exactly(4))
    return json.loads(exactly(length))


def agent_hello(path: str, timeout: float = 60) -> dict:
    """Connect to the agent socket and wait for the guest agent's first frame."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        return read_frame(sock)


def assert_gone(daemon: Vmmd, sandbox_id: str, pid: int, vm_dir: Path) -> None:
    assert not proc.is_alive(pid, None), f"qemu {pid} still runs"
    assert processes_mentioning(f"hanabi-{sandbox_id}\0".replace("\0", " ")) == []
    assert not vm_dir.exists(), f"{vm_dir} left behind: {list(vm_dir.iterdir())}"
    assert not (daemon.config.sandboxes_dir / sandbox_id).exists()


def test_lifecycle_with_disk_and_pause(vmmd, tmp_path):
    client = vmmd.client
    began = time.monotonic()
    info = client.create("life-1", memory_mib=192)
    create_s = time.monotonic() - began
    assert info.state == "running" and info.hypervisor == "qemu" and info.memory_mib == 192
    assert info.accel in ("kvm", "tcg")
    assert stat.S_ISSOCK(os.stat(info.agent_socket).st_mode)
    assert stat.S_ISSOCK(os.stat(info.control_socket).st_mode)
    assert Path(info.console_log).exists()
    assert proc.is_alive(info.pid, None)
    if json.loads((vmmd.config.sandboxes_dir / "life-1" / "hypervisor.json").read_text())["template"]:
        wait_agent_ready(Path(info.agent_socket), 60)  # a clone: its agent said `ready` in the template
    else:
        assert agent_hello(info.agent_socket)["type"] == "ready"
    boot_s = time.monotonic() - began
    print(f"vm.create {create_s:.3f}s, guest agent ready {boot_s:.2f}s after create")

    assert [vm.sandbox_id for vm in client.list().vms] == ["life-1"]
    assert client.get("life-1").pid == info.pid
    with pytest.raises(AlreadyExists):
        client.create("life-1")

    content = tmp_path / "content"
    content.mkdir()
    (content / "hello").write_text("hi\n")
    image = tmp_path / "disk.img"
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-d", str(content), str(image), "8M"], check=True)
    with pytest.raises(InvalidArgument):
        client.attach_disk("life-1", str(tmp_path / "missing.img"), "r0")
    with pytest.raises(InvalidArgument):
        client.attach_disk("life-1", str(tmp_path), "r0")
    disk = client.attach_disk("life-1", str(image), "root0")
    assert disk.device_id == "disk-root0" and disk.serial == "root0"
    assert client.get("life-1").disks == ["disk-root0"]
    with QmpClient(info.control_socket) as qmp:
        blocks = qmp.execute("query-block")
        assert any(b.get("inserted", {}).get("file") == str(image) for b in blocks)
        assert any(b.get("qdev", "").endswith("disk-root0/virtio-backend") or
                   b.get("qdev") == "disk-root0" for b in blocks)

    assert client.pause("life-1").state == "paused"
    with QmpClient(info.control_socket) as qmp:
        assert qmp.execute("query-status")["status"] == "paused"
    assert client.resume("life-1").state == "running"
    with QmpClient(info.control_socket) as qmp:
        assert qmp.execute("query-status")["running"] is True

    assert client.detach_disk("life-1", "disk-root0").existed
    assert client.get("life-1").disks == []
    with QmpClient(info.control_socket) as qmp:
        assert not any(b.get("inserted", {}).get("file") == str(image) for b in qmp.execute("query-block"))
    assert not client.detach_disk("life-1", "disk-root0").existed

    assert client.stop("life-1").existed
    assert_gone(vmmd, "life-1", info.pid, Path(info.agent_socket).parent)
    assert not client.stop("life-1").existed
    with pytest.raises(NotFound):
        client.get("life-1")
    assert list(vmmd.vm_root.iterdir()) == []


def test_long_sandbox_id(vmmd):
    sandbox_id = "L" * 128
    info = vmmd.client.create(sandbox_id)
    assert len(info.agent_socket) <= 107 and os.path.exists(info.agent_socket)
    assert vmmd.client.stop(sandbox_id).existed
    assert_gone(vmmd, sandbox_id, info.pid, Path(info.agent_socket).parent)


def test_sigkill_restart_readopts_and_stops(vmmd):
    info = vmmd.client.create("restart-1")
    other = vmmd.client.create("restart-2")
    vmmd.client.pause("restart-2")
    vmmd.stop("vmmd", signal.SIGKILL)
    assert proc.is_alive(info.pid, None) and proc.is_alive(other.pid, None)
    vmmd.start("vmmd")
    vms = {vm.sandbox_id: vm for vm in vmmd.client.list().vms}
    assert vms["restart-1"].state == "running" and vms["restart-1"].pid == info.pid
    assert vms["restart-2"].state == "paused" and vms["restart-2"].pid == other.pid
    assert vmmd.client.resume("restart-2").state == "running"
    assert vmmd.client.stop("restart-1").existed
    assert_gone(vmmd, "restart-1", info.pid, Path(info.agent_socket).parent)
    # an adopted VM that dies is noticed by the new vmmd
    os.kill(other.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while vmmd.client.get("restart-2").state != "stopped" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert vmmd.client.get("restart-2").state == "stopped"
    assert vmmd.client.stop("restart-2").existed
    assert list(vmmd.vm_root.iterdir()) == []


def test_vm_that_dies_is_marked_stopped(vmmd, tmp_path):
    info = vmmd.client.create("dies-1")
    os.kill(info.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while vmmd.client.get("dies-1").state != "stopped" and time.monotonic() < deadline:
        time.sleep(0.05)
    vm = vmmd.client.get("dies-1")
    assert vm.state == "stopped" and vm.exit_status == 128 + signal.SIGKILL
    image = tmp_path / "x.img"
    image.write_bytes(b"\0" * 65536)
    with pytest.raises(FailedPrecondition, match="stopped"):
        vmmd.client.attach_disk("dies-1", str(image), "x")
    assert vmmd.client.stop("dies-1").existed
    assert_gone(vmmd, "dies-1", info.pid, Path(info.agent_socket).parent)


def test_stop_kills_a_qemu_that_does_not_quit(vmmd):
    info = vmmd.client.create("hung-1")
    os.kill(info.pid, signal.SIGSTOP)  # QMP accepts the connection but never greets
    began = time.monotonic()
    assert vmmd.client.stop("hung-1", timeout_s=1.0).existed
    assert time.monotonic() - began < 5
    assert_gone(vmmd, "hung-1", info.pid, Path(info.agent_socket).parent)


def test_missing_kernel_is_a_clear_error(make_vmmd, tmp_path):
    guest = tmp_path / "guest"
    guest.mkdir()
    (guest / "initrd.img").write_bytes((GUEST_DIR / "initrd.img").read_bytes()[:4096])
    daemon = make_vmmd(guest_dir=guest)
    with pytest.raises(FailedPrecondition, match="vmlinux missing"):
        daemon.client.create("nokernel")
    assert daemon.client.list().vms == []
    assert list(daemon.vm_root.iterdir()) == []
    assert processes_mentioning(str(daemon.vm_root) + "/") == []


def test_qemu_failing_at_start_reports_its_stderr(make_vmmd, tmp_path):
    guest = tmp_path / "guest"
    guest.mkdir()
    (guest / "vmlinux").write_bytes(os.urandom(64 * 1024))
    (guest / "initrd.img").write_bytes(b"\0" * 4096)
    daemon = make_vmmd(guest_dir=guest)
    with pytest.raises(Unavailable, match="QEMU exited with status 1 while starting: .*kernel"):
        daemon.client.create("badkernel")
    assert daemon.client.list().vms == []
    assert list(daemon.vm_root.iterdir()) == []
    assert not (daemon.config.sandboxes_dir / "badkernel").exists()
    assert processes_mentioning(str(daemon.vm_root) + "/") == []


def test_garbage_and_unknown_methods_get_error_replies(vmmd):
    endpoint = vmmd.config.endpoint("vmmd")
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoint)
        for frames in ([b"", b"\xff garbage"], [b"", PROTOCOL, b"{not json", b"{}"],
                       [b"", PROTOCOL, b"[]", b"{}", b"extra"]):
            sock.send_multipart(frames)
            assert sock.poll(5000), f"no reply to {frames!r}"
            reply = sock.recv_multipart()
            header, body = decode_reply(reply[1:] if reply[0] == b"" else reply)
            assert header.status == "error" and body["code"] == "INVALID_ARGUMENT"
    finally:
        sock.close(0)
    rpc = RpcClient("vmmd", endpoint, timeout=5)
    with pytest.raises(NotFound, match="no method"):
        rpc.call("vm.explode", {})
    with pytest.raises(InvalidArgument):
        rpc.call("vm.create", {"sandbox_id": "../etc"})
    with pytest.raises(InvalidArgument):
        rpc.call("vm.create", {"sandbox_id": "ok", "surprise": 1})
    assert rpc.ping()["daemon"] == "vmmd"
    assert vmmd.client.list().vms == []
