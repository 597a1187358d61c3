"""Nothing a container writes is lost, under a real dockerd, as with runc: named volumes and
`-v` host directories are the host's, live; root filesystem writes are in Docker's own
storage, so `docker cp`, `docker diff`, `docker commit` and `docker export` see them and
`docker stop` / `docker start` keeps them."""

from __future__ import annotations

import io
import os
import socket
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


# Every file operation of issue 12 item 1, done by the container in a `-v` host directory; the
# host then sees the result at once. Run under runc and under hanabi on the same dockerd: the
# trees they leave must be the same (names, types, modes, owners, link counts, sizes, symlink
# targets, the mtimes set with touch -d).
FILE_OPS = (
    "cd /data && echo hello > new && mkdir -p d/e && ln -s new link && ln new hard && "
    "mv old renamed && rm gone && rmdir emptydir && chmod 640 new && chown 1234:4321 renamed && "
    "touch -d '2001-02-03 04:05:06' d && "
    # more than 1 GiB of real data, fsync'd, with markers at both ends and in the middle
    "dd if=/dev/zero of=big bs=1M count=1100 conv=fsync 2>/dev/null && echo tail >> big && "
    "echo middle | dd of=big bs=1 seek=600000000 conv=notrunc,fsync 2>/dev/null && "
    "tail -c 5 big > big.tail && "
    # flock(2) between two processes of the container
    "{ /data/flocker hold lk held 60 & } ; while [ ! -f held ]; do sleep 0.05; done; "
    "/data/flocker try lk > lock.out; kill $! ; wait; /data/flocker try lk >> lock.out; rm held"
)


def _tree(root: Path) -> dict[str, tuple]:
    """What a runtime left in `root`, comparable between runtimes."""
    seen = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        rel = str(path.relative_to(root))
        seen[rel] = (oct(st.st_mode), st.st_uid, st.st_gid, st.st_nlink,
                     st.st_size if not path.is_dir() else None,
                     os.readlink(path) if path.is_symlink() else None)
    return seen


def _seed(data: Path) -> None:
    data.mkdir()
    (data / "old").write_text("old\n")
    (data / "gone").write_text("x")
    (data / "emptydir").mkdir()
    flocker = Path(__file__).parent.parent / "helpers" / "flocker.c"
    subprocess.run(["cc", "-static", "-O1", "-o", str(data / "flocker"), str(flocker)], check=True)


def test_file_operations_in_a_host_directory_are_the_hosts_as_under_runc(docker, tmp_path):
    trees = {}
    for runtime in ("runc", "hanabi"):
        data = tmp_path / runtime
        _seed(data)
        done = docker.run_hanabi("-v", f"{data}:/data", cmd=["sh", "-c", FILE_OPS], runtime=runtime, timeout=900)
        assert done.returncode == 0, f"{runtime}: {done.stderr}"
        assert (data / "new").read_text() == "hello\n"
        assert (data / "d" / "e").is_dir()
        assert os.readlink(data / "link") == "new"
        assert (data / "hard").stat().st_ino == (data / "new").stat().st_ino
        assert (data / "renamed").read_text() == "old\n"
        assert not (data / "old").exists() and not (data / "gone").exists() and not (data / "emptydir").exists()
        assert (data / "new").stat().st_mode & 0o777 == 0o640
        assert ((data / "renamed").stat().st_uid, (data / "renamed").stat().st_gid) == (1234, 4321)
        assert time.gmtime((data / "d").stat().st_mtime)[:6] == (2001, 2, 3, 4, 5, 6)
        big = data / "big"
        assert big.stat().st_size == (1100 << 20) + 5
        with open(big, "rb") as f:
            f.seek(600000000)
            assert f.read(7) == b"middle\n"
            f.seek(-5, os.SEEK_END)
            assert f.read() == b"tail\n"
        assert (data / "big.tail").read_text() == "tail\n"  # read back in the container
        assert (data / "lock.out").read_text() == "busy\nlocked\n"
        trees[runtime] = _tree(data)
        big.unlink()  # 1 GiB each: not kept past the comparison
    assert trees["hanabi"] == trees["runc"]


