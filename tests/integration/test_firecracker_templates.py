"""VM templates for Firecracker VMs, in a real `hanabi-vmmd serve`.

With the stand-in `firecracker` (tests/helpers/fake_firecracker.py: the v1.16.1 API as the
vendored spec states it, snapshots written and loaded, a guest agent over hybrid vsock; no VM
boots): the first VM builds the template, every VM is a clone, a vmmd SIGKILL keeps the
template and the clone, nothing is left after vm.stop. With a real Firecracker (where one runs:
not on this machine) the whole slice: containers in cloned microVMs."""

from __future__ import annotations

import json
import shutil
import signal
import tempfile
import time
from pathlib import Path

import pytest

from hanabi_runtime.demo_bundle import make_bundle
from hanabi_vmmd import proc
from hanabi_vmmd.client import VmmdClient
from tests.helpers import fake_firecracker
from tests.helpers.firecracker_host import firecracker_skip_reason
from tests.helpers.hanabi import Daemons, daemons_for_test, leftovers, processes_mentioning

pytestmark = pytest.mark.integration


@pytest.fixture
def stand_in_vmmd(monkeypatch):
    """A vmmd whose Firecracker is the stand-in, under a short temp dir (socket paths), no
    spare VMMs (the tests count the VMMs it starts)."""
    yield from _stand_in_vmmd(monkeypatch, spares=0)


@pytest.fixture
def stand_in_vmmd_with_a_spare(monkeypatch):
    """The same with one spare VMM."""
    yield from _stand_in_vmmd(monkeypatch, spares=1)


def _stand_in_vmmd(monkeypatch, spares: int):
    root = Path(tempfile.mkdtemp(prefix="hft"))
    fake = fake_firecracker.install(root)
    guest = fake_firecracker.fake_guest(root / "guest", b"initrd")
    monkeypatch.setenv("FAKE_FC_RECORD", str(root / "record.jsonl"))  # vmmd's children inherit it
    config = root / "hanabi.toml"
    config.write_text(f'run_dir = "{root}/run"\nlog_level = "debug"\n'
                      f'[vmm]\nguest_dir = "{guest}"\nhypervisor = "firecracker"\ntemplates = true\n'
                      f'stop_timeout_s = 2.0\nboot_timeout_s = 20.0\nspare_vmms = {spares}\n'
                      f'[vmm.firecracker]\nbinary = "{fake}"\n')
    daemon = Daemons(root=root, config_path=config)
    daemon.start("vmmd")
    try:
        yield daemon
    finally:
        daemon.stop_all()  # and whatever the stand-ins left
        shutil.rmtree(root, ignore_errors=True)


def processes(root: Path) -> list[list[str]]:
    """Per stand-in process, in start order: its calls (`METHOD PATH`, `agent TYPE`)."""
    seen: dict[int, list[str]] = {}
    for entry in fake_firecracker.read_record(root / "record.jsonl"):
        if "argv" in entry:
            seen[entry["pid"]] = []
        elif "agent" in entry:
            seen[entry["pid"]].append(f"agent {entry['agent']}")
        elif "refused" in entry:
            seen[entry["pid"]].append(f"refused {entry['refused']}")
        elif (entry["method"], entry["path"]) != ("GET", "/"):
            seen[entry["pid"]].append(f"{entry['method']} {entry['path']}")
    return list(seen.values())


