"""FirecrackerHypervisor's process management against a stand-in `firecracker` executable
(tests/helpers/fake_firecracker.py): it answers the API the way the spec says, records the
requests, or misbehaves (exits, never opens its socket, refuses a request, dies at
InstanceStart). No VM boots here; what is tested is ours: spawn, wait, configure, errors,
stop/kill/reap, placeholders, and that nothing is left running."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from hanabi_common.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument, Unavailable
from hanabi_vmmd import proc
from hanabi_vmmd.firecracker.backend import FirecrackerHypervisor, read_slots
from hanabi_vmmd.firecracker.serial import guest_serial
from hanabi_vmmd.hypervisor import DiskSpec, NicSpec, VmHandle, VmSpec

from tests.helpers import fake_firecracker


@pytest.fixture
def env(monkeypatch):
    """A short temp dir (socket paths), the fake binary, an ELF-looking kernel, an initrd."""
    root = Path(tempfile.mkdtemp(prefix="hfc"))
    fake = fake_firecracker.install(root)
    kernel = root / "vmlinux"
    kernel.write_bytes(b"\x7fELF" + b"\0" * 60)
    initrd = root / "initrd.img"
    initrd.write_bytes(b"070701")
    record = root / "record.jsonl"
    monkeypatch.setenv("FAKE_FC_RECORD", str(record))
    monkeypatch.delenv("FAKE_FC_MODE", raising=False)
    yield {"root": root, "fake": fake, "kernel": kernel, "initrd": initrd, "record": record}
    shutil.rmtree(root, ignore_errors=True)


def make_spec(env, **kwargs) -> VmSpec:
    vm_dir = env["root"] / "vm" / "0123456789abcdef"
    args = dict(memory_mib=128, vcpus=2, kernel=env["kernel"], initrd=env["initrd"],
                cmdline="console=ttyS0 quiet", accel="kvm")
    args.update(kwargs)
    return VmSpec.in_dir("sb1", vm_dir, FirecrackerHypervisor.files, **args)


def backend(env, **kwargs) -> FirecrackerHypervisor:
    kwargs.setdefault("start_timeout", 10.0)
    return FirecrackerHypervisor(binary=str(env["fake"]), **kwargs)


def requests_of(env) -> list[dict]:
    return [e for e in fake_firecracker.read_record(env["record"]) if "method" in e]


def spawned_pid(box: list) -> tuple[int, int]:
    handle: VmHandle = box[0]
    return handle.pid, handle.start_time


def test_start_configures_and_starts_the_vm_then_stops_it(env):
    fc = backend(env)
    spec = make_spec(env)
    seen: list[VmHandle] = []
    handle = fc.start(spec, seen.append)
    try:
        assert seen and seen[0].pid == handle.pid
        assert fc.is_alive(handle)
        assert handle.agent_transport == "hybrid_vsock" and handle.agent_port == 1024
        assert handle.agent_socket == spec.vm_dir / "fc-vsock.sock"
        assert handle.control_socket == spec.vm_dir / "fc.sock"
        assert spec.pid_file.read_text().strip() == str(handle.pid)
        argv = fake_firecracker.read_record(env["record"])[0]["argv"]
        assert argv[1:] == ["--api-sock", str(spec.vm_dir / "fc.sock"), "--id", "0123456789abcdef"]
        reqs = requests_of(env)
        steps = [(r["method"], r["path"]) for r in reqs if r["path"] != "/" or r["method"] != "GET"]
        assert steps == [("PUT", "/logger"), ("PUT", "/metrics"), ("PUT", "/boot-source"),
                         ("PUT", "/machine-config"), ("PUT", "/drives/ph0"), ("PUT", "/drives/ph1"),
                         ("PUT", "/drives/ph2"), ("PUT", "/drives/ph3"), ("PUT", "/vsock"),
                         ("PUT", "/actions")]
        bodies = {r["path"]: r["body"] for r in reqs}
        assert bodies["/boot-source"]["kernel_image_path"] == str(env["kernel"])
        assert bodies["/boot-source"]["initrd_path"] == str(env["initrd"])
        assert "hanabi.channel=vsock" in bodies["/boot-source"]["boot_args"].split()
        assert bodies["/machine-config"] == {"vcpu_count": 2, "mem_size_mib": 128, "smt": False}
        assert bodies["/vsock"] == {"guest_cid": 3, "uds_path": str(spec.vm_dir / "fc-vsock.sock")}
        assert bodies["/actions"] == {"action_type": "InstanceStart"}
        for i in range(4):  # the placeholder files exist where Firecracker opens them
            ph = Path(bodies[f"/drives/ph{i}"]["path_on_host"])
            assert ph.parent == spec.vm_dir and ph.stat().st_size == 1024 * 1024
        assert Path(bodies["/logger"]["log_path"]).exists()
    finally:
        result = fc.stop(handle, timeout=5)
    assert result.was_running and not result.killed and result.exit_status == 0
    assert not fc.is_alive(handle)
    assert ("PUT", "/actions", {"action_type": "SendCtrlAltDel"}) in [
        (r["method"], r["path"], r["body"]) for r in requests_of(env)]


def test_stop_kills_a_vm_that_ignores_ctrl_alt_del(env, monkeypatch):
    monkeypatch.setenv("FAKE_FC_MODE", "ignore_cad")
    fc = backend(env)
    handle = fc.start(make_spec(env))
    began = time.monotonic()
    result = fc.stop(handle, timeout=0.5)
    assert result.killed and result.exit_status == 137
    assert time.monotonic() - began < 5
    assert not proc.is_alive(handle.pid, handle.start_time)


def test_pause_resume_and_query(env):
    fc = backend(env)
    handle = fc.start(make_spec(env))
    try:
        assert fc.query_paused(handle) is False
        fc.pause(handle)
        assert fc.query_paused(handle) is True
        fc.resume(handle)
        assert fc.query_paused(handle) is False
        patches = [r["body"] for r in requests_of(env) if (r["method"], r["path"]) == ("PATCH", "/vm")]
        assert patches == [{"state": "Paused"}, {"state": "Resumed"}]
    finally:
        fc.stop(handle, timeout=5)
    assert fc.query_paused(handle) is None  # nobody answers any more


def test_disks_swap_placeholders_and_back(env):
    fc = backend(env)
    spec = make_spec(env)
    handle = fc.start(spec)
    vol_a, vol_b = env["root"] / "a.img", env["root"] / "b.img"
    for vol in (vol_a, vol_b):
        vol.write_bytes(b"\0" * 4096)
    try:
        disk_a = DiskSpec("disk-a", "blk-a", vol_a, "a")
        disk_b = DiskSpec("disk-b", "blk-b", vol_b, "b")
        assert fc.attach_disk(handle, disk_a, set()) == "ph0"
        assert fc.attach_disk(handle, disk_b, {"ph0"}) == "ph1"
        assert read_slots(spec.vm_dir) == {"ph0": "disk-a", "ph1": "disk-b"}
        st = os.stat(vol_a)
        assert fc.guest_serial(handle, disk_a) == f"{st.st_dev}{st.st_rdev}{st.st_ino}"[:20]
        with pytest.raises(FailedPrecondition, match="no free placeholder"):
            fc.attach_disk(handle, disk_b, {"ph0", "ph1", "ph2", "ph3"})
        with pytest.raises(InvalidArgument, match="raw"):
            fc.attach_disk(handle, DiskSpec("d", "n", vol_a, "s", format="qcow2"), set())
        fc.detach_disk(handle, disk_a, timeout=5)
        fc.detach_disk(handle, disk_a, timeout=5)  # idempotent: no second request
        assert read_slots(spec.vm_dir) == {"ph1": "disk-b"}
        patches = [r["body"] for r in requests_of(env) if r["method"] == "PATCH"]
        assert patches == [{"drive_id": "ph0", "path_on_host": str(vol_a)},
                           {"drive_id": "ph1", "path_on_host": str(vol_b)},
                           {"drive_id": "ph0", "path_on_host": str(spec.vm_dir / "ph0.img")}]
        with pytest.raises(FailedPrecondition, match="hot-plug a NIC"):
            fc.attach_nic(handle, NicSpec("nic0", "tap0", "02:00:00:00:00:01"), set())
    finally:
        fc.stop(handle, timeout=5)


def test_boot_nic_is_configured(env):
    fc = backend(env)
    handle = fc.start(make_spec(env, nics=(NicSpec("nic0", "tap7", "02:aa:bb:cc:dd:ee", mtu=1400),)))
    try:
        bodies = {r["path"]: r["body"] for r in requests_of(env)}
        assert bodies["/network-interfaces/eth0"] == {"iface_id": "eth0", "host_dev_name": "tap7",
                                                      "guest_mac": "02:aa:bb:cc:dd:ee", "mtu": 1400}
    finally:
        fc.stop(handle, timeout=5)


def test_firecracker_that_exits_is_unavailable_with_status_and_stderr(env, monkeypatch):
    monkeypatch.setenv("FAKE_FC_MODE", "exit")
    seen: list = []
    with pytest.raises(Unavailable) as err:
        backend(env).start(make_spec(env), seen.append)
    assert "status 1" in err.value.message and "bad configuration" in err.value.message
    assert err.value.details["exit_status"] == 1
    assert not proc.is_alive(*spawned_pid(seen))


def test_socket_that_never_appears_is_deadline_exceeded_and_killed(env, monkeypatch):
    monkeypatch.setenv("FAKE_FC_MODE", "nosock")
    seen: list = []
    began = time.monotonic()
    with pytest.raises(DeadlineExceeded) as err:
        backend(env, start_timeout=1.0).start(make_spec(env), seen.append)
    assert 1.0 <= time.monotonic() - began < 8
    assert "stuck before the API socket" in err.value.message
    assert not proc.is_alive(*spawned_pid(seen))


def test_api_error_reply_is_typed_and_nothing_is_left(env, monkeypatch):
    monkeypatch.setenv("FAKE_FC_FAIL", "PUT /machine-config")
    seen: list = []
    with pytest.raises(InvalidArgument, match="fake refuses PUT /machine-config") as err:
        backend(env).start(make_spec(env), seen.append)
    assert err.value.details["status"] == 400
    assert not proc.is_alive(*spawned_pid(seen))
    assert "/actions" not in [r["path"] for r in requests_of(env)]


def test_firecracker_dying_at_instance_start_is_unavailable(env, monkeypatch):
    monkeypatch.setenv("FAKE_FC_MODE", "die_on_start")
    seen: list = []
    with pytest.raises(Unavailable) as err:
        backend(env).start(make_spec(env), seen.append)
    assert not proc.is_alive(*spawned_pid(seen))
    assert "status 3" in err.value.message and "kernel panicked" in err.value.message


def test_on_spawned_failure_kills_the_process(env):
    seen: list = []

    def boom(handle):
        seen.append(handle)
        raise RuntimeError("state file write failed")

    with pytest.raises(RuntimeError):
        backend(env).start(make_spec(env), boom)
    assert not proc.is_alive(*spawned_pid(seen))


def test_too_old_firecracker_is_refused_before_spawning(env, monkeypatch):
    monkeypatch.setenv("FAKE_FC_VERSION", "Firecracker v1.7.0")
    with pytest.raises(FailedPrecondition, match=r"1\.7\.0.*>= 1\.8\.0"):
        backend(env).start(make_spec(env))
    assert requests_of(env) == [] and not [e for e in fake_firecracker.read_record(env["record"])
                                           if "argv" in e]


def test_missing_binary_is_failed_precondition(env):
    fc = FirecrackerHypervisor(binary="hanabi-no-such-firecracker")
    with pytest.raises(FailedPrecondition, match="not on PATH"):
        fc.start(make_spec(env))


def test_a_bzimage_kernel_is_refused(env):
    env["kernel"].write_bytes(b"MZ" + b"\0" * 100)
    with pytest.raises(FailedPrecondition, match="not an ELF vmlinux"):
        backend(env).start(make_spec(env))


def test_taps_in_two_namespaces_are_refused(env):
    nics = (NicSpec("n0", "tap0", "02:00:00:00:00:01", netns_path="/run/netns/a"),
            NicSpec("n1", "tap1", "02:00:00:00:00:02", netns_path="/run/netns/b"))
    with pytest.raises(InvalidArgument, match="one network namespace"):
        backend(env).start(make_spec(env, nics=nics))


def test_guest_serial_matches_stat(tmp_path):
    f = tmp_path / "v.img"
    f.write_bytes(b"x")
    st = os.stat(f)
    assert guest_serial(f) == (str(st.st_dev) + str(st.st_rdev) + str(st.st_ino))[:20]


def test_every_request_the_backend_sent_matches_the_spec(env):
    """What the backend really sent (boot with a NIC, a swap, pause, stop) against the
    vendored v1.16.1 spec, strictly (no unknown fields)."""
    from hanabi_vmmd.firecracker.spec import load_spec
    from tests.helpers.firecracker_spec import spec_path_for, validate

    fc = backend(env)
    handle = fc.start(make_spec(env, nics=(NicSpec("nic0", "tap7", "02:aa:bb:cc:dd:ee"),)))
    vol = env["root"] / "v.img"
    vol.write_bytes(bytes(4096))
    fc.attach_disk(handle, DiskSpec("disk-v", "blk-v", vol, "v"), set())
    fc.pause(handle)
    fc.resume(handle)
    fc.stop(handle, timeout=5)
    spec = load_spec()
    sent = [r for r in requests_of(env) if r["body"] is not None]
    assert {r["path"] for r in sent} >= {"/boot-source", "/machine-config", "/vsock", "/actions", "/logger",
                                         "/metrics", "/network-interfaces/eth0", "/drives/ph0", "/vm"}
    for r in sent:
        assert spec_path_for(spec, r["path"]) in spec["paths"]
        validate(spec, r["method"], spec_path_for(spec, r["path"]), r["body"])


def test_through_the_jailer_files_are_staged_in_its_root_and_named_from_inside(env):
    from hanabi_vmmd.firecracker.process import JailerConfig

    jailer = fake_firecracker.install_jailer(env["root"])
    base = env["root"] / "jail"
    fc = backend(env, jailer=JailerConfig(binary=str(jailer), uid=os.getuid(), gid=os.getgid(),
                                          chroot_base=base))
    handle = fc.start(make_spec(env))
    jail_root = base / "firecracker" / "0123456789abcdef" / "root"
    try:
        assert handle.control_socket == jail_root / "fc.sock"
        assert handle.agent_socket == jail_root / "fc-vsock.sock"
        entries = fake_firecracker.read_record(env["record"])
        jailer_argv = next(e["jailer_argv"] for e in entries if "jailer_argv" in e)
        assert jailer_argv[1:3] == ["--id", "0123456789abcdef"] and "--chroot-base-dir" in jailer_argv
        bodies = {r["path"]: r["body"] for r in requests_of(env)}
        assert bodies["/boot-source"]["kernel_image_path"] == "/vmlinux"
        assert bodies["/drives/ph0"]["path_on_host"] == "/ph0.img"
        assert bodies["/vsock"]["uds_path"] == "/fc-vsock.sock"
        for name in ("vmlinux", "initrd.img", "ph0.img", "ph3.img", "fc.log", "fc.metrics"):
            assert (jail_root / name).exists(), name
        assert (jail_root / "vmlinux").read_bytes() == env["kernel"].read_bytes()
        vol = env["root"] / "vol.img"
        vol.write_bytes(bytes(4096))
        fc.attach_disk(handle, DiskSpec("disk-v", "blk-v", vol, "v"), set())
        linked = jail_root / "disk0.img"
        assert os.stat(linked).st_ino == os.stat(vol).st_ino  # the same file: the same guest serial
        assert [r["body"] for r in requests_of(env) if r["method"] == "PATCH"][-1] == {
            "drive_id": "ph0", "path_on_host": "/disk0.img"}
    finally:
        fc.stop(handle, timeout=5)
    assert not (base / "firecracker" / "0123456789abcdef").exists()  # the jail is removed


def test_a_spec_firecracker_would_refuse_fails_before_spawning(env):
    with pytest.raises(InvalidArgument, match="1..32 vCPUs"):
        backend(env).start(make_spec(env, vcpus=64))
    assert fake_firecracker.read_record(env["record"]) == []
