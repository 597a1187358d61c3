"""ids, errors, config, state store and OCI schema validation."""

from __future__ import annotations


import pytest

from hanabi_common.config import Config, load_config
from hanabi_common.errors import (AlreadyExists, FailedPrecondition, Internal, InvalidArgument,
                                  error_for_code)
from hanabi_common.ids import validate_id
from hanabi_common.oci import schema_errors, validate_config
from hanabi_common.state import StateStore, VersionedState


@pytest.mark.parametrize("good", ["a", "abc-123", "A_b.c", "x" * 128, "0"])
def test_valid_ids(good):
    assert validate_id(good) == good


@pytest.mark.parametrize("bad", ["", "../x", "a/b", ".hidden", "-a", "x" * 129, "a b", None, 5, "é"])
def test_invalid_ids(bad):
    with pytest.raises(InvalidArgument):
        validate_id(bad)


def test_error_codes_round_trip():
    assert isinstance(error_for_code("ALREADY_EXISTS", "m"), AlreadyExists)
    assert isinstance(error_for_code("WHAT", "m"), Internal)


def test_config_defaults_and_file(tmp_path, monkeypatch):
    monkeypatch.delenv("HANABI_CONFIG", raising=False)
    assert Config().endpoint("vmmd") == "ipc:///run/hanabi/vmmd.sock"
    path = tmp_path / "h.toml"
    path.write_text(f'run_dir = "{tmp_path}/run"\n[vmm]\nmemory_mib = 128\n')
    cfg = load_config(path)
    assert cfg.vmm.memory_mib == 128 and cfg.run_dir == tmp_path / "run" and cfg.source == path
    monkeypatch.setenv("HANABI_CONFIG", str(path))
    assert load_config().vmm.memory_mib == 128


@pytest.mark.parametrize("text,match", [("[vmm]\nmemory_mib = 1\n", "memory_mib"),
                                        ("nonsense = = 1", "TOML"),
                                        ("[vmm]\nbogus = 1\n", "bogus")])
def test_config_errors(tmp_path, text, match):
    path = tmp_path / "h.toml"
    path.write_text(text)
    with pytest.raises(InvalidArgument, match=match):
        load_config(path)
    with pytest.raises(InvalidArgument, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(InvalidArgument, match="unknown daemon"):
        Config().endpoint("nope")


class Thing(VersionedState):
    value: int


class ThingV2(VersionedState):
    SCHEMA_VERSION = 2
    value: int


def test_state_store(tmp_path):
    store = StateStore(tmp_path / "sbs")
    assert store.read("s1", "thing", Thing) is None
    path = store.write("s1", "thing", Thing(value=3))
    assert oct(path.parent.stat().st_mode & 0o777) == "0o700"
    assert store.read("s1", "thing", Thing).value == 3
    assert store.list_sandboxes(having="thing") == ["s1"]
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]
    with pytest.raises(FailedPrecondition, match="schema version"):
        store.read("s1", "thing", ThingV2)
    path.write_text("{broken")
    with pytest.raises(Internal, match="corrupt"):
        store.read("s1", "thing", Thing)
    store.remove("s1", "thing")
    assert not (tmp_path / "sbs" / "s1").exists()
    with pytest.raises(InvalidArgument):
        store.write("../evil", "thing", Thing(value=1))


def test_oci_schema():
    good = {"ociVersion": "1.0.2", "root": {"path": "rootfs"}, "process": {"cwd": "/", "args": ["sh"]}}
    assert validate_config(good) is good
    assert schema_errors({"ociVersion": "1.0.2", "process": {"cwd": "/", "args": "sh"}})
    with pytest.raises(InvalidArgument, match="user/uid"):
        validate_config({"ociVersion": "1.0.2", "process": {"cwd": "/", "args": ["sh"], "user": {"uid": -1, "gid": 0}}})
    with pytest.raises(InvalidArgument, match="JSON object"):
        validate_config([1])
