"""hanabi_runtime.docker_install: the daemon.json runtime entries (pure functions, then file I/O)."""

from __future__ import annotations

import json
import os
import stat

import pytest
from typer.testing import CliRunner

from hanabi_common.errors import FailedPrecondition, InvalidArgument
from hanabi_runtime import docker_install as di
from hanabi_runtime.cli import app

RT = "/usr/local/bin/hanabi-runtime"


def test_add_runtimes_makes_three_entries_choosing_the_hypervisor():
    doc = di.add_runtimes({}, RT, None)
    assert doc == {"runtimes": {
        "hanabi": {"path": RT, "runtimeArgs": ["--hypervisor", "auto"]},
        "hanabi-qemu": {"path": RT, "runtimeArgs": ["--hypervisor", "qemu"]},
        "hanabi-fc": {"path": RT, "runtimeArgs": ["--hypervisor", "firecracker"]},
    }}


def test_add_runtimes_appends_the_config_path():
    doc = di.add_runtimes({}, RT, "/etc/hanabi/hanabi.toml")
    for name, hypervisor in (("hanabi", "auto"), ("hanabi-qemu", "qemu"), ("hanabi-fc", "firecracker")):
        assert doc["runtimes"][name]["runtimeArgs"] == ["--hypervisor", hypervisor, "--config", "/etc/hanabi/hanabi.toml"]


def test_add_runtimes_keeps_everything_else_and_does_not_mutate_its_input():
    original = {"log-level": "warn", "storage-driver": "overlay2", "default-runtime": "runc",
                "runtimes": {"kata": {"path": "/usr/bin/kata-runtime", "runtimeArgs": ["--x"]}}}
    snapshot = json.loads(json.dumps(original))
    doc = di.add_runtimes(original, RT, None)
    assert original == snapshot
    assert doc["log-level"] == "warn" and doc["storage-driver"] == "overlay2" and doc["default-runtime"] == "runc"
    assert doc["runtimes"]["kata"] == {"path": "/usr/bin/kata-runtime", "runtimeArgs": ["--x"]}
    assert list(doc) == list(original)  # key order kept
    assert set(doc["runtimes"]) == {"kata", "hanabi", "hanabi-qemu", "hanabi-fc"}


def test_add_runtimes_replaces_stale_hanabi_entries():
    doc = di.add_runtimes({"runtimes": {"hanabi": {"path": "/old/hanabi-runtime"}}}, RT, None)
    assert doc["runtimes"]["hanabi"] == {"path": RT, "runtimeArgs": ["--hypervisor", "auto"]}


@pytest.mark.parametrize("bad", [[], "x", 3, None, [{"runtimes": {}}]])
def test_a_document_that_is_not_an_object_is_refused(bad):
    with pytest.raises(InvalidArgument, match="JSON object"):
        di.add_runtimes(bad, RT, None)
    with pytest.raises(InvalidArgument, match="JSON object"):
        di.remove_runtimes(bad)


@pytest.mark.parametrize("bad", [[], "runc", 1, True])
def test_runtimes_that_is_not_an_object_is_refused(bad):
    with pytest.raises(InvalidArgument, match='"runtimes"'):
        di.add_runtimes({"runtimes": bad}, RT, None)
    with pytest.raises(InvalidArgument, match='"runtimes"'):
        di.remove_runtimes({"runtimes": bad})


@pytest.mark.parametrize("path", ["", "   ", None])
def test_an_empty_runtime_path_is_refused(path):
    with pytest.raises(InvalidArgument):
        di.add_runtimes({}, path, None)


def test_remove_runtimes_removes_exactly_the_three():
    doc = di.add_runtimes({"debug": True, "runtimes": {"kata": {"path": "/k"}, "hanabi-other": {"path": "/o"}}}, RT, None)
    removed = di.remove_runtimes(doc)
    assert removed == {"debug": True, "runtimes": {"kata": {"path": "/k"}, "hanabi-other": {"path": "/o"}}}


def test_remove_runtimes_drops_an_emptied_runtimes_object_and_roundtrips():
    original = {"log-level": "info"}
    assert di.remove_runtimes(di.add_runtimes(original, RT, "/c.toml")) == original


def test_remove_runtimes_without_runtimes_is_a_no_op():
    assert di.remove_runtimes({"debug": False}) == {"debug": False}
    assert di.remove_runtimes({}) == {}


def test_remove_refuses_while_hanabi_is_the_default_runtime():
    doc = di.add_runtimes({"default-runtime": "hanabi"}, RT, None)
    with pytest.raises(FailedPrecondition, match="default-runtime"):
        di.remove_runtimes(doc)


def test_parse_daemon_json():
    assert di.parse_daemon_json("") == {}
    assert di.parse_daemon_json(" \n") == {}
    assert di.parse_daemon_json('{"a": 1}') == {"a": 1}
    with pytest.raises(InvalidArgument, match="not valid JSON"):
        di.parse_daemon_json("{")
    with pytest.raises(InvalidArgument, match="JSON object"):
        di.parse_daemon_json("[]")


