"""Security and process settings: the SAME bundle under runc on the host and under hanabi
(real daemons + VM), and what the container sees compared: the Cap*, NoNewPrivs and Seccomp
lines of /proc/self/status, masked and read-only paths in the mount table, sysctls,
hostname and domainname, the cgroup limits, and the same failure for invalid values."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers.hanabi import leftovers

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(shutil.which("runc") is None, reason="runc is not installed")]

STATUS = "grep -E '^(Cap|NoNewPrivs|Seccomp)' /proc/self/status"
# Docker's default capability set (moby oci/caps/defaults.go).
DOCKER_CAPS = ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
               "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
               "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE"]
SMALL_PROFILE = {
    "defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
    "syscalls": [
        {"names": ["mkdir", "mkdirat", "not_a_syscall"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13},
        {"names": ["personality"], "action": "SCMP_ACT_ERRNO",
         "args": [{"index": 0, "value": 8, "op": "SCMP_CMP_EQ"}]},
    ]}


SYSFS = {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]}


def edit(path: str, change) -> str:
    config = Path(path) / "config.json"
    spec = json.loads(config.read_text())
    change(spec)
    config.write_text(json.dumps(spec))
    return path


def runc_run(path: str, name: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """`runc run` of the bundle on the host (its own state root; runc deletes the container)."""
    return subprocess.run(["runc", "--root", str(tmp_path / "runc-state"), "run", "--bundle", path, name],
                          stdin=subprocess.DEVNULL, capture_output=True, timeout=60)


def both(hanabi, path: str, cid: str, tmp_path: Path) -> tuple[str, str]:
    """stdout under runc and under hanabi, each after exit 0."""
    under_runc = runc_run(path, cid, tmp_path)
    assert under_runc.returncode == 0, under_runc.stderr.decode()
    under_hanabi = hanabi.runtime("run", "--bundle", path, cid)
    assert under_hanabi.returncode == 0, under_hanabi.stderr.decode()
    assert leftovers(hanabi, cid) == []
    return under_runc.stdout.decode(), under_hanabi.stdout.decode()


def _runc_spec(spec):
    pass  # the bundle's own config: `runc spec`'s capabilities, masked and read-only paths


def _docker_like(spec):
    spec["process"]["capabilities"] = {k: DOCKER_CAPS for k in ("bounding", "effective", "permitted")}
    spec["process"]["noNewPrivileges"] = False
    spec["linux"]["seccomp"] = SMALL_PROFILE


def _user_with_ambient(spec):
    spec["process"]["user"] = {"uid": 65534, "gid": 65534, "additionalGids": [5]}
    caps = ["CAP_NET_BIND_SERVICE", "CAP_KILL"]
    spec["process"]["capabilities"] = {k: caps for k in ("bounding", "effective", "permitted",
                                                         "inheritable", "ambient")}
    spec["linux"]["seccomp"] = {**SMALL_PROFILE, "defaultAction": "SCMP_ACT_LOG"}


def _no_capabilities_object(spec):
    del spec["process"]["capabilities"]


@pytest.mark.parametrize("change", [_runc_spec, _docker_like, _user_with_ambient, _no_capabilities_object])
def test_status_lines_match_runc(hanabi, bundle, cid, tmp_path, change):
    # A user namespace can be made (the container is not chrooted: its root is the top mount).
    script = f"{STATUS}; id; mkdir /dev/d 2>&1 || true; unshare -U true && echo userns-ok"
    path = edit(bundle(["sh", "-c", script]), change)
    runc_out, hanabi_out = both(hanabi, path, cid, tmp_path)
    assert hanabi_out == runc_out
    assert "NoNewPrivs" in hanabi_out


def test_masked_readonly_paths_sysctls_and_names_match_runc(hanabi, bundle, cid, tmp_path):
    script = (
        "hostname; cat /proc/sys/kernel/domainname /proc/sys/kernel/shmmax "
        "/proc/sys/net/ipv4/ip_unprivileged_port_start; wc -c < /proc/keys; wc -c < /proc/timer_list;"
        "awk '$5 ~ /^\\/(proc\\/(sys|keys|timer_list|bus|irq|fs|acpi)|sys\\/firmware)$/ {print $5, $6}' "
        "/proc/self/mountinfo | sort;"
        "echo 5 > /proc/sys/kernel/shmmni 2>/dev/null && echo sys-writable || echo sys-readonly;"
        # This host's kernel has no /proc/kcore and /proc/sysrq-trigger; the guest's has them.
        "echo ---; awk '$5 ~ /^\\/proc\\/(kcore|sysrq-trigger)$/ {print $5, $6}' /proc/self/mountinfo | sort;"
        "wc -c < /proc/kcore 2>/dev/null; true")

    def change(spec):
        spec["hostname"] = "sec-host"
        spec["linux"]["sysctl"] = {"kernel.shmmax": "123456789", "kernel.domainname": "example.org",
                                   "net.ipv4.ip_unprivileged_port_start": "100"}
        spec["process"]["capabilities"] = {k: DOCKER_CAPS + ["CAP_SYS_ADMIN"]
                                           for k in ("bounding", "effective", "permitted")}
        for mount in spec["mounts"]:
            if mount["destination"] == "/proc":  # as Docker's (the agent's /proc has these flags)
                mount["options"] = ["nosuid", "noexec", "nodev"]
        spec["mounts"].append(SYSFS)  # the agent always gives a /sys
    path = edit(bundle(["sh", "-c", script]), change)
    runc_out, hanabi_out = both(hanabi, path, cid, tmp_path)
    hanabi_out, _, guest_only = hanabi_out.partition("---\n")
    assert hanabi_out == runc_out.partition("---\n")[0]
    lines = hanabi_out.splitlines()
    assert lines[:6] == ["sec-host", "example.org", "123456789", "100", "0", "0"]
    assert "/proc/sys ro,nosuid,nodev,noexec,relatime" in lines and lines[-1] == "sys-readonly"
    assert "/sys/firmware ro,relatime" in lines  # a read-only tmpfs over the directory
    assert guest_only.splitlines() == ["/proc/kcore rw,nosuid", "/proc/sysrq-trigger ro,nosuid,nodev,noexec,relatime", "0"]


def test_cgroup_limits_are_readable_inside(hanabi, bundle, cid, tmp_path):
    """runc here writes cgroup v1 (the host's), the guest v2: the same limits either way."""
    script = ("if [ -f /sys/fs/cgroup/memory.max ]; then cat /sys/fs/cgroup/memory.max /sys/fs/cgroup/pids.max "
              "/sys/fs/cgroup/cpu.max /sys/fs/cgroup/cpu.weight; else cat /sys/fs/cgroup/memory/memory.limit_in_bytes "
              "/sys/fs/cgroup/pids/pids.max; echo $(cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us "
              "/sys/fs/cgroup/cpu/cpu.cfs_period_us); cat /sys/fs/cgroup/cpu/cpu.shares; fi")

    def change(spec):
        spec["linux"]["resources"] = {"memory": {"limit": 96 << 20}, "pids": {"limit": 64},
                                      "cpu": {"quota": 50000, "period": 100000, "shares": 512}}
        spec["linux"]["namespaces"].append({"type": "cgroup"})
        spec["mounts"] += [
            SYSFS,
            {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
             "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]}]
    path = edit(bundle(["sh", "-c", script]), change)
    runc_out, hanabi_out = both(hanabi, path, cid, tmp_path)
    memory, pids, cpu, shares = runc_out.split("\n")[:4]
    assert (memory, pids, cpu, shares) == (str(96 << 20), "64", "50000 100000", "512")
    assert hanabi_out.split("\n")[:4] == [memory, pids, cpu, str(1 + (512 - 2) * 9999 // 262142)]


def _unknown_namespace(spec):
    spec["linux"]["namespaces"].append({"type": "foo"})


def _host_only_sysctl(spec):
    spec["linux"]["sysctl"] = {"vm.swappiness": "1"}


def _bad_seccomp_action(spec):
    spec["linux"]["seccomp"] = {"defaultAction": "SCMP_ACT_FOO"}


def _selinux_label(spec):
    spec["process"]["selinuxLabel"] = "system_u:system_r:container_t:s0"


def _apparmor_profile(spec):
    spec["process"]["apparmorProfile"] = "docker-default"


def _hostname_without_uts(spec):
    spec["linux"]["namespaces"] = [ns for ns in spec["linux"]["namespaces"] if ns["type"] != "uts"]


@pytest.mark.parametrize("change, runc_says, hanabi_says", [
    (_unknown_namespace, 'namespace {"foo" ""} does not exist', "linux/namespaces/5: {'type': 'foo'} is not valid"),
    (_host_only_sysctl, 'sysctl "vm.swappiness" is not in a separate kernel namespace',
     "linux.sysctl: sysctl 'vm.swappiness' is not in a separate kernel namespace"),
    (_bad_seccomp_action, "string SCMP_ACT_FOO is not a valid action for seccomp",
     "linux/seccomp/defaultAction: 'SCMP_ACT_FOO' is not one of"),  # the OCI schema says it first
    (_selinux_label, "selinux label is specified in config, but selinux is disabled or not supported",
     "process.selinuxLabel: selinux label is specified in config"),
    (_apparmor_profile, "apparmor failed to apply profile", "process.apparmorProfile 'docker-default'"),
    (_hostname_without_uts, "unable to set hostname without a private UTS namespace",
     "hostname: unable to set hostname without a private UTS namespace"),
])
def test_invalid_values_fail_as_under_runc(hanabi, bundle, cid, tmp_path, change, runc_says, hanabi_says):
    path = edit(bundle(["true"]), change)
    under_runc = runc_run(path, cid, tmp_path)
    assert under_runc.returncode != 0 and runc_says in under_runc.stderr.decode().replace('\\"', '"')
    done = hanabi.runtime("create", "--bundle", path, cid)
    assert done.returncode == 1 and hanabi_says in done.stderr.decode(), done.stderr.decode()
    assert leftovers(hanabi, cid) == []


def test_out_of_memory_in_the_container_exits_137_as_under_runc(hanabi, bundle, cid, tmp_path):
    """The memory limit is the guest cgroup's memory.max: the OOM killer ends the init
    (tail buffers /dev/zero, which has no newline) with SIGKILL, under runc and here."""
    def change(spec):
        spec["linux"]["resources"] = {"memory": {"limit": 32 << 20, "swap": 32 << 20}}
    path = edit(bundle(["tail", "/dev/zero"]), change)
    under_runc = runc_run(path, cid, tmp_path)
    done = hanabi.runtime("run", "--bundle", path, cid, timeout=180)
    assert (under_runc.returncode, done.returncode) == (137, 137), (under_runc.stderr, done.stderr)
    assert leftovers(hanabi, cid) == []


def test_devices_are_made_as_under_runc(hanabi, bundle, cid, tmp_path):
    script = "for d in /dev/mynull /dev/sub/myzero /dev/null; do stat -c '%n %F %a %u %g %t %T' $d; done"

    def change(spec):
        spec["linux"]["devices"] = [
            {"path": "/dev/mynull", "type": "c", "major": 1, "minor": 3, "fileMode": 0o640, "uid": 7, "gid": 8},
            {"path": "/dev/sub/myzero", "type": "c", "major": 1, "minor": 5, "fileMode": 0o600}]
    path = edit(bundle(["sh", "-c", script]), change)
    runc_out, hanabi_out = both(hanabi, path, cid, tmp_path)
    assert hanabi_out == runc_out
    assert hanabi_out.splitlines()[0] == "/dev/mynull character special file 640 7 8 1 3"
