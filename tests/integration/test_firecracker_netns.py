"""The Firecracker process runs in the network namespace of its boot NIC's tap (Firecracker
opens taps by name in its own namespace). Root only: it makes a namespace with `ip netns`.
The stand-in firecracker (tests/helpers/fake_firecracker.py) records the namespace it runs in."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from hanabi_vmmd.firecracker.backend import FirecrackerHypervisor
from hanabi_vmmd.hypervisor import NicSpec, VmSpec
from tests.helpers import fake_firecracker

pytestmark = pytest.mark.integration


@pytest.fixture
def netns():
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 (ip netns)")
    name = f"hanabi-fct-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    yield f"/run/netns/{name}"
    subprocess.run(["ip", "netns", "delete", name], check=False)


def test_firecracker_is_spawned_in_the_taps_namespace(netns, monkeypatch):
    root = Path(tempfile.mkdtemp(prefix="hfn"))
    try:
        fake = fake_firecracker.install(root)
        fake_firecracker.fake_guest(root)
        monkeypatch.setenv("FAKE_FC_RECORD", str(root / "rec"))
        spec = VmSpec.in_dir("sb", root / "vm" / "0123456789abcdef", FirecrackerHypervisor.files, memory_mib=128, vcpus=1,
                             kernel=root / "vmlinux", initrd=root / "initrd.img", cmdline="quiet", accel="kvm",
                             nics=(NicSpec("nic0", "tap0", "02:00:00:00:00:01", netns_path=netns),))
        fc = FirecrackerHypervisor(binary=str(fake), start_timeout=10)
        handle = fc.start(spec)
        fc.stop(handle, timeout=5)
        seen = fake_firecracker.read_record(root / "rec")[0]["netns"]
        assert seen == f"net:[{os.stat(netns).st_ino}]"
        assert seen != os.readlink("/proc/self/ns/net")
    finally:
        shutil.rmtree(root, ignore_errors=True)