# -- file I/O ------------------------------------------------------------------------------

def test_install_creates_a_missing_file_with_a_trailing_newline(tmp_path):
    path = tmp_path / "etc" / "docker" / "daemon.json"
    result = di.install(path, runtime_path=RT)
    assert result.changed and result.created and result.reload_needed
    raw = path.read_text()
    assert raw.endswith("}\n") and not raw.endswith("\n\n")
    assert set(json.loads(raw)["runtimes"]) == {"hanabi", "hanabi-qemu", "hanabi-fc"}
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_install_keeps_other_settings_and_the_file_mode(tmp_path):
    path = tmp_path / "daemon.json"
    path.write_text('{"data-root": "/srv/docker", "runtimes": {"kata": {"path": "/k"}}}')
    os.chmod(path, 0o600)
    di.install(path, runtime_path=RT, config_path="/etc/hanabi/hanabi.toml")
    doc = json.loads(path.read_text())
    assert doc["data-root"] == "/srv/docker" and doc["runtimes"]["kata"] == {"path": "/k"}
    assert doc["runtimes"]["hanabi-fc"]["runtimeArgs"][-2:] == ["--config", "/etc/hanabi/hanabi.toml"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_install_twice_changes_nothing_the_second_time(tmp_path):
    path = tmp_path / "daemon.json"
    di.install(path, runtime_path=RT)
    before = path.stat().st_mtime_ns, path.read_bytes()
    again = di.install(path, runtime_path=RT)
    assert not again.changed and not again.reload_needed
    assert (path.stat().st_mtime_ns, path.read_bytes()) == before


def test_install_makes_a_relative_config_path_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    di.install(tmp_path / "daemon.json", runtime_path=RT, config_path="hanabi.toml")
    args = json.loads((tmp_path / "daemon.json").read_text())["runtimes"]["hanabi"]["runtimeArgs"]
    assert args == ["--hypervisor", "auto", "--config", str(tmp_path / "hanabi.toml")]


def test_install_refuses_a_bad_file_and_leaves_it_alone(tmp_path):
    path = tmp_path / "daemon.json"
    path.write_text('{"runtimes": []}\n')
    with pytest.raises(InvalidArgument):
        di.install(path, runtime_path=RT)
    assert path.read_text() == '{"runtimes": []}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["daemon.json"]  # no temp file left


def test_uninstall_restores_the_original_document(tmp_path):
    path = tmp_path / "daemon.json"
    path.write_text('{"debug": true, "runtimes": {"kata": {"path": "/k"}}}\n')
    di.install(path, runtime_path=RT)
    result = di.uninstall(path)
    assert result.changed and result.reload_needed
    assert json.loads(path.read_text()) == {"debug": True, "runtimes": {"kata": {"path": "/k"}}}
    assert path.read_text().endswith("\n")
    assert not di.uninstall(path).changed


def test_uninstall_of_a_missing_file_creates_nothing(tmp_path):
    result = di.uninstall(tmp_path / "daemon.json")
    assert not result.changed
    assert not (tmp_path / "daemon.json").exists()


def test_default_runtime_path_is_an_existing_hanabi_runtime():
    path = di.default_runtime_path()
    assert os.path.isabs(path) and path.endswith("hanabi-runtime") and os.path.exists(path)


def test_describe_prints_the_reload_hint_only_when_something_changed(tmp_path):
    changed = di.describe(di.InstallResult(path=tmp_path / "d.json", changed=True), "installed")
    assert "systemctl reload docker" in changed and "kill -HUP $(pidof dockerd)" in changed
    unchanged = di.describe(di.InstallResult(path=tmp_path / "d.json", changed=False), "installed")
    assert "reload" not in unchanged


# -- the CLI commands ----------------------------------------------------------------------

def test_cli_install_and_uninstall_docker(tmp_path):
    path = tmp_path / "daemon.json"
    path.write_text('{"log-level": "warn"}')
    runner = CliRunner()
    done = runner.invoke(app, ["install-docker", "--daemon-json", str(path), "--runtime-path", RT,
                               "--config", str(tmp_path / "h.toml")])
    assert done.exit_code == 0, done.output
    assert "systemctl reload docker" in done.output
    doc = json.loads(path.read_text())
    assert doc["runtimes"]["hanabi-qemu"] == {"path": RT, "runtimeArgs": ["--hypervisor", "qemu", "--config", str(tmp_path / "h.toml")]}
    done = runner.invoke(app, ["uninstall-docker", "--daemon-json", str(path)])
    assert done.exit_code == 0, done.output
    assert json.loads(path.read_text()) == {"log-level": "warn"}


def test_cli_install_docker_refuses_a_bad_file_with_status_1(tmp_path):
    path = tmp_path / "daemon.json"
    path.write_text("[1, 2]")
    done = CliRunner().invoke(app, ["install-docker", "--daemon-json", str(path), "--runtime-path", RT])
    assert done.exit_code == 1
    assert "invalid_argument" in done.output
