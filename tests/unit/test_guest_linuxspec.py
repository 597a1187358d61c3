"""The create_container `linux` field (hanabi_wire.ocispec linux.py and resources.py; the
guest's cgroups.py, hardening.py) and what the runtime sends in it
(hanabi_runtime.guest_linux): validation and plans as pure functions; secure_join, devices
and masked paths against real directories."""

from __future__ import annotations

import os
import stat

import pytest

from hanabi_common.errors import InvalidArgument
from hanabi_wire.ocispec.linux import check_linux
from hanabi_wire.ocispec.resources import check_resources
from hanabi_guest.cgroups import plan_files, shares_to_weight
from hanabi_guest.hardening import make_devices, secure_join
from hanabi_runtime.bundle import default_spec
from hanabi_runtime.guest_linux import check_guest_settings, guest_linux

NS = [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount", "cgroup")]


def test_namespaces_made_in_the_guest():
    spec = check_linux({"namespaces": NS}, "h")
    assert spec.namespaces == ["ipc", "uts", "cgroup"]
    spec = check_linux({"namespaces": [*NS, {"type": "time"}],
                        "timeOffsets": {"boottime": {"secs": 86400, "nanosecs": 5}, "monotonic": {"secs": -1}}})
    assert spec.namespaces == ["ipc", "uts", "cgroup", "time"]
    assert spec.time_offsets == [("boottime", 86400, 5), ("monotonic", -1, 0)]
    assert check_linux({"namespaces": [{"type": "network", "path": "/var/run/netns/n"}]}).namespaces == []
    assert check_linux(None) is None


@pytest.mark.parametrize("linux, hostname, message", [
    ({"namespaces": [{"type": "foo"}]}, None, "linux.namespaces: namespace type 'foo' does not exist"),
    ({"namespaces": [{"type": "ipc", "path": "/proc/1/ns/ipc"}]}, None, "ipc namespace '/proc/1/ns/ipc' is a namespace of the host"),
    ({"namespaces": [{"type": "user"}]}, None, "linux.uidMappings: user namespaces enabled, but no uid mappings found"),
    ({"timeOffsets": {"monotonic": {"secs": 1}}}, None, "linux.timeOffsets: time offsets are specified, but no time namespace"),
    ({"namespaces": [{"type": "time"}], "timeOffsets": {"realtime": {"secs": 1}}}, None,
     "linux.timeOffsets: 'realtime' is not a clock"),
    ({"namespaces": [{"type": "time"}], "timeOffsets": {"boottime": {"secs": "1"}}}, None,
     r"linux.timeOffsets.boottime.secs must be an integer"),
    ({"namespaces": [{"type": "time"}], "timeOffsets": {"boottime": {"secs": 1 << 62}}}, None,
     r"linux.timeOffsets.boottime.secs must be an integer"),
    ({"namespaces": [{"type": "time"}], "timeOffsets": {"monotonic": {"nanosecs": 1_000_000_000}}}, None,
     r"linux.timeOffsets.monotonic.nanosecs must be 0..999999999"),
    ({"namespaces": [{"type": "time"}], "timeOffsets": {"monotonic": {"secs": 1, "sec": 2}}}, None,
     r"linux.timeOffsets.monotonic must be an object of secs and nanosecs"),
    ({"namespaces": [{"type": "time", "path": "/proc/1/ns/time"}]}, None, "time namespace '/proc/1/ns/time' is a namespace of the host"),
    ({"namespaces": [{"type": "uts"}, {"type": "uts"}]}, None, "duplicate namespace 'uts'"),
    ({"namespaces": [{"type": "pid"}]}, "web", "hostname: unable to set hostname without a private UTS namespace"),
    ({"namespaces": [{"type": "pid"}], "domainname": "example.org"}, None, "domainname: unable to set domainname"),
    ({"namespaces": NS, "sysctl": {"vm.swappiness": "1"}}, None, "sysctl 'vm.swappiness' is not in a separate kernel namespace"),
    ({"namespaces": [{"type": "uts"}], "sysctl": {"kernel.shmmax": "1"}}, None, "not allowed in the hosts ipc namespace"),
    ({"namespaces": [{"type": "ipc"}], "sysctl": {"net.ipv4.ip_forward": "1"}}, None, "not allowed in the hosts network namespace"),
    ({"namespaces": NS, "sysctl": {"kernel.hostname": "x"}}, None, 'sysctl "kernel.hostname" is not allowed; use the hostname field'),
    ({"namespaces": NS, "sysctl": {"kernel.shmmax": 5}}, None, "linux.sysctl.kernel.shmmax: the value must be a string"),
    ({"namespaces": NS, "sysctl": {"../../etc": "1"}}, None, "is not a sysctl name"),
    ({"maskedPaths": ["proc/kcore"]}, None, r"linux.maskedPaths\[0\] must be an absolute path"),
    ({"readonlyPaths": ["/proc/../etc"]}, None, "must not contain '..'"),
    ({"devices": [{"path": "/dev/x", "type": "q", "major": 1, "minor": 1}]}, None, r"linux.devices\[0\].type 'q'"),
    ({"devices": [{"path": "/dev/x", "type": "c", "major": -1, "minor": 1}]}, None, r"linux.devices\[0\].major"),
    ({"devices": [{"path": "/dev/x", "type": "c", "major": 1, "minor": 1, "fileMode": 0o170000}]}, None, "fileMode"),
    ({"uidMappings": [{"containerID": 0, "hostID": 1000, "size": 1}]}, None,
     "linux.uidMappings: user namespace mappings specified, but the user namespace isn't enabled"),
    ({"mountLabel": "system_u:object_r:container_file_t:s0"}, None, "linux.mountLabel: selinux label"),
    ({"rootfsPropagation": "sideways"}, None, "linux.rootfsPropagation 'sideways'"),
    ({"resources": {"memory": {"limit": "1g"}}}, None, r"linux.resources.memory.limit must be an integer"),
    ({"resources": {"cpu": {"shares": 1 << 20}}}, None, r"linux.resources.cpu.shares must be an integer in 0..262144"),
    ({"resources": {"pids": {"limit": -5}}}, None, r"linux.resources.pids.limit must be an integer in -1"),
    ({"resources": {"cpu": {"cpus": "0-3;rm"}}}, None, "linux.resources.cpu.cpus must be a CPU list"),
    ({"intelRdt": {}}, None, "linux.intelRdt: not a field the guest applies"),
])
def test_bad_linux_settings_name_the_field(linux, hostname, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        check_linux(linux, hostname)


def test_namespaced_sysctls_are_accepted_as_runc():
    spec = check_linux({"namespaces": NS, "sysctl": {
        "kernel.shmmax": "1", "fs.mqueue.msg_max": "20", "net.ipv4.ip_forward": "1", "kernel.domainname": "d"}})
    assert spec.sysctl["fs.mqueue.msg_max"] == "20"


def test_cgroup_files_with_runcs_conversions():
    res = check_resources({"memory": {"limit": 64 << 20, "reservation": 32 << 20, "swap": 96 << 20},
                           "cpu": {"quota": 50000, "period": 100000, "shares": 1024, "cpus": "4-5", "mems": "0"},
                           "pids": {"limit": 100}, "blockIO": {"weight": 500}})
    assert plan_files(res, 2) == [
        ("memory.max", str(64 << 20)), ("memory.low", str(32 << 20)), ("memory.swap.max", str(32 << 20)),
        ("cpu.max", "50000 100000"), ("cpu.weight", "39"), ("cpuset.cpus", "0-1"), ("cpuset.mems", "0"),
        ("pids.max", "100"), ("io.weight", "default 4950")]
    assert plan_files({"memory": {"limit": -1}, "pids": {"limit": -1}, "cpu": {"period": 20000}}, 1) == [
        ("memory.max", "max"), ("cpu.max", "max 20000"), ("pids.max", "max")]
    assert shares_to_weight(2) == 1 and shares_to_weight(262144) == 10000
    with pytest.raises(ValueError, match="memory.swap must not be below memory.limit"):
        plan_files({"memory": {"limit": 10 << 20, "swap": 5 << 20}}, 1)


def test_secure_join_never_leaves_the_root(tmp_path):
    root = tmp_path / "root"
    (root / "proc").mkdir(parents=True)
    (root / "etc").mkdir()
    (root / "proc" / "escape").symlink_to("/etc")
    (root / "proc" / "up").symlink_to("../../../../../etc/passwd")
    assert secure_join(str(root), "/proc/escape/shadow") == str(root / "etc" / "shadow")
    assert secure_join(str(root), "/proc/up") == str(root / "etc" / "passwd")
    assert secure_join(str(root), "/proc/kcore") == str(root / "proc" / "kcore")
    (root / "loop").symlink_to("loop")
    with pytest.raises(OSError, match="too many levels"):
        secure_join(str(root), "/loop")


@pytest.mark.skipif(os.geteuid() != 0, reason="mknod needs root")
def test_devices_are_made_with_type_numbers_mode_and_owner(tmp_path):
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev" / "null").write_text("not a device")
    spec = check_linux({"devices": [
        {"path": "/dev/null", "type": "c", "major": 1, "minor": 3, "fileMode": 0o666},
        {"path": "/dev/net/tun", "type": "c", "major": 10, "minor": 200, "fileMode": 0o620, "uid": 7, "gid": 8},
        {"path": "/dev/vdz", "type": "b", "major": 254, "minor": 16},
        {"path": "/dev/pipe", "type": "p"}]})
    make_devices(str(tmp_path / "dev"), spec.devices, str(tmp_path))
    null, tun = os.stat(tmp_path / "dev/null"), os.stat(tmp_path / "dev/net/tun")
    assert stat.S_ISCHR(null.st_mode) and os.major(null.st_rdev) == 1 and os.minor(null.st_rdev) == 3
    assert stat.S_IMODE(null.st_mode) == 0o666
    assert stat.S_ISCHR(tun.st_mode) and (os.major(tun.st_rdev), os.minor(tun.st_rdev)) == (10, 200)
    assert stat.S_IMODE(tun.st_mode) == 0o620 and (tun.st_uid, tun.st_gid) == (7, 8)
    assert stat.S_ISBLK(os.stat(tmp_path / "dev/vdz").st_mode)
    assert stat.S_ISFIFO(os.stat(tmp_path / "dev/pipe").st_mode)


def test_runtime_sends_the_linux_subset_and_domainname():
    config = default_spec(["true"])
    config["linux"].update(cgroupsPath="/docker/x", seccomp={"defaultAction": "SCMP_ACT_ALLOW"},
                           sysctl={"kernel.shmmax": "1"})
    config["domainname"] = "example.org"
    sent = guest_linux(config)
    assert "cgroupsPath" not in sent and sent["domainname"] == "example.org"
    assert sent["seccomp"] == {"defaultAction": "SCMP_ACT_ALLOW"} and sent["maskedPaths"]
    assert "seccomp" not in guest_linux(config, seccomp=False)


def test_runtime_refuses_what_the_guest_would_before_any_vm():
    config = default_spec(["true"])
    check_guest_settings(config)
    config["process"]["capabilities"]["bounding"].append("CAP_FLY")
    with pytest.raises(InvalidArgument, match="config.json: process.capabilities.bounding: unknown capability 'CAP_FLY'"):
        check_guest_settings(config)
    config = default_spec(["true"])
    config["linux"]["seccomp"] = {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
        {"names": ["read"], "action": "SCMP_ACT_KILL", "errnoRet": 1}]}
    with pytest.raises(InvalidArgument, match=r"linux.seccomp.syscalls\[0\].action: errnoRet is only valid"):
        check_guest_settings(config)


def test_privileged_is_a_device_cgroup_allowing_everything():
    from hanabi_wire.ocispec.linux import allows_all_devices

    assert allows_all_devices({"devices": [{"allow": False, "access": "rwm"}, {"allow": True, "access": "rwm"}]})
    assert not allows_all_devices({"devices": [{"allow": False, "access": "rwm"},
                                               {"allow": True, "type": "c", "major": 1, "minor": 3, "access": "rwm"}]})
    assert not allows_all_devices({"devices": [{"allow": True, "access": "r"}]})
    assert not allows_all_devices({})
    assert check_linux({"resources": {"devices": [{"allow": True, "access": "rwm"}]}}).all_devices


@pytest.mark.skipif(os.geteuid() != 0, reason="mknod needs root")
def test_the_vms_devices_are_listed_without_pts_or_virtio_ports(tmp_path):
    from hanabi_guest.hardening import vm_devices

    for sub in ("pts", "disk"):
        (tmp_path / sub).mkdir()
    os.mknod(tmp_path / "kmsg", 0o644 | stat.S_IFCHR, os.makedev(1, 11))
    os.chmod(tmp_path / "kmsg", 0o644)
    os.mknod(tmp_path / "vda", 0o660 | stat.S_IFBLK, os.makedev(254, 0))
    os.chmod(tmp_path / "vda", 0o660)  # past the umask
    os.mknod(tmp_path / "vport0p1", 0o600 | stat.S_IFCHR, os.makedev(245, 1))
    os.mknod(tmp_path / "pts" / "0", 0o620 | stat.S_IFCHR, os.makedev(136, 0))
    (tmp_path / "disk" / "by-x").symlink_to("../vda")
    got = {d["path"]: (d["type"], d["major"], d["minor"], d["mode"]) for d in vm_devices(str(tmp_path))}
    assert got == {"/dev/kmsg": ("c", 1, 11, 0o644), "/dev/vda": ("b", 254, 0, 0o660)}


def test_time_offsets_must_keep_the_clock_in_range():
    from hanabi_wire.ocispec.linux import check_offsets_fit
    from hanabi_guest.namespaces import timens_offsets_text

    offsets = [("boottime", 86400, 5), ("monotonic", -10, 0)]
    check_offsets_fit(offsets, {"boottime": 100.0, "monotonic": 100.0})
    with pytest.raises(ValueError, match="linux.timeOffsets.monotonic: the offset puts the monotonic clock out of range"):
        check_offsets_fit(offsets, {"boottime": 100.0, "monotonic": 5.0})
    assert timens_offsets_text(offsets) == "boottime 86400 5\nmonotonic -10 0\n"


def test_the_runtime_sends_time_offsets_to_the_guest():
    config = {"linux": {"namespaces": [{"type": "time"}], "timeOffsets": {"boottime": {"secs": 3}}}}
    assert guest_linux(config)["timeOffsets"] == {"boottime": {"secs": 3}}
