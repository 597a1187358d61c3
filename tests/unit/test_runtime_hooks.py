"""OCI hooks as the runtime runs them, and the resolv.conf reading behind the DNS relay."""

from __future__ import annotations

import json
import stat

import pytest

from hanabi_common.errors import FailedPrecondition, InvalidArgument
from hanabi_runtime.hooks import hook_state, hooks_of, run_phase
from hanabi_runtime.resolv import loopback_nameservers, relayed_nameservers


def script(tmp_path, name: str, body: str) -> str:
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def test_hooks_get_state_on_stdin_args_and_env(tmp_path):
    out, extra = tmp_path / "state", tmp_path / "argv"
    hook = script(tmp_path, "h", f'cat > {out}; echo "$1 $2 $HOOKVAR" > {extra}')
    config = {"hooks": {"prestart": [{"path": hook, "args": ["argv0", "first", "second"], "env": ["HOOKVAR=v"]}]}}
    state = hook_state("c1", "/bundle", 4242, "creating", {"a": "b"}, "1.0.2")
    assert run_phase(config, "prestart", state, must_succeed=True) == []
    assert json.loads(out.read_text()) == {"ociVersion": "1.0.2", "id": "c1", "status": "creating", "pid": 4242,
                                      "bundle": "/bundle", "annotations": {"a": "b"}}
    assert extra.read_text() == "first second v\n"


def test_a_failing_create_hook_fails_and_names_itself(tmp_path):
    config = {"hooks": {"createRuntime": [{"path": script(tmp_path, "ok", "exit 0")},
                                          {"path": script(tmp_path, "bad", "echo no network >&2; exit 3")}]}}
    with pytest.raises(FailedPrecondition, match=r"createRuntime hook #1 .*bad\) failed with status 3: no network"):
        run_phase(config, "createRuntime", {}, must_succeed=True)


def test_poststop_failures_only_warn(tmp_path):
    config = {"hooks": {"poststop": [{"path": script(tmp_path, "bad", "exit 1")},
                                     {"path": str(tmp_path / "missing")}]}}
    failures = run_phase(config, "poststop", {}, must_succeed=False)
    assert len(failures) == 2 and "cannot run" in failures[1]


def test_hook_timeout(tmp_path):
    config = {"hooks": {"prestart": [{"path": script(tmp_path, "slow", "sleep 5"), "timeout": 1}]}}
    with pytest.raises(FailedPrecondition, match="did not finish within 1s"):
        run_phase(config, "prestart", {}, must_succeed=True)


@pytest.mark.parametrize("hook, message", [({"path": "relative"}, "must be absolute"),
                                           ({"path": "/bin/true", "timeout": 0}, "positive integer")])
def test_bad_hook_definitions(hook, message):
    with pytest.raises(InvalidArgument, match=message):
        hooks_of({"hooks": {"prestart": [hook]}}, "prestart")


def test_loopback_nameservers():
    text = "search example\nnameserver 127.0.0.11\nnameserver 10.0.0.2\nnameserver ::1\n" \
           "nameserver 127.0.0.11\n# nameserver 127.0.0.12\nnameserver bogus\noptions ndots:0\n"
    assert loopback_nameservers(text) == ["127.0.0.11"]
    assert loopback_nameservers("nameserver 8.8.8.8\n") == []


def test_relayed_nameservers_reads_the_bind_mounted_file(tmp_path):
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.11\noptions ndots:0\n")
    mounts = [{"destination": "/etc/hosts", "source": "/etc/hosts"},
              {"destination": "/etc/resolv.conf", "source": str(resolv), "type": "bind"}]
    assert relayed_nameservers(mounts) == ["127.0.0.11"]
    assert relayed_nameservers([{"destination": "/etc/resolv.conf", "source": str(tmp_path / "gone")}]) == []
    assert relayed_nameservers(None) == []
