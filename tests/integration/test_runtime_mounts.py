"""Bind mounts (shared live with the VM), tmpfs mounts and a read-only root, end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers.hanabi import leftovers

pytestmark = pytest.mark.integration


def with_mounts(path: str, mounts: list[dict], readonly: bool = False) -> str:
    config = Path(path) / "config.json"
    spec = json.loads(config.read_text())
    spec["mounts"] += mounts
    spec["root"]["readonly"] = readonly
    config.write_text(json.dumps(spec))
    return path


def test_binds_tmpfs_and_readonly_root(hanabi, bundle, cid, tmp_path):
    host_dir = tmp_path / "shared"
    host_dir.mkdir()
    (host_dir / "note.txt").write_text("from the host\n")
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n10.1.2.3 web\n")
    script = ("cat /data/note.txt; grep web /etc/hosts; mount | grep -c ' /scratch type tmpfs';"
              "echo new > /data/new && echo wrote-bind; echo t > /scratch/t && echo wrote-tmpfs;"
              "touch /rootfile 2>/dev/null || echo root-readonly; cat /ro/note.txt;"
              "echo x > /ro/x 2>/dev/null || echo bind-readonly")
    path = with_mounts(bundle(["sh", "-c", script]), [
        {"destination": "/data", "type": "bind", "source": str(host_dir), "options": ["rbind"]},
        {"destination": "/ro", "type": "bind", "source": str(host_dir), "options": ["rbind", "ro"]},
        {"destination": "/etc/hosts", "type": "bind", "source": str(hosts), "options": ["rbind", "ro"]},
        {"destination": "/scratch", "type": "tmpfs", "source": "tmpfs", "options": ["size=1m"]},
    ], readonly=True)
    done = hanabi.runtime("run", "--bundle", path, cid)
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode().split("\n")[:-1] == [
        "from the host", "10.1.2.3 web", "1", "wrote-bind", "wrote-tmpfs", "root-readonly",
        "from the host", "bind-readonly"]
    # The VM worked on the host directory itself (as runc would).
    assert sorted(p.name for p in host_dir.iterdir()) == ["new", "note.txt"]
    assert leftovers(hanabi, cid) == []


def test_bind_of_a_socket_is_refused(hanabi, bundle, cid, tmp_path):
    import socket
    sock_path = tmp_path / "s.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(sock_path))
    try:
        path = with_mounts(bundle(["true"]), [
            {"destination": "/run/s.sock", "type": "bind", "source": str(sock_path), "options": ["rbind"]}])
        done = hanabi.runtime("create", "--bundle", path, cid)
        assert done.returncode == 1 and b"cannot be shared with a VM" in done.stderr
    finally:
        server.close()
    assert leftovers(hanabi, cid) == []
