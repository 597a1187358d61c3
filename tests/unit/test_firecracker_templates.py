"""Firecracker snapshots as VM templates, against the stand-in `firecracker` (no Firecracker
runs on this machine): what the backend sends to save a template and to restore a clone, in
order, each body checked against the vendored v1.16.1 spec (strict: no field the spec lacks);
the template's placeholders at a stable path, the clone's own placeholders and sockets; the
stand-in refusing what Firecracker refuses; failures leaving nothing running."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from pathlib import Path

import pytest

from hanabi_common.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument
from hanabi_vmmd import proc
from hanabi_vmmd.agent_probe import agent_request, wait_agent_ready
from hanabi_vmmd.cloning import restore_fields, why_not_cloned
from hanabi_vmmd.firecracker import boot, models as m, snapshot
from hanabi_vmmd.firecracker.api import FirecrackerApi
from hanabi_vmmd.firecracker.backend import FirecrackerHypervisor
from hanabi_vmmd.firecracker.process import JailerConfig
from hanabi_vmmd.firecracker.spec import load_spec
from hanabi_vmmd.hypervisor import NicSpec, VmSpec
from hanabi_vmmd.qemu import QemuHypervisor
from hanabi_wire import PROTOCOL_VERSION, T_RESTORED
from tests.helpers import fake_firecracker
from tests.helpers.fake_agent import FakeAgent, ListeningFakeAgent
from tests.helpers.hybrid_vsock import HybridVsockRelay
from tests.unit.test_firecracker_backend import backend, env, make_spec, requests_of  # noqa: F401
from tests.helpers.firecracker_spec import spec_path_for, validate


@pytest.fixture(scope="module")
def fc_spec() -> dict:
    return load_spec()


def checked(fc_spec: dict, requests: list[dict]) -> list[tuple[str, str]]:
    """(method, path) of every request but GET /, each body validated against the spec."""
    steps = []
    for r in requests:
        if (r["method"], r["path"]) == ("GET", "/"):
            continue
        validate(fc_spec, r["method"], spec_path_for(fc_spec, r["path"]), r["body"])
        steps.append((r["method"], r["path"]))
    return steps


def refusals(env) -> list[dict]:
    return [e for e in fake_firecracker.read_record(env["record"]) if "refused" in e]


def make_template(env, fc) -> tuple[Path, Path, Path]:
    """A template as vmmd makes one: booted with its placeholders in a stable dir, saved, ended;
    (state, memory, drive dir)."""
    tpl, drives = env["root"] / "tpl", env["root"] / "drives"
    spec = VmSpec.in_dir("tpl", tpl, FirecrackerHypervisor.files, memory_mib=128, vcpus=1, kernel=env["kernel"],
                         initrd=env["initrd"], cmdline="quiet", accel="kvm", drive_dir=drives)
    handle = fc.start(spec)
    try:
        fc.save_template(handle, tpl / "state", tpl / "memory")
    finally:
        fc.stop(handle, 2.0)
    return tpl / "state", tpl / "memory", drives


def test_a_template_boots_with_stable_placeholders_pauses_and_writes_a_full_snapshot(env, fc_spec):
    fc = backend(env)
    drives = env["root"] / "drives"
    spec = make_spec(env, drive_dir=drives)
    handle = fc.start(spec)
    try:
        boot_reqs = requests_of(env)
        for i in range(4):  # the snapshot will name these: outside the VM's (build) directory
            body = next(r["body"] for r in boot_reqs if r["path"] == f"/drives/ph{i}")
            assert body["path_on_host"] == str(drives / f"ph{i}.img")
            assert (drives / f"ph{i}.img").stat().st_size == boot.PLACEHOLDER_SIZE
        assert not (spec.vm_dir / "ph0.img").exists()
        state, memory = env["root"] / "state", env["root"] / "memory"
        assert fc.save_template(handle, state, memory) == state.stat().st_size
        saved = requests_of(env)[len(boot_reqs):]
        assert checked(fc_spec, saved) == [("PATCH", "/vm"), ("PUT", "/snapshot/create")]
        assert saved[0]["body"] == {"state": "Paused"}
        assert saved[1]["body"] == {"snapshot_path": str(state), "mem_file_path": str(memory),
                                    "snapshot_type": "Full"}
        recorded = json.loads(state.read_text())  # what the stand-in's snapshot records
        assert recorded["drives"] == {f"ph{i}": str(drives / f"ph{i}.img") for i in range(4)}
        assert memory.stat().st_size == 128 << 20
        assert fc.query_paused(handle) is True
    finally:
        result = fc.stop(handle, 2.0)
    # a paused guest cannot act on Ctrl+Alt+Del: killed at once, not after the timeout
    assert result.killed and {"action_type": "SendCtrlAltDel"} not in [r["body"] for r in requests_of(env)]
    assert not fc.is_alive(handle) and refusals(env) == []


def test_a_clone_loads_the_snapshot_with_its_own_vsock_and_placeholders_then_resumes(env, fc_spec):
    fc = backend(env)
    state, memory, _ = make_template(env, fc)
    before = len(requests_of(env))
    spec = make_spec(env, memory_file=memory, incoming=True)
    handle = fc.restore(spec, state)
    try:
        assert fc.is_alive(handle) and handle.agent_socket == spec.vm_dir / "fc-vsock.sock"
        reqs = requests_of(env)[before:]
        assert checked(fc_spec, reqs) == [
            ("PUT", "/logger"), ("PUT", "/metrics"), ("PUT", "/snapshot/load"),
            ("PATCH", "/drives/ph0"), ("PATCH", "/drives/ph1"), ("PATCH", "/drives/ph2"),
            ("PATCH", "/drives/ph3"), ("PATCH", "/vm")]
        bodies = {(r["method"], r["path"]): r["body"] for r in reqs}
        assert bodies[("PUT", "/snapshot/load")] == {
            "snapshot_path": str(state),
            "mem_backend": {"backend_type": "File", "backend_path": str(memory)},
            "resume_vm": False, "vsock_override": {"uds_path": str(spec.vm_dir / "fc-vsock.sock")}}
        for i in range(4):
            own = spec.vm_dir / f"ph{i}.img"
            assert bodies[("PATCH", f"/drives/ph{i}")] == {"drive_id": f"ph{i}", "path_on_host": str(own)}
            assert own.stat().st_size == boot.PLACEHOLDER_SIZE
        assert bodies[("PATCH", "/vm")] == {"state": "Resumed"}
        assert fc.query_paused(handle) is False
        # the clone's agent answers through its own vsock socket (CONNECT 1024 / OK ...)
        wait_agent_ready(handle.agent_socket, 5.0, port=handle.agent_port)
        agent_request(handle.agent_socket, T_RESTORED, restore_fields("sb1"), 5.0, port=handle.agent_port)
    finally:
        fc.stop(handle, 2.0)
    assert not fc.is_alive(handle) and refusals(env) == []


def test_a_clone_cannot_take_a_nic_and_nothing_is_spawned(env):
    fc = backend(env)
    nic = NicSpec("nic0", "tap-clone", "02:00:00:00:00:09")
    with pytest.raises(FailedPrecondition, match="fixes the guest MAC"):
        fc.restore(make_spec(env, memory_file=env["root"] / "memory", nics=(nic,)), env["root"] / "state")
    assert fake_firecracker.read_record(env["record"]) == []


def test_a_load_whose_template_drives_are_gone_is_refused_and_leaves_nothing(env):
    fc = backend(env)
    state, memory, drives = make_template(env, fc)
    (drives / "ph2.img").unlink()
    spawned: list = []
    with pytest.raises(InvalidArgument, match="Unable to restore block device ph2"):
        fc.restore(make_spec(env, memory_file=memory), state, spawned.append)
    assert spawned and not proc.is_alive(spawned[0].pid, spawned[0].start_time)


def test_a_refused_load_leaves_nothing_running(env, monkeypatch):
    monkeypatch.setenv("FAKE_FC_FAIL", "PUT /snapshot/load")
    fc = backend(env)
    spawned: list = []
    with pytest.raises(InvalidArgument, match="fake refuses PUT /snapshot/load"):
        fc.restore(make_spec(env, memory_file=env["root"] / "memory"), env["root"] / "state", spawned.append)
    assert spawned and not proc.is_alive(spawned[0].pid, spawned[0].start_time)


def raw_request(sock_path: Path, method: str, path: str, body: dict) -> tuple[int, str]:
    """One HTTP request with a body as given (no model in between): (status, fault_message)."""
    data = json.dumps(body).encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(str(sock_path))
        sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
        reply = b""
        while b"\r\n\r\n" not in reply:
            reply += sock.recv(4096)
        head, _, rest = reply.partition(b"\r\n\r\n")
        length = int(next((line.split(b":")[1] for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length")), b"0"))
        while len(rest) < length:
            rest += sock.recv(4096)
    status = int(head.split()[1])
    return status, json.loads(rest).get("fault_message", "") if rest else ""


def test_the_stand_in_refuses_what_firecracker_refuses(env):
    """The sequences above are only worth something if calls in the wrong state, or with a
    field the spec lacks, fail at the stand-in as they would at Firecracker."""
    fc = backend(env)
    spec = make_spec(env)
    handle = fc.start(spec)
    sock = handle.control_socket
    try:
        status, fault = raw_request(sock, "PUT", "/snapshot/create",
                                    {"snapshot_path": "/tmp/x", "mem_file_path": "/tmp/y"})
        assert status == 400 and "not paused" in fault  # Running: the spec wants it Paused
        status, fault = raw_request(sock, "PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 128})
        assert status == 400 and "after starting" in fault  # "Pre-boot only."
        status, fault = raw_request(sock, "PUT", "/snapshot/load", {"snapshot_path": "/tmp/x"})
        assert status == 400 and "after starting" in fault
        status, fault = raw_request(sock, "PATCH", "/vm", {"state": "Paused", "bogus": 1})
        assert status == 400 and "bogus" in fault  # an unknown field
        status, fault = raw_request(sock, "PATCH", "/drives/ph0", {"drive_id": "ph0", "path_on_host": "/nope"})
        assert status == 400 and "No such file" in fault
        status, fault = raw_request(sock, "PUT", "/nonexistent", {})
        assert status == 400 and "Invalid request" in fault
    finally:
        fc.stop(handle, 2.0)


def test_a_fresh_stand_in_refuses_post_boot_calls_and_a_load_after_configuration(env):
    api = env["root"] / "api.sock"
    process = subprocess.Popen([str(env["fake"]), "--api-sock", str(api), "--id", "x"])
    try:
        deadline = time.monotonic() + 10
        while not api.exists():
            assert time.monotonic() < deadline and process.poll() is None, "the stand-in did not listen"
            time.sleep(0.01)
        status, fault = raw_request(api, "PATCH", "/vm", {"state": "Paused"})
        assert status == 400 and "before starting" in fault
        status, fault = raw_request(api, "PATCH", "/drives/ph0", {"drive_id": "ph0"})
        assert status == 400 and "before starting" in fault  # "Post-boot only."
        with FirecrackerApi(str(api)) as client:
            client.request("PUT", "/machine-config", m.MachineConfiguration(vcpu_count=1, mem_size_mib=128))
        status, fault = raw_request(api, "PUT", "/snapshot/load", {
            "snapshot_path": "/tmp/x", "mem_backend": {"backend_type": "File", "backend_path": "/tmp/y"}})
        assert status == 400 and "after configuring boot-specific resources" in fault
    finally:
        process.kill()
        process.wait()


def test_templates_are_refused_under_the_jailer_and_without_a_memory_file(env):
    jailed = backend(env, jailer=JailerConfig(binary="/nonexistent/jailer", uid=0, gid=0,
                                              chroot_base=Path("/nonexistent")))
    assert not jailed.capabilities().templates and backend(env).capabilities().templates
    with pytest.raises(FailedPrecondition, match="jailer"):
        jailed.restore(make_spec(env, memory_file=env["root"] / "memory"), env["root"] / "state")
    with pytest.raises(InvalidArgument, match="memory file"):
        backend(env).restore(make_spec(env), env["root"] / "state")
    assert requests_of(env) == []


def test_the_sequences_refuse_missing_files():
    with pytest.raises(InvalidArgument):
        snapshot.restore_sequence(snapshot.FcRestoreSpec(state_path="", memory_path="/m", vsock_uds_path="/v",
                                                         placeholders=()))
    assert [s[:2] for s in snapshot.snapshot_sequence("/s", "/m")] == [("PATCH", "/vm"), ("PUT", "/snapshot/create")]


def test_the_agent_probe_speaks_the_hybrid_vsock_handshake(tmp_path):
    """vmmd's probe through a Firecracker vsock socket: `CONNECT 1024`, then the agent
    protocol; a port nobody listens on is closed by Firecracker, so the probe times out."""
    inner, outer = tmp_path / "agent", tmp_path / "v.sock"

    def behave(agent: FakeAgent, msg: dict) -> None:
        agent.reply(msg, {"protocol": PROTOCOL_VERSION} if msg["type"] == "ping" else {})

    listener = ListeningFakeAgent(str(inner), lambda s: FakeAgent(s, behave))
    relay = HybridVsockRelay(str(outer), {1024: str(inner)})
    try:
        assert wait_agent_ready(outer, 5.0, port=1024) < 5.0
        assert agent_request(outer, T_RESTORED, restore_fields("sb"), 5.0, port=1024) == {}
        assert relay.requests[:2] == [b"CONNECT 1024\n", b"CONNECT 1024\n"]
        with pytest.raises(DeadlineExceeded):
            wait_agent_ready(outer, 0.3, port=1025)
        with pytest.raises(DeadlineExceeded):  # the socket itself is no agent: no reply
            wait_agent_ready(outer, 0.3)
    finally:
        relay.close()
        listener.close()


def test_which_vms_can_be_clones():
    qemu, fc = QemuHypervisor(), FirecrackerHypervisor(binary="/nonexistent/firecracker")
    nic = NicSpec("nic0", "tap0", "02:00:00:00:00:01")
    assert why_not_cloned(qemu, (nic, nic), 2) is None
    assert "hot-plug slots" in why_not_cloned(qemu, (nic, nic, nic), 2)
    assert why_not_cloned(fc, (), 2) is None
    assert "cannot hot-plug the NICs" in why_not_cloned(fc, (nic,), 2)
    jailed = FirecrackerHypervisor(jailer=JailerConfig(binary="/nonexistent/jailer"))
    assert "makes no VM templates" in why_not_cloned(jailed, (), 2)