def test_etc_hosts_follows_dockers_rewrite_on_network_connect_as_under_runc(docker, tmp_path):
    """Docker keeps /etc/hosts in a file of its own, bind-mounted as a single file, and adds
    the container's address on `docker network connect` by writing that file in place (the
    inode stays: a rename would cut a single-file bind off under runc too). Under hanabi the
    file is the host's, live through the share: the new entry shows in the running container."""
    tag = f"{os.getpid()}{time.monotonic_ns() % 1000}"
    first, second = f"hosts1n{tag}", f"hosts2n{tag}"
    docker.check("network", "create", "--driver", "bridge", first)
    docker.check("network", "create", "--driver", "bridge", second)
    names = {runtime: f"hosts-{runtime}-{tag}" for runtime in ("runc", "hanabi")}
    try:
        for runtime, name in names.items():
            docker.check("run", "-d", f"--runtime={runtime}", "--network", first, "--name", name, IMAGE,
                         "sleep", "600", timeout=120)
        for runtime, name in names.items():
            hosts = Path(docker.inspect(name, "{{.HostsPath}}"))
            inode = hosts.stat().st_ino
            docker.check("network", "connect", second, name, timeout=60)
            ip = docker.inspect(name, "{{(index .NetworkSettings.Networks \"" + second + "\").IPAddress}}")
            assert ip and ip in hosts.read_text(), (runtime, hosts.read_text())
            assert hosts.stat().st_ino == inode, f"Docker replaced {hosts} instead of rewriting it"
            deadline = time.monotonic() + 30
            while ip not in (inside := docker.check("exec", name, "cat", "/etc/hosts", timeout=60)):
                assert time.monotonic() < deadline, f"{runtime}: {ip} never showed in /etc/hosts: {inside}"
                time.sleep(0.2)
            assert inside == hosts.read_text(), runtime
    finally:
        docker.remove(*names.values())
        docker.run("network", "rm", first, second, timeout=60)


@pytest.mark.parametrize("kind", ["fifo", "socket"])
def test_a_fifo_or_socket_as_bind_source_is_refused_clearly(docker, name, tmp_path, kind):
    """runc binds them (one kernel); a VM cannot reach a host fifo or socket through a file
    share, so hanabi refuses, naming the source (README), and leaves nothing behind."""
    source = tmp_path / kind
    if kind == "fifo":
        os.mkfifo(source)
    else:
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(source))
    done = docker.run("run", "--runtime=hanabi", "--network", "none", "--name", name, "-v", f"{source}:/x",
                      IMAGE, "true", timeout=120)
    assert done.returncode != 0
    assert f"bind mount source {source} is not a file or a directory" in done.stderr, done.stderr
    assert "sockets, devices and fifos cannot be shared" in done.stderr


def test_docker_cp_into_a_stopped_container_is_seen_after_start(docker, name, tmp_path):
    run_d(docker, name)
    docker.check("stop", "-t", "1", name, timeout=60)
    (tmp_path / "pushed").write_text("pushed while stopped\n")
    docker.check("cp", str(tmp_path / "pushed"), f"{name}:/pushed", timeout=60)
    docker.check("start", name, timeout=120)
    assert docker.check("exec", name, "cat", "/pushed", timeout=60) == "pushed while stopped\n"
    assert "A /pushed" in docker.check("diff", name, timeout=60).splitlines()


def test_docker_cp_over_a_file_the_running_container_has_read_is_seen_at_once(docker, name, tmp_path):
    """runc sees such a write at once; so must the share. Docker's cp replaces the file (a
    new inode): a guest that caches names and pages (9P cache=loose, measured: reads 4x faster)
    keeps serving the old content here, which is why the share does not cache."""
    run_d(docker, name)
    docker.check("exec", name, "sh", "-c", "echo v1 > /etc/conf && cat /etc/conf", timeout=60)
    (tmp_path / "conf").write_text("v2\n")
    docker.check("cp", str(tmp_path / "conf"), f"{name}:/etc/conf", timeout=60)
    assert docker.check("exec", name, "cat", "/etc/conf", timeout=60) == "v2\n"
    merged = Path(docker.inspect(name, "{{.GraphDriver.Data.MergedDir}}"))
    with open(merged / "etc" / "conf", "r+") as conf:  # and a host write in place
        conf.write("v3\n")
    assert docker.check("exec", name, "cat", "/etc/conf", timeout=60) == "v3\n"
