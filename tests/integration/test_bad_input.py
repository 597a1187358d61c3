"""Bad input gets a clear error and changes nothing."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import zmq

from hanabi_common.config import DAEMONS
from hanabi_common.rpc.client import RpcClient
from hanabi_common.errors import NotFound
from tests.helpers.hanabi import leftovers

pytestmark = pytest.mark.integration


def sandboxes(hanabi) -> list[str]:
    d = hanabi.config.sandboxes_dir
    return sorted(os.listdir(d)) if d.exists() else []


@pytest.mark.parametrize("bad_id", ["../x", "", "a/b", "-x", "x" * 129])
def test_invalid_ids_are_refused(hanabi, bundle, bad_id):
    before = sandboxes(hanabi)
    done = hanabi.runtime("create", "--bundle", bundle(["true"]), "--", bad_id)
    assert done.returncode == 1
    assert b"invalid_argument" in done.stderr and b"container id" in done.stderr
    assert sandboxes(hanabi) == before


def test_missing_bundle(hanabi, cid, tmp_path):
    done = hanabi.runtime("create", "--bundle", str(tmp_path / "nope"), cid)
    assert done.returncode == 1 and b"does not exist" in done.stderr
    assert leftovers(hanabi, cid) == []


def test_config_failing_the_oci_schema(hanabi, bundle, cid):
    path = Path(bundle(["true"]))
    spec = json.loads((path / "config.json").read_text())
    spec["process"]["args"] = "true"
    spec["process"]["user"] = {"uid": "root"}
    (path / "config.json").write_text(json.dumps(spec))
    done = hanabi.runtime("create", "--bundle", str(path), cid)
    assert done.returncode == 1
    assert b"OCI runtime-spec schema" in done.stderr and b"process/args" in done.stderr
    assert leftovers(hanabi, cid) == []


def test_second_create_with_same_id(hanabi, bundle, cid):
    path = bundle(["sleep", "300"])
    hanabi.runtime("create", "--bundle", path, cid, check=True)
    try:
        second = hanabi.runtime("create", "--bundle", path, cid)
        assert second.returncode == 1 and b"already exists" in second.stderr
        assert hanabi.state(cid)["status"] == "created"
    finally:
        hanabi.runtime("delete", "--force", cid, check=True)
    assert leftovers(hanabi, cid) == []


def test_start_unknown_id(hanabi):
    done = hanabi.runtime("start", "no-such-container")
    assert done.returncode == 1 and b"does not exist" in done.stderr


def test_delete_unknown_id(hanabi):
    assert hanabi.runtime("delete", "no-such-container").returncode == 1
    assert hanabi.runtime("delete", "--force", "no-such-container").returncode == 0


@pytest.mark.parametrize("daemon", DAEMONS)
def test_unknown_method_and_garbage_frames(hanabi, daemon):
    endpoint = hanabi.config.endpoint(daemon)
    client = RpcClient(daemon, endpoint, timeout=5)
    with pytest.raises(NotFound, match="no method"):
        client.call("no.such.method", {})
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        for frames in ([b"\xff\x00garbage"], [b"HANABI-RPC", b"[1,2]", b"{}"], [b"", b"", b"", b""]):
            sock.send_multipart([b""] + frames)
            assert sock.poll(5000)
            reply = sock.recv_multipart()
            assert b"INVALID_ARGUMENT" in reply[-1]
    finally:
        sock.close(0)
    assert client.ping()["daemon"] == daemon
