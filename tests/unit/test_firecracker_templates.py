"""Firecracker snapshots as VM templates, against the stand-in `firecracker` (no Firecracker
runs on this machine): what the backend sends to save a template and to restore a clone, each
body checked against the vendored v1.16.1 spec (strict: no field the spec lacks), the clone's
own placeholders and sockets, failures leaving nothing running."""

from __future__ import annotations

from pathlib import Path

import pytest

from hanabi_common.errors import FailedPrecondition, InvalidArgument
from hanabi_vmmd import proc
from hanabi_vmmd.firecracker import boot, snapshot
from hanabi_vmmd.firecracker.process import JailerConfig
from hanabi_vmmd.firecracker.spec import load_spec
from hanabi_vmmd.hypervisor import NicSpec
from tests.unit.test_firecracker_backend import backend, env, make_spec, requests_of  # noqa: F401
from tests.unit.test_firecracker_contract import spec_path_for, validate


@pytest.fixture(scope="module")
def fc_spec() -> dict:
    return load_spec()


def checked(fc_spec: dict, requests: list[dict]) -> list[tuple[str, str]]:
    """(method, path) of every request but GET /, each body validated against the spec."""
    steps = []
    for r in requests:
        if (r["method"], r["path"]) == ("GET", "/"):
            continue
        validate(fc_spec, r["method"], spec_path_for(fc_spec, r["path"]), r["body"])
        steps.append((r["method"], r["path"]))
    return steps


def test_save_pauses_and_writes_a_full_snapshot(env, fc_spec):
    fc = backend(env)
    handle = fc.start(make_spec(env))
    try:
        state = env["root"] / "state"
        state.write_bytes(b"snapshot")  # the fake writes nothing; Firecracker would
        before = len(requests_of(env))
        assert fc.save_template(handle, state, env["root"] / "memory") == len(b"snapshot")
        saved = requests_of(env)[before:]
        assert checked(fc_spec, saved) == [("PATCH", "/vm"), ("PUT", "/snapshot/create")]
        assert saved[0]["body"] == {"state": "Paused"}
        assert saved[1]["body"] == {"snapshot_path": str(state), "mem_file_path": str(env["root"] / "memory"),
                                    "snapshot_type": "Full"}
    finally:
        fc.stop(handle, 2.0)


def test_a_clone_loads_the_snapshot_with_its_own_vsock_and_placeholders_then_resumes(env, fc_spec):
    fc = backend(env)
    spec = make_spec(env, memory_file=env["root"] / "tpl" / "memory", incoming=True)
    state = env["root"] / "tpl" / "state"
    handle = fc.restore(spec, state)
    try:
        assert fc.is_alive(handle) and handle.agent_socket == spec.vm_dir / "fc-vsock.sock"
        reqs = requests_of(env)
        steps = checked(fc_spec, reqs)
        assert steps == [("PUT", "/logger"), ("PUT", "/metrics"), ("PUT", "/snapshot/load"),
                         ("PATCH", "/drives/ph0"), ("PATCH", "/drives/ph1"), ("PATCH", "/drives/ph2"),
                         ("PATCH", "/drives/ph3"), ("PATCH", "/vm")]
        bodies = {(r["method"], r["path"]): r["body"] for r in reqs}
        assert bodies[("PUT", "/snapshot/load")] == {
            "snapshot_path": str(state),
            "mem_backend": {"backend_type": "File", "backend_path": str(spec.memory_file)},
            "resume_vm": False, "vsock_override": {"uds_path": str(spec.vm_dir / "fc-vsock.sock")}}
        for i in range(4):
            own = spec.vm_dir / f"ph{i}.img"
            assert bodies[("PATCH", f"/drives/ph{i}")] == {"drive_id": f"ph{i}", "path_on_host": str(own)}
            assert own.stat().st_size == boot.PLACEHOLDER_SIZE
        assert bodies[("PATCH", "/vm")] == {"state": "Resumed"}
        assert ("PUT", "/actions") not in bodies and ("PUT", "/boot-source") not in bodies
    finally:
        fc.stop(handle, 2.0)
    assert not fc.is_alive(handle)


def test_a_clone_with_a_nic_overrides_the_tap(env, fc_spec):
    fc = backend(env)
    nic = NicSpec("nic0", "tap-clone", "02:00:00:00:00:09")
    handle = fc.restore(make_spec(env, memory_file=env["root"] / "memory", nics=(nic,)), env["root"] / "state")
    try:
        load = next(r for r in requests_of(env) if r["path"] == "/snapshot/load")
        validate(fc_spec, "PUT", "/snapshot/load", load["body"])
        assert load["body"]["network_overrides"] == [{"iface_id": "eth0", "host_dev_name": "tap-clone"}]
    finally:
        fc.stop(handle, 2.0)


def test_a_refused_load_leaves_nothing_running(env, monkeypatch):
    monkeypatch.setenv("FAKE_FC_FAIL", "PUT /snapshot/load")
    fc = backend(env)
    spawned = []
    with pytest.raises(InvalidArgument, match="fake refuses PUT /snapshot/load"):
        fc.restore(make_spec(env, memory_file=env["root"] / "memory"), env["root"] / "state", spawned.append)
    assert spawned and not proc.is_alive(spawned[0].pid, spawned[0].start_time)


def test_templates_are_refused_under_the_jailer_and_without_a_memory_file(env):
    jailed = backend(env, jailer=JailerConfig(binary="/nonexistent/jailer", uid=0, gid=0,
                                              chroot_base=Path("/nonexistent")))
    with pytest.raises(FailedPrecondition, match="jailer"):
        jailed.restore(make_spec(env, memory_file=env["root"] / "memory"), env["root"] / "state")
    with pytest.raises(InvalidArgument, match="memory file"):
        backend(env).restore(make_spec(env), env["root"] / "state")
    assert requests_of(env) == []


def test_the_sequences_refuse_missing_files():
    with pytest.raises(InvalidArgument):
        snapshot.restore_sequence(snapshot.FcRestoreSpec(state_path="", memory_path="/m", vsock_uds_path="/v",
                                                         placeholders=()))
    assert [s[:2] for s in snapshot.snapshot_sequence("/s", "/m")] == [("PATCH", "/vm"), ("PUT", "/snapshot/create")]
