"""Bundle loading and validation, signal parsing, OCI state (no root, no daemons)."""

from __future__ import annotations

import json
import signal

import pytest

from hanabi_common.errors import InvalidArgument, NotFound
from hanabi_common.oci import schema_errors
from hanabi_runtime.bundle import default_spec, load_bundle
from hanabi_runtime.signals import parse_signal
from hanabi_runtime.state import RuntimeState, oci_state


def write_bundle(tmp_path, spec):
    (tmp_path / "rootfs").mkdir(exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps(spec))
    return tmp_path


def test_default_spec_loads(tmp_path):
    spec = default_spec(["echo", "hi"])
    for namespace in spec["linux"]["namespaces"]:
        if namespace["type"] == "network":
            namespace["path"] = "/proc/1/ns/net"
    bundle = load_bundle(write_bundle(tmp_path, spec))
    assert bundle.process["args"] == ["echo", "hi"]
    assert bundle.rootfs == (tmp_path / "rootfs").resolve()
    assert bundle.netns_path == "/proc/1/ns/net"


@pytest.mark.parametrize("mutate,error,match", [
    (lambda s: s["process"].update(args="sh"), InvalidArgument, "OCI runtime-spec schema"),
    (lambda s: s["process"].update(args=[]), InvalidArgument, "process.args"),
    (lambda s: s["process"].update(cwd="rel"), InvalidArgument, "absolute"),
    (lambda s: s["process"].update(terminal="yes"), InvalidArgument, "OCI runtime-spec schema"),
    (lambda s: s.pop("process"), InvalidArgument, "process is required"),
    (lambda s: s.update(ociVersion="2.0.0"), InvalidArgument, "ociVersion"),
    (lambda s: s["root"].update(path="missing"), NotFound, "rootfs"),
])
def test_bad_bundles(tmp_path, mutate, error, match):
    spec = default_spec()
    mutate(spec)
    with pytest.raises(error, match=match):
        load_bundle(write_bundle(tmp_path, spec))


def test_terminal_is_accepted(tmp_path):
    spec = default_spec()
    spec["process"].update(terminal=True, consoleSize={"height": 24, "width": 80})
    assert load_bundle(write_bundle(tmp_path, spec)).process["terminal"] is True


def test_missing_and_garbage(tmp_path):
    with pytest.raises(NotFound):
        load_bundle(tmp_path / "nope")
    with pytest.raises(NotFound, match="config.json"):
        load_bundle(tmp_path)
    (tmp_path / "config.json").write_text("{oops")
    with pytest.raises(InvalidArgument, match="not valid JSON"):
        load_bundle(tmp_path)


@pytest.mark.parametrize("text,number", [("KILL", 9), ("SIGKILL", 9), ("kill", 9), ("9", 9),
                                         ("TERM", int(signal.SIGTERM)), ("SIGUSR1", int(signal.SIGUSR1))])
def test_signals(text, number):
    assert parse_signal(text) == number


@pytest.mark.parametrize("text", ["0", "65", "SIGNOPE", "", "-1"])
def test_bad_signals(text):
    with pytest.raises(InvalidArgument):
        parse_signal(text)


def test_oci_state_matches_schema():
    state = RuntimeState(id="c1", bundle="/b", rootfs="/b/rootfs", created_at=1.0, standin_pid=42,
                         annotations={"a": "b"})
    doc = oci_state(state, "running")
    assert doc["pid"] == 42
    assert schema_errors(doc, "state-schema.json") == []
    assert oci_state(state, "stopped")["pid"] == 0
