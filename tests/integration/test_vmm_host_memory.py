"""How a real QEMU that vmmd starts uses host memory (vmm.transparent_hugepages, vmm.ksm):
by default it runs without transparent huge pages (inherited from vmmd's PR_SET_THP_DISABLE)
and none of its memory is mergeable by KSM; with both keys on, its guest RAM is mergeable
and the host's THP policy applies again. Read from /proc/PID/status and /proc/PID/smaps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hanabi_runtime.demo_bundle import make_bundle
from tests.helpers.hanabi import daemons_for_test, leftovers

pytestmark = pytest.mark.integration


def vmm_memory(daemons, cid: str) -> tuple[str, int, int]:
    """(THP_enabled of the container's QEMU, how many of its mappings are mergeable, how
    many of those map the template's memory file)."""
    pid = json.loads((daemons.config.sandboxes_dir / cid / "hypervisor.json").read_text())["pid"]
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    mergeable = guest_ram = 0
    mapping = ""
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        if line.startswith("VmFlags:"):
            if " mg" in line:
                mergeable += 1
                guest_ram += mapping.rstrip().endswith("/memory")
        elif not line[:1].isupper():
            mapping = line
    return status["THP_enabled"].strip(), mergeable, guest_ram


@pytest.mark.parametrize("toml, thp, merged", [
    ("templates = true", "0", False),
    ("templates = true\ntransparent_hugepages = true\nksm = true", "1", True),
], ids=["default", "on"])
def test_vmm_thp_and_mergeable_ram_follow_the_config(tmp_path_factory, tmp_path, toml, thp, merged):
    # a short root: a clone's socket paths must fit in sun_path (else it boots cold)
    with daemons_for_test(tmp_path_factory.mktemp("hm"), vmm_toml=toml) as daemons:
        bundle = make_bundle(tmp_path / "b", ["sleep", "60"])
        cid = "hostmem"
        daemons.runtime("run", "--bundle", str(make_bundle(tmp_path / "t", ["true"])), "hostmem-template", check=True)
        daemons.runtime("create", "--bundle", str(bundle), cid, check=True)
        try:
            daemons.runtime("start", cid, check=True)
            record = json.loads((daemons.config.sandboxes_dir / cid / "hypervisor.json").read_text())
            enabled, mergeable, guest_ram = vmm_memory(daemons, cid)
        finally:
            daemons.runtime("delete", "--force", cid)
        assert record["template"], f"the VM is not a clone: {record}"
        assert enabled == thp
        if merged:
            assert guest_ram == 1 and mergeable >= 1  # the clone's RAM (the template's file), and QEMU's ROMs
        else:
            assert mergeable == 0
        assert leftovers(daemons, cid) == [] and leftovers(daemons, "hostmem-template") == []
