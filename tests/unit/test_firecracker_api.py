"""FirecrackerApi against a fake Firecracker API server on a real Unix socket."""

from __future__ import annotations

import json
import os
import shutil
import socket
import socketserver
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler

import pytest

from hanabi_common.errors import (DeadlineExceeded, FailedPrecondition, Internal,
                                  InvalidArgument, NotFound, Unavailable)
from hanabi_vmmd.firecracker import boot, models as m
from hanabi_vmmd.firecracker.api import FirecrackerApi


class FakeFirecracker:
    """Records (method, path, body); replies 204, or what `replies[(method, path)]` says."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.requests: list[tuple[str, str, dict | None]] = []
        self.replies: dict[tuple[str, str], tuple[int, object]] = {
            ("GET", "/"): (200, {"app_name": "Firecracker", "id": "anonymous-instance",
                                 "state": "Not started", "vmm_version": "1.16.1"}),
            ("GET", "/machine-config"): (200, {"vcpu_count": 2, "mem_size_mib": 512, "smt": False,
                                               "track_dirty_pages": False, "huge_pages": "None"}),
        }
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                fake.requests.append((self.command, self.path, json.loads(raw) if raw else None))
                status, body = fake.replies.get((self.command, self.path), (204, None))
                data = b"" if body is None else (body if isinstance(body, bytes)
                                                 else json.dumps(body).encode())
                self.send_response(status)
                if data:
                    self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_PUT = do_PATCH = _handle

            def log_message(self, *args) -> None:
                pass

            def address_string(self) -> str:
                return "unix"

        class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
            daemon_threads = True

        self.server = Server(path, Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def sockdir():
    d = tempfile.mkdtemp(prefix="hfc", dir="/tmp")  # short: AF_UNIX paths max 107 bytes
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def fake(sockdir):
    f = FakeFirecracker(os.path.join(sockdir, "api.sock"))
    yield f
    f.close()


@pytest.fixture
def api(fake):
    with FirecrackerApi(fake.path, timeout=2.0) as client:
        yield client


def test_boot_sequence_is_sent_with_the_right_methods_paths_and_bodies(fake, api):
    spec = boot.FcBootSpec(kernel_image_path="/k/vmlinux", initrd_path="/k/initrd", boot_args="quiet",
                           vcpus=2, memory_mib=512, vsock_uds_path="/run/v.sock",
                           drives=(boot.DriveSpec("rootfs", "/r.img", True, False),),
                           placeholder_drives=2, placeholder_dir="/ph", tap_name="tap0",
                           guest_mac="02:00:00:00:00:01")
    steps = boot.boot_sequence(spec)
    api.replay(steps)
    assert fake.requests == [(meth, path, body.to_body()) for meth, path, body in steps]
    assert fake.requests[-1] == ("PUT", "/actions", {"action_type": "InstanceStart"})
    assert ("PUT", "/drives/ph1", {"drive_id": "ph1", "is_root_device": False,
                                   "is_read_only": False, "path_on_host": "/ph/ph1.img"}) in fake.requests


def test_each_endpoint_sends_its_request(fake, api):
    api.put_boot_source(m.BootSource(kernel_image_path="/k"))
    api.put_drive(m.Drive(drive_id="rootfs", path_on_host="/r", is_root_device=True))
    api.patch_drive(m.PartialDrive(drive_id="ph0", path_on_host="/vol"))
    api.put_machine_config(m.MachineConfiguration(vcpu_count=1, mem_size_mib=256))
    api.put_network_interface(m.NetworkInterface(iface_id="eth0", host_dev_name="tap0"))
    api.put_vsock(m.Vsock(guest_cid=3, uds_path="/v"))
    api.put_logger(m.Logger(log_path="/l", level="Debug"))
    api.put_metrics(m.Metrics(metrics_path="/mm"))
    api.instance_start()
    api.send_ctrl_alt_del()
    api.pause()
    api.resume()
    api.create_snapshot(m.SnapshotCreateParams(snapshot_path="/s", mem_file_path="/mem"))
    api.load_snapshot(m.SnapshotLoadParams(
        snapshot_path="/s", mem_backend=m.MemoryBackend(backend_type="File", backend_path="/mem")))
    assert fake.requests == [
        ("PUT", "/boot-source", {"kernel_image_path": "/k"}),
        ("PUT", "/drives/rootfs", {"drive_id": "rootfs", "path_on_host": "/r", "is_root_device": True}),
        ("PATCH", "/drives/ph0", {"drive_id": "ph0", "path_on_host": "/vol"}),
        ("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 256}),
        ("PUT", "/network-interfaces/eth0", {"iface_id": "eth0", "host_dev_name": "tap0"}),
        ("PUT", "/vsock", {"guest_cid": 3, "uds_path": "/v"}),
        ("PUT", "/logger", {"log_path": "/l", "level": "Debug"}),
        ("PUT", "/metrics", {"metrics_path": "/mm"}),
        ("PUT", "/actions", {"action_type": "InstanceStart"}),
        ("PUT", "/actions", {"action_type": "SendCtrlAltDel"}),
        ("PATCH", "/vm", {"state": "Paused"}),
        ("PATCH", "/vm", {"state": "Resumed"}),
        ("PUT", "/snapshot/create", {"snapshot_path": "/s", "mem_file_path": "/mem"}),
        ("PUT", "/snapshot/load", {"snapshot_path": "/s",
                                   "mem_backend": {"backend_type": "File", "backend_path": "/mem"}}),
    ]


def test_inspection_replies_are_parsed(fake, api):
    info = api.describe_instance()
    assert (info.state, info.vmm_version, info.app_name) == ("Not started", "1.16.1", "Firecracker")
    cfg = api.get_machine_config()
    assert (cfg.vcpu_count, cfg.mem_size_mib, cfg.huge_pages) == (2, 512, "None")
    assert [r[:2] for r in fake.requests] == [("GET", "/"), ("GET", "/machine-config")]
    assert api.wait_ready(timeout=1).state == "Not started"


def test_a_400_with_fault_message_is_invalid_argument(fake, api):
    fault = "Invalid kernel image path: No such file or directory (os error 2)"
    fake.replies[("PUT", "/boot-source")] = (400, {"fault_message": fault})
    with pytest.raises(InvalidArgument) as err:
        api.put_boot_source(m.BootSource(kernel_image_path="/missing"))
    assert err.value.message == fault
    assert err.value.details["status"] == 400 and err.value.details["path"] == "/boot-source"


def test_a_failing_step_stops_the_boot_replay(fake, api):
    fake.replies[("PUT", "/machine-config")] = (400, {"fault_message": "bad vcpu"})
    spec = boot.FcBootSpec(kernel_image_path="/k", initrd_path=None, boot_args="", vcpus=1,
                           memory_mib=128, vsock_uds_path="/v", placeholder_drives=0)
    with pytest.raises(InvalidArgument, match="bad vcpu"):
        api.replay(boot.boot_sequence(spec))
    assert [p for _, p, _ in fake.requests] == ["/boot-source", "/machine-config"]


@pytest.mark.parametrize("status,body,exc", [
    (404, {"fault_message": "no such drive"}, NotFound),
    (409, {"fault_message": "busy"}, FailedPrecondition),
    (500, {"fault_message": "boom"}, Internal),
    (500, b"not json", Internal),
])
def test_other_statuses_become_typed_errors(fake, api, status, body, exc):
    fake.replies[("PATCH", "/vm")] = (status, body)
    with pytest.raises(exc) as err:
        api.pause()
    assert err.value.details["status"] == status
    if isinstance(body, dict):
        assert err.value.message == body["fault_message"]


def test_an_unexpected_reply_shape_is_internal(fake, api):
    fake.replies[("GET", "/")] = (200, {"state": "Running"})
    with pytest.raises(Internal):
        api.describe_instance()


def test_a_socket_that_never_appears_is_unavailable_within_the_timeout(sockdir):
    path = os.path.join(sockdir, "never.sock")
    api = FirecrackerApi(path, timeout=0.3)
    with pytest.raises(Unavailable) as err:
        api.instance_start()
    assert path in err.value.message
    start = time.monotonic()
    with pytest.raises(Unavailable) as err:
        api.wait_ready()
    assert time.monotonic() - start < 2.0
    assert path in err.value.message and err.value.details["socket"] == path


def test_a_socket_that_appears_late_is_waited_for(sockdir):
    path = os.path.join(sockdir, "late.sock")
    holder: list[FakeFirecracker] = []
    timer = threading.Timer(0.2, lambda: holder.append(FakeFirecracker(path)))
    timer.start()
    try:
        assert FirecrackerApi(path, timeout=3).wait_ready().vmm_version == "1.16.1"
    finally:
        timer.join()
        for f in holder:
            f.close()


def test_a_server_that_never_replies_hits_the_deadline(sockdir):
    path = os.path.join(sockdir, "mute.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    try:
        start = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            FirecrackerApi(path, timeout=0.3).describe_instance()
        assert time.monotonic() - start < 2.0
    finally:
        listener.close()
