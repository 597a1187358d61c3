"""OCI hooks through the real CLI and daemons: poststart after start, poststop after
delete, each with the container's state on stdin; a failing poststop only warns."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers.hanabi import leftovers

pytestmark = pytest.mark.integration


def test_poststart_and_poststop_hooks(hanabi, bundle, cid, tmp_path):
    hooks = {}
    for phase in ("poststart", "poststop"):
        script = tmp_path / f"{phase}.sh"
        script.write_text(f"#!/bin/sh\ncat > {tmp_path / phase}.json\n")
        script.chmod(0o755)
        hooks[phase] = [{"path": str(script)}]
    failing = tmp_path / "fails.sh"
    failing.write_text("#!/bin/sh\nexit 9\n")
    failing.chmod(0o755)
    hooks["poststop"].insert(0, {"path": str(failing)})
    path = bundle(["sleep", "30"])
    config_path = Path(path) / "config.json"
    config = json.loads(config_path.read_text())
    config["hooks"] = hooks
    config_path.write_text(json.dumps(config))
    hanabi.runtime("create", "--bundle", path, cid, check=True)
    assert not (tmp_path / "poststart.json").exists()
    hanabi.runtime("start", cid, check=True)
    started = json.loads((tmp_path / "poststart.json").read_text())
    assert started["id"] == cid and started["status"] == "running" and started["pid"] > 0
    assert started["bundle"] == str(Path(path).resolve())
    done = hanabi.runtime("delete", "--force", cid)
    assert done.returncode == 0, done.stderr.decode()  # the failing poststop hook only warns
    stopped = json.loads((tmp_path / "poststop.json").read_text())
    assert stopped["id"] == cid and stopped["status"] == "stopped"
    assert leftovers(hanabi, cid) == []
