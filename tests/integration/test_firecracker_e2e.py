"""The whole slice on Firecracker: hanabi-runtime --hypervisor firecracker -> four daemons ->
a real Firecracker microVM (ELF vmlinux, ACPI virtio-mmio devices, placeholder drives) ->
the guest agent over hybrid vsock -> a container.

These need a `firecracker` binary (>= 1.8) on PATH and a /dev/kvm that boots stock guest
kernels; elsewhere they skip, saying which of the two is missing."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import pytest

from hanabi_vmmd.client import VmmdClient
from tests.helpers.firecracker_host import firecracker_skip_reason
from tests.helpers.hanabi import GUEST_DIR, daemons_for_test, leftovers

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def fc(tmp_path_factory):
    """The four daemons, for VMs that run under Firecracker."""
    with daemons_for_test(tmp_path_factory.mktemp("hanabi-fc"), firecracker_skip_reason) as daemons:
        yield daemons


def fc_runtime(daemons, *args, **kwargs):
    return daemons.runtime("--hypervisor", "firecracker", *args, **kwargs)


def guest_kernel() -> str:
    return json.loads((GUEST_DIR / "manifest.json").read_text())["kernel_release"]


def test_run_prints_the_guest_kernel_and_leaves_nothing(fc, bundle, cid):
    done = fc_runtime(fc, "run", "--bundle", bundle(["uname", "-r"]), cid)
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode().strip() == guest_kernel() != platform.release()
    assert leftovers(fc, cid) == []


def test_the_vm_is_firecracker_reached_over_hybrid_vsock(fc, bundle, cid, tmp_path):
    fc_runtime(fc, "create", "--bundle", bundle(["sleep", "60"]), "--pid-file",
               str(tmp_path / "pid"), cid, check=True)
    try:
        vm = VmmdClient(fc.config).get(cid)
        assert vm.hypervisor == "firecracker" and vm.accel == "kvm"
        assert vm.agent_transport == "hybrid_vsock" and vm.agent_port == 1024
        assert vm.agent_socket.endswith("fc-vsock.sock") and vm.disks  # a placeholder swapped
        fc_runtime(fc, "pause", cid, check=True)
        assert fc.state(cid)["status"] == "paused"
        fc_runtime(fc, "resume", cid, check=True)
        fc_runtime(fc, "start", cid, check=True)
        assert fc.state(cid)["status"] == "running"
    finally:
        fc_runtime(fc, "delete", "--force", cid)
    assert leftovers(fc, cid) == []


@pytest.mark.parametrize("script,status", [("exit 0", 0), ("exit 3", 3)])
def test_exit_status_and_stdio(fc, bundle, cid, script, status):
    payload = b"through firecracker\n" * 200
    done = fc_runtime(fc, "run", "--bundle", bundle(["sh", "-c", f"cat; echo err >&2; {script}"]), cid,
                      input=payload)
    assert done.returncode == status, done.stderr.decode()
    assert done.stdout == payload and done.stderr == b"err\n"


def test_a_bind_mount_arrives_on_a_second_placeholder(fc, bundle, cid, tmp_path):
    src = tmp_path / "data"
    src.mkdir()
    (src / "hello.txt").write_text("from the host\n")
    path = bundle(["cat", "/data/hello.txt"])
    config = Path(path) / "config.json"
    spec = json.loads(config.read_text())
    spec["mounts"] += [{"destination": "/data", "type": "bind", "source": str(src), "options": ["rbind"]}]
    config.write_text(json.dumps(spec))
    began = time.monotonic()
    done = fc_runtime(fc, "run", "--bundle", path, cid)
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout == b"from the host\n"
    assert time.monotonic() - began < 60
