"""Docker's security options under hanabi, compared with the same `docker run` under runc:
capabilities (default set, --cap-drop ALL, --cap-add), the default seccomp profile
(Seccomp: 2), seccomp=unconfined, no-new-privileges, --privileged, --sysctl, --ulimit and
--pids-limit."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.e2e

STATUS = "grep -E '^(Cap|NoNewPrivs|Seccomp)' /proc/self/status"
# Docker's default profile refuses unshare(CLONE_NEWUSER) without CAP_SYS_ADMIN; without a
# profile an unprivileged user namespace is allowed (both kernels allow them).
USERNS = "unshare -U true 2>/dev/null && echo userns-allowed || echo userns-refused"


def under_both(docker, *options: str, cmd: str) -> tuple[str, str]:
    """stdout of `docker run OPTIONS busybox sh -c CMD` under runc, then under hanabi."""
    runc = docker.run_hanabi(*options, cmd=["sh", "-c", cmd], runtime="runc")
    assert runc.returncode == 0, runc.stderr
    hanabi = docker.run_hanabi(*options, cmd=["sh", "-c", cmd])
    assert hanabi.returncode == 0, hanabi.stderr
    return runc.stdout, hanabi.stdout


@pytest.mark.parametrize("options", [
    (),
    ("--cap-drop", "ALL"),
    ("--cap-drop", "ALL", "--cap-add", "NET_ADMIN", "--cap-add", "SYS_TIME"),
    ("--cap-add", "SYS_ADMIN"),
    ("--security-opt", "no-new-privileges"),
    ("--security-opt", "seccomp=unconfined"),
    ("--user", "65534:65534"),
], ids=lambda o: " ".join(o) or "defaults")
def test_status_lines_and_seccomp_as_under_runc(docker, options):
    runc, hanabi = under_both(docker, *options, cmd=f"{STATUS}; {USERNS}")
    assert hanabi == runc
    seccomp = "0" if "seccomp=unconfined" in options else "2"
    assert f"Seccomp:\t{seccomp}\n" in hanabi


def test_default_profile_refuses_what_runc_refuses(docker):
    runc, hanabi = under_both(docker, cmd=USERNS)
    assert hanabi == runc == "userns-refused\n"
    runc, hanabi = under_both(docker, "--security-opt", "seccomp=unconfined", cmd=USERNS)
    assert hanabi == runc == "userns-allowed\n"


def test_sysctl_ulimit_and_pids_limit(docker):
    cmd = ("cat /proc/sys/kernel/shmmax /proc/sys/kernel/msgmax; ulimit -n; ulimit -Hn; "
           "cat /sys/fs/cgroup/pids.max 2>/dev/null || cat /sys/fs/cgroup/pids/pids.max")
    runc, hanabi = under_both(docker, "--sysctl", "kernel.shmmax=123456789", "--sysctl", "kernel.msgmax=4096",
                              "--ulimit", "nofile=123:456", "--pids-limit", "42", cmd=cmd)
    assert hanabi == runc == "123456789\n4096\n123\n456\n42\n"


def test_privileged_gets_the_vms_devices_and_writable_proc(docker):
    """runc cannot run --privileged on this host (its dockerd lacks capabilities to give)."""
    # The VM's own devices: memory, kernel log, its serial console (disks only where the
    # root is a disk: the shared root filesystem has none; the agent's port is never given).
    cmd = (f"{STATUS}; ls /dev | grep -c -E '^(vd[a-z]|mem|kmsg|ttyS0)$'; "
           "echo 1 > /proc/sys/kernel/shmmni && echo proc-writable; grep -c ' /proc/kcore ' /proc/self/mountinfo || true")
    done = docker.run_hanabi("--privileged", cmd=["sh", "-c", cmd])
    assert done.returncode == 0, done.stderr
    lines = done.stdout.split("\n")
    status = dict(line.split(":\t") for line in lines[:8])
    # Every capability Docker asked for: those it knows of here (CAP_CHOWN..CAP_AUDIT_READ at least).
    assert status["CapPrm"] == status["CapEff"] == status["CapBnd"]
    assert int(status["CapEff"], 16) & (1 << 38) - 1 == (1 << 38) - 1
    assert (status["NoNewPrivs"], status["Seccomp"]) == ("0", "0")
    assert int(lines[8]) >= 3 and lines[9:11] == ["proc-writable", "0"]
