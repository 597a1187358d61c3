"""Pure parts of exec, update, sizing and features (no root, no daemons)."""

from __future__ import annotations

import json

import pytest

from hanabi_common.errors import InvalidArgument, NotFound
from hanabi_common.oci import schema_errors
from hanabi_runtime.execs import load_process, parse_user
from hanabi_runtime.observe import features
from hanabi_runtime.resources import parse_resources
from hanabi_runtime.sizing import GUEST_OVERHEAD_MIB, MIB, VmSize, vm_size

BASE = {"args": ["sleep", "1"], "cwd": "/", "env": ["PATH=/bin"], "user": {"uid": 0, "gid": 0}}


@pytest.mark.parametrize("resources,expected", [
    (None, VmSize(None, None)),
    ({"memory": {"limit": 512 * MIB}}, VmSize(512 + GUEST_OVERHEAD_MIB, None)),
    ({"memory": {"limit": 6 * MIB}}, VmSize(128, None)),
    ({"cpu": {"quota": 150000, "period": 100000}}, VmSize(None, 2)),
    ({"cpu": {"quota": 200000}}, VmSize(None, 2)),
    ({"cpu": {"cpus": "0-2,5"}}, VmSize(None, 4)),
    ({"cpu": {"quota": 10**9, "period": 1000}}, VmSize(None, 64)),
])
def test_vm_size(resources, expected):
    assert vm_size(resources) == expected


def test_exec_process_from_args_inherits_the_container():
    spec = load_process(None, ["echo", "hi"], cwd="/tmp", env=["A=1"], user="7:8", tty=False, base=BASE)
    assert spec["args"] == ["echo", "hi"] and spec["cwd"] == "/tmp"
    assert spec["env"] == ["PATH=/bin", "A=1"] and spec["user"] == {"uid": 7, "gid": 8}


def test_exec_process_from_file(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"args": ["true"], "cwd": "/", "user": {"uid": 0, "gid": 0}}))
    assert load_process(str(path), [], cwd=None, env=[], user=None, tty=False, base={})["args"] == ["true"]
    path.write_text(json.dumps({"args": "true", "cwd": "/"}))
    with pytest.raises(InvalidArgument, match="schema"):
        load_process(str(path), [], cwd=None, env=[], user=None, tty=False, base={})
    path.write_text("{nope")
    with pytest.raises(InvalidArgument, match="not valid JSON"):
        load_process(str(path), [], cwd=None, env=[], user=None, tty=False, base={})
    with pytest.raises(NotFound):
        load_process(str(tmp_path / "missing"), [], cwd=None, env=[], user=None, tty=False, base={})
    with pytest.raises(InvalidArgument, match="needs a command"):
        load_process(None, [], cwd=None, env=[], user=None, tty=False, base=BASE)


def test_parse_user():
    assert parse_user("1000") == {"uid": 1000, "gid": 0}
    with pytest.raises(InvalidArgument):
        parse_user("root")


def test_update_resources_are_schema_checked():
    assert parse_resources('{"memory": {"limit": 1048576}}') == {"memory": {"limit": 1048576}}
    for bad in ("[1]", "{oops", '{"memory": {"limit": "lots"}}'):
        with pytest.raises(InvalidArgument):
            parse_resources(bad)


def test_features_match_the_oci_schema():
    assert schema_errors(features(), "features-schema.json") == []
