"""Nothing a container writes is lost, under a real dockerd, as with runc: named volumes and
`-v` host directories are the host's, live; root filesystem writes are in Docker's own
storage, so `docker cp`, `docker diff`, `docker commit` and `docker export` see them and
`docker stop` / `docker start` keeps them."""

from __future__ import annotations

import io
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from tests.e2e.docker_env import IMAGE

pytestmark = pytest.mark.e2e


def run_d(docker, name: str, *options: str, cmd: tuple[str, ...] = ("sleep", "600")) -> None:
    docker.check("run", "-d", "--runtime=hanabi", "--network", "none", "--name", name, *options, IMAGE, *cmd,
                 timeout=120)


def test_a_named_volume_keeps_its_data_across_containers(docker):
    volume = f"vol{time.monotonic_ns()}"
    docker.check("volume", "create", volume)
    try:
        done = docker.run_hanabi("-v", f"{volume}:/v", cmd=["sh", "-c", "echo kept > /v/f && sync"], timeout=120)
        assert done.returncode == 0, done.stderr
        done = docker.run_hanabi("-v", f"{volume}:/v", cmd=["cat", "/v/f"], timeout=120)
        assert (done.returncode, done.stdout) == (0, "kept\n"), done.stderr
        mountpoint = Path(docker.check("volume", "inspect", "-f", "{{.Mountpoint}}", volume).strip())
        assert (mountpoint / "f").read_text() == "kept\n"
    finally:
        docker.run("volume", "rm", "-f", volume, timeout=60)


def test_a_host_directory_is_shared_both_ways_while_the_container_runs(docker, name, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    run_d(docker, name, "-v", f"{data}:/data", "-v", f"{data}:/ro:ro")
    docker.check("exec", name, "sh", "-c", "echo from-container > /data/c", timeout=60)
    assert (data / "c").read_text() == "from-container\n"
    (data / "h").write_text("from-host\n")
    assert docker.check("exec", name, "cat", "/data/h", timeout=60) == "from-host\n"
    denied = docker.run("exec", name, "sh", "-c", "echo x > /ro/x", timeout=60)
    assert denied.returncode != 0 and "Read-only file system" in denied.stderr
    assert not (data / "x").exists()


def test_root_filesystem_writes_are_in_dockers_storage(docker, name, tmp_path):
    run_d(docker, name)
    docker.check("exec", name, "sh", "-c", "echo written > /etc/written && rm /etc/group && mkdir /newdir",
                 timeout=60)
    # docker cp out of a running container, and into it (the container sees the host's copy).
    out = docker.check("cp", f"{name}:/etc/written", "-", timeout=60)
    with tarfile.open(fileobj=io.BytesIO(out.encode()), mode="r") as tar:
        assert tar.extractfile("written").read() == b"written\n"
    (tmp_path / "pushed").write_text("pushed in\n")
    docker.check("cp", str(tmp_path / "pushed"), f"{name}:/tmp/pushed", timeout=60)
    assert docker.check("exec", name, "cat", "/tmp/pushed", timeout=60) == "pushed in\n"
    diff = set(docker.check("diff", name, timeout=60).splitlines())
    assert {"A /etc/written", "D /etc/group", "A /newdir", "A /tmp/pushed"} <= diff, diff
    # docker commit (Docker pauses the container first) makes an image with the changes.
    image = f"hanabi-committed:{time.monotonic_ns()}"
    docker.check("commit", name, image, timeout=120)
    try:
        done = docker.run("run", "--rm", "--runtime=runc", "--network", "none", image,
                          "sh", "-c", "cat /etc/written; test -e /etc/group || echo no-group", timeout=60)
        assert done.stdout.splitlines() == ["written", "no-group"], done.stderr
    finally:
        docker.run("rmi", "-f", image, timeout=60)
    # docker export of the running container.
    export = subprocess.run([docker.docker, "export", name], env=docker.env(), capture_output=True, timeout=120)
    assert export.returncode == 0, export.stderr
    with tarfile.open(fileobj=io.BytesIO(export.stdout), mode="r") as tar:
        names = set(tar.getnames())
        assert "etc/written" in names and "etc/group" not in names
    # Stopped: docker cp still sees it (it is in the container's layer, not in a VM).
    docker.check("stop", "-t", "1", name, timeout=60)
    out = docker.check("cp", f"{name}:/etc/written", "-", timeout=60)
    with tarfile.open(fileobj=io.BytesIO(out.encode()), mode="r") as tar:
        assert tar.extractfile("written").read() == b"written\n"


def test_a_file_written_by_exec_survives_stop_after_the_timeout_and_start(docker, name):
    """`sleep` as PID 1 ignores SIGTERM, so `docker stop -t 2` SIGKILLs it after 2 s."""
    run_d(docker, name)
    docker.check("exec", name, "sh", "-c", "echo from-exec > /persisted.txt", timeout=60)
    started = time.monotonic()
    docker.check("stop", "-t", "2", name, timeout=60)
    assert time.monotonic() - started >= 2
    assert docker.inspect(name, "{{.State.ExitCode}}") == "137"
    docker.check("start", name, timeout=120)
    assert docker.check("exec", name, "cat", "/persisted.txt", timeout=60) == "from-exec\n"
