"""The warm pool (vmm.pool_size): a container of the default size gets a VM booted before
it was asked for; the pool refills, survives a vmmd restart, and a claimed VM is torn down
with its container like any other."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from hanabi_runtime.demo_bundle import make_bundle
from hanabi_vmmd.client import VmmdClient
from tests.helpers.hanabi import daemons_for_test, leftovers
from tests.helpers.netns import netns_pair

pytestmark = pytest.mark.integration


@pytest.fixture
def pooled(tmp_path):
    with daemons_for_test(tmp_path / "hanabi", vmm_toml="pool_size = 1") as daemons:
        yield daemons


def wait_for_pool(vmmd: VmmdClient, timeout: float = 60.0, other_than: int | None = None):
    deadline = time.monotonic() + timeout
    while True:
        vms = [vm for vm in vmmd.pool().vms if vm.pid != other_than]
        if vms:
            return vms[0]
        assert time.monotonic() < deadline, "the pool did not fill"
        time.sleep(0.2)


def test_a_container_takes_the_pooled_vm_and_the_pool_refills(pooled, tmp_path):
    vmmd = VmmdClient(pooled.config)
    ready = wait_for_pool(vmmd)
    text = vmmd.rpc.call("metrics", {})["text"]
    assert 'hanabi_pool_free{daemon="vmmd"} 1.0' in text and 'hanabi_pool_size{daemon="vmmd"} 1.0' in text
    pair = netns_pair()
    cid = "from-the-pool"
    try:
        bundle = make_bundle(tmp_path / "bundle", ["sh", "-c", "cat /sys/class/net/eth0/address; sleep 30"])
        config = json.loads((bundle / "config.json").read_text())
        config["linux"]["namespaces"] = [ns for ns in config["linux"]["namespaces"] if ns["type"] != "network"] + [
            {"type": "network", "path": pair.inner_path}]
        (bundle / "config.json").write_text(json.dumps(config))
        pooled.runtime("create", "--bundle", str(bundle), cid, check=True)
        assert vmmd.get(cid).pid == ready.pid           # the VM booted before the container existed
        assert vmmd.get(cid).nics == ["nic0"]           # its NIC was hot-plugged
        pooled.runtime("start", cid, check=True)
        pinged = subprocess.run(["ip", "netns", "exec", pair.outer, "busybox", "ping", "-c", "1", "-W", "5",
                                 pair.inner_ip], capture_output=True, text=True)
        assert pinged.returncode == 0, pinged.stdout + pinged.stderr
        refill = wait_for_pool(vmmd, other_than=ready.pid)
        assert refill.sandbox_id != ready.sandbox_id
        pooled.runtime("delete", "--force", cid, check=True)
        assert leftovers(pooled, cid) == []
        assert not os.path.exists(f"/proc/{ready.pid}")
        assert pair.leftovers() == []

        pooled.stop("vmmd", sig=signal.SIGKILL)         # the pooled VM outlives vmmd and is found again
        pooled.start("vmmd")
        vmmd = VmmdClient(pooled.config)
        assert wait_for_pool(vmmd, timeout=10).pid == refill.pid
    finally:
        pooled.runtime("delete", "--force", cid)
        pair.destroy()