def test_vmmd_clones_firecracker_vms_and_keeps_template_and_clone_across_a_sigkill(stand_in_vmmd):
    daemon = stand_in_vmmd
    client = VmmdClient(daemon.config, timeout=30)
    first = client.create("sb1", memory_mib=128)
    assert first.hypervisor == "firecracker" and first.agent_transport == "hybrid_vsock"
    record = json.loads((daemon.config.sandboxes_dir / "sb1" / "hypervisor.json").read_text())
    templates = daemon.config.run_dir / "templates"
    assert record["template"] and (templates / record["template"] / "template.json").is_file()
    template, clone = processes(daemon.root)
    assert template[-4:] == ["agent ping", "agent restored", "PATCH /vm", "PUT /snapshot/create"]
    assert clone[2] == "PUT /snapshot/load" and clone[-2:] == ["PATCH /vm", "agent restored"]
    assert not any("refused" in call for call in template + clone)

    daemon.stop("vmmd", signal.SIGKILL)  # the clone keeps running; the next vmmd adopts it
    assert proc.is_alive(first.pid, None)
    daemon.start("vmmd")
    assert client.get("sb1").state == "running"
    second = client.create("sb2", memory_mib=128)  # from the same template: no new build
    assert json.loads((daemon.config.sandboxes_dir / "sb2" / "hypervisor.json").read_text())["template"] == \
        record["template"]
    assert len(processes(daemon.root)) == 3
    for sid, pid in (("sb1", first.pid), ("sb2", second.pid)):
        assert client.stop(sid).existed
        assert not proc.is_alive(pid, None)
    vmmd_pid = daemon.procs["vmmd"].pid
    assert [p for p in processes_mentioning(str(daemon.root)) if p != vmmd_pid] == []
    assert list((daemon.config.run_dir / "vm").iterdir()) == []


def spare_pid(daemon: Daemons) -> int:
    """The pid of the spare VMM vmmd reports ready (waited for)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        text = VmmdClient(daemon.config).rpc.call("metrics", {})["text"]
        records = list((daemon.config.run_dir / "spares").glob("*/hypervisor.json"))
        if records and 'hanabi_spare_vmms_ready{daemon="vmmd"} 1.0' in text:
            return json.loads(records[0].read_text())["pid"]
        time.sleep(0.05)
    raise AssertionError("no spare firecracker became ready")


def test_a_firecracker_clone_takes_a_spare_vmm_that_waited_unconfigured(stand_in_vmmd_with_a_spare):
    daemon = stand_in_vmmd_with_a_spare
    client = VmmdClient(daemon.config, timeout=30)
    client.create("sb1", memory_mib=128)
    spare = spare_pid(daemon)
    waiting = processes(daemon.root)[-1]
    assert waiting == [], f"a spare firecracker must wait unconfigured, it got {waiting}"
    second = client.create("sb2", memory_mib=128)
    assert second.pid == spare
    calls = processes(daemon.root)[2]  # template, sb1's clone, the spare that became sb2's
    assert calls[2] == "PUT /snapshot/load" and calls[-2:] == ["PATCH /vm", "agent restored"]
    assert not any("refused" in call for call in calls)
    replacement = spare_pid(daemon)
    assert replacement != spare
    for sid in ("sb1", "sb2"):
        assert client.stop(sid).existed
    daemon.stop("vmmd")  # kills its spare
    assert not proc.is_alive(replacement, None)
    assert [p for p in processes_mentioning(str(daemon.root))] == []
    assert list((daemon.config.run_dir / "vm").iterdir()) == []


@pytest.fixture(scope="module")
def fc_templated(tmp_path_factory):
    """The four daemons, VMs under a real Firecracker, templates on."""
    with daemons_for_test(tmp_path_factory.mktemp("hanabi-fct"), firecracker_skip_reason,
                          vmm_toml="templates = true") as daemons:
        yield daemons


def test_real_firecracker_containers_run_in_clones(fc_templated, tmp_path):
    """Needs a `firecracker` (>= 1.8) on PATH and a usable /dev/kvm; skips here, saying which."""
    bundle = make_bundle(tmp_path / "b", ["sh", "-c", "echo hello from $(hostname)"])
    for cid in ("fct-first", "fct-second"):
        fc_templated.runtime("--hypervisor", "firecracker", "create", "--bundle", str(bundle), cid, check=True)
        try:
            rec = json.loads((fc_templated.config.sandboxes_dir / cid / "hypervisor.json").read_text())
            assert rec["hypervisor"] == "firecracker" and rec["template"], rec
            fc_templated.runtime("start", cid, check=True)
        finally:
            fc_templated.runtime("delete", "--force", cid)
        assert leftovers(fc_templated, cid) == []
