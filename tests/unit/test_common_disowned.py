"""Sandboxes disowned by a delete while a daemon was down: the plan, the runtime's half
(`disown`) and each daemon's half (`reconcile`) on a real state directory."""

from __future__ import annotations

import json
import logging

from hanabi_common import disowned
from hanabi_common.errors import Unavailable
from hanabi_common.state import StateStore, VersionedState


class _File(VersionedState):
    owner: str = ""


def test_plan_tears_down_only_disowned_sandboxes_with_our_file():
    listing = {
        "gone-vm": {"disowned.json", "hypervisor.json", "devices.json"},
        "gone-net": {"disowned.json", "network.json"},
        "alive": {"state.json", "hypervisor.json"},          # a container: never touched
        "direct": {"hypervisor.json"},                        # a VM made without the runtime
        "empty-marker": {"disowned.json", ".disowned.json.tmp"},
    }
    vmmd = disowned.plan(listing, "hypervisor")
    assert vmmd.teardown == ["gone-vm"]
    assert vmmd.finished == ["empty-marker"]
    netd = disowned.plan(listing, "network")
    assert netd.teardown == ["gone-net"] and netd.finished == ["empty-marker"]


def test_disown_keeps_the_files_of_the_daemons_that_are_down(tmp_path):
    store = StateStore(tmp_path)
    for name in ("state", "exec-x1", "agent", "hypervisor", "devices", "network"):
        store.write("c1", name, _File())
    (store.sandbox_dir("c1") / "fifo").write_text("")
    assert disowned.disown(store, "c1", ["blockd", "vmmd"])
    assert sorted(p.name for p in store.sandbox_dir("c1").iterdir()) == [
        "devices.json", "disowned.json", "hypervisor.json"]
    marker = json.loads(store.path("c1", "disowned").read_text())
    assert marker["pending"] == ["blockd", "vmmd"] and marker["container_id"] == "c1"
    # Nothing of a daemon that is down: nothing to mark, the directory goes.
    store.write("c2", "state", _File())
    assert not disowned.disown(store, "c2", ["netd"])
    assert not store.sandbox_dir("c2").exists()


def test_each_daemon_reconciles_its_part_and_the_last_removes_the_directory(tmp_path, caplog):
    store = StateStore(tmp_path)
    for name in ("hypervisor", "devices"):
        store.write("c1", name, _File())
    store.write("kept", "hypervisor", _File())
    disowned.mark(store, "c1", ["blockd", "vmmd"])
    torn: list[tuple[str, str]] = []
    with caplog.at_level(logging.WARNING):
        assert disowned.reconcile(store, "hypervisor", lambda sid: torn.append(("vmmd", sid)),
                                  logging.getLogger("test.vmmd")) == ["c1"]
    assert "removed what a container deleted while this daemon was down left" in caplog.text
    assert store.sandbox_dir("c1").exists() and not store.path("c1", "hypervisor").exists()
    assert store.path("kept", "hypervisor").exists()  # not disowned: left alone

    def failing(sid):
        raise Unavailable("the pool is busy")

    assert disowned.reconcile(store, "devices", failing, logging.getLogger("test.blockd")) == []
    assert store.path("c1", "devices").exists()  # kept for the next start
    assert disowned.reconcile(store, "devices", lambda sid: torn.append(("blockd", sid)),
                              logging.getLogger("test.blockd")) == ["c1"]
    assert torn == [("vmmd", "c1"), ("blockd", "c1")]
    assert not store.sandbox_dir("c1").exists()
    assert store.list_sandboxes() == ["kept"]


def test_netd_sweeps_only_namespaces_no_state_claims():
    from hanabi_netd.service import orphan_netns

    entries = ["/run/hanabi/netns/a", "/run/hanabi/netns/b", "/run/hanabi/netns/c"]
    assert orphan_netns(entries, {"/run/hanabi/netns/b", "/var/run/docker/netns/x"}) == [
        "/run/hanabi/netns/a", "/run/hanabi/netns/c"]
    assert orphan_netns([], set()) == []
