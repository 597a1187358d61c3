"""VM templates (vmm.templates): a container's VM is a clone of a template booted once per
guest image and size, restored with real QEMU; clones are independent machines, a stale
template is rebuilt, a vmmd SIGKILL keeps templates and clones, nothing leaks."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from hanabi_runtime.demo_bundle import make_bundle
from hanabi_vmmd.client import VmmdClient
from tests.helpers.hanabi import GUEST_DIR, daemons_for_test, leftovers, processes_mentioning

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def templated(tmp_path_factory):
    with daemons_for_test(tmp_path_factory.mktemp("hanabi"), vmm_toml="templates = true") as daemons:
        yield daemons


def record(daemons, cid: str) -> dict:
    return json.loads((daemons.config.sandboxes_dir / cid / "hypervisor.json").read_text())


def templates_on_disk(daemons) -> list[str]:
    root = daemons.config.run_dir / "templates"
    return sorted(p.name for p in root.iterdir() if p.name != "build") if root.is_dir() else []


def vmmd_fds(daemons) -> list[str]:
    pid = daemons.procs["vmmd"].pid
    return sorted(os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd"))


def test_a_clone_runs_a_container_and_answers_the_agent(templated, tmp_path):
    bundle = make_bundle(tmp_path / "b", ["sh", "-c", "echo hello from $(hostname); cat /proc/sys/kernel/random/boot_id"])
    first = templated.runtime("run", "--bundle", str(bundle), "tpl-first", check=True)
    assert b"hello from" in first.stdout
    assert templates_on_disk(templated), "no template was built"
    fds_before = vmmd_fds(templated)
    began = time.monotonic()
    second = templated.runtime("create", "--bundle", str(bundle), "tpl-second", check=True)
    created_s = time.monotonic() - began
    try:
        rec = record(templated, "tpl-second")
        assert rec["template"] == templates_on_disk(templated)[0]
        templated.runtime("start", "tpl-second", check=True)
    finally:
        templated.runtime("delete", "--force", "tpl-second")
    print(f"create from a clone: {created_s:.2f}s; {second.stdout}")
    for cid in ("tpl-first", "tpl-second"):
        assert leftovers(templated, cid) == []
    assert processes_mentioning("hanabi-template-") == []  # the template's QEMU ended after its save
    assert vmmd_fds(templated) == fds_before
