"""Live file shares, end to end: bind mounts and the root filesystem are the host's
directories themselves inside the VM (virtio-9p), compared with what runc gives.

Each test runs a busybox container in a real QEMU VM through the four daemons; the host
side checks the host directories directly.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers.hanabi import BIN, leftovers, mounts_under
from tests.integration.test_runtime_mounts import with_mounts as mounted

pytestmark = pytest.mark.integration


# Docker's default capability set (runc spec's three would refuse chown, mknod and the like,
# under runc as here).
DOCKER_CAPS = ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
               "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
               "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE"]


def with_mounts(path: str, mounts: list[dict], readonly: bool = False) -> str:
    """The bundle with these mounts (and root read-only or not), and Docker's capabilities."""
    mounted(path, mounts, readonly)
    config = Path(path) / "config.json"
    spec = json.loads(config.read_text())
    spec["process"]["capabilities"] = {k: DOCKER_CAPS for k in ("bounding", "effective", "permitted")}
    config.write_text(json.dumps(spec))
    return path


def bind(source: Path, destination: str, *options: str) -> dict:
    return {"destination": destination, "type": "bind", "source": str(source), "options": ["rbind", *options]}


def run(hanabi, path: str, cid: str) -> list[str]:
    done = hanabi.runtime("run", "--bundle", path, cid, timeout=240)
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout.decode().splitlines()


def wait_for(path: Path, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    """Wait until `path` exists (a condition, polled; fails after `timeout` or once `proc`,
    which should make it, has ended)."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        assert proc is None or proc.poll() is None, f"{path} never appeared: the container ended"
        time.sleep(0.05)


def install_flocker(rootfs: Path) -> None:
    """Build tests/helpers/flocker.c statically into the rootfs as /bin/flocker."""
    source = Path(__file__).parent.parent / "helpers" / "flocker.c"
    subprocess.run(["cc", "-static", "-O1", "-o", str(rootfs / "bin" / "flocker"), str(source)], check=True)


def test_bind_writes_are_on_the_host_at_once_and_host_changes_are_seen(hanabi, bundle, cid, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "old").write_text("old\n")
    (data / "gone").write_text("x")
    script = (
        "cd /data && echo hello > new && mkdir -p d/e && ln -s new link && ln new hard && "
        "mv old renamed && rm gone && chmod 640 new && chown 1234:4321 renamed && "
        "touch -d '2001-02-03 04:05:06' d && "
        # a file past 4 GiB (sparse), fsync'd
        "dd if=/dev/zero of=big bs=1M count=1 seek=4100 conv=fsync 2>/dev/null && "
        "{ flocker hold lk held 60 & } ; while [ ! -f held ]; do sleep 0.05; done; "
        "flocker try lk > lock.out; kill $! ; wait; flocker try lk >> lock.out; "
        "echo ready > ready && "
        "i=0; while [ ! -f from-host ] && [ $i -lt 1200 ]; do sleep 0.05; i=$((i+1)); done; "
        "cat from-host > seen; stat -c '%s' from-host >> seen")
    path = with_mounts(bundle(["sh", "-c", script]), [bind(data, "/data")])
    install_flocker(Path(path) / "rootfs")
    argv = [str(BIN / "hanabi-runtime"), "--config", str(hanabi.config_path), "run", "--bundle", path, cid]
    with open(tmp_path / "out", "wb") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(data / "ready", 180, proc)
        # Everything the container did is on the host while it still runs.
        assert (data / "new").read_text() == "hello\n"
        assert (data / "d" / "e").is_dir()
        assert os.readlink(data / "link") == "new"
        assert (data / "hard").stat().st_ino == (data / "new").stat().st_ino
        assert (data / "new").stat().st_nlink == 2
        assert (data / "renamed").read_text() == "old\n" and not (data / "old").exists()
        assert not (data / "gone").exists()
        assert (data / "new").stat().st_mode & 0o777 == 0o640
        st = (data / "renamed").stat()
        assert (st.st_uid, st.st_gid) == (1234, 4321)  # uids map 1:1, as under runc
        assert time.gmtime((data / "d").stat().st_mtime)[:6] == (2001, 2, 3, 4, 5, 6)
        assert (data / "big").stat().st_size == 4101 << 20
        assert (data / "lock.out").read_text() == "busy\nlocked\n"  # flock(2) works in the guest
        # A host change is seen inside the running container.
        (data / "from-host").write_text("written on the host\n")
        assert proc.wait(timeout=120) == 0, (tmp_path / "out").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
            hanabi.runtime("delete", "--force", cid)  # what `run` would have removed
    assert (data / "seen").read_text() == "written on the host\n20\n"
    assert leftovers(hanabi, cid) == []


def test_readonly_bind_and_file_bind_and_readonly_root(hanabi, bundle, cid, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "note.txt").write_text("from the host\n")
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n10.1.2.3 web\n")
    script = ("cat /ro/note.txt; echo x > /ro/x 2>/dev/null || echo bind-readonly;"
              "grep web /etc/hosts; echo '10.9.9.9 db' >> /etc/hosts && echo hosts-appended;"
              "touch /rootfile 2>/dev/null || echo root-readonly; echo rw > /rw/rw && echo rw-ok")
    path = with_mounts(bundle(["sh", "-c", script]), [
        bind(data, "/ro", "ro"), bind(data, "/rw"), bind(hosts, "/etc/hosts")], readonly=True)
    assert run(hanabi, path, cid) == ["from the host", "bind-readonly", "10.1.2.3 web", "hosts-appended",
                                      "root-readonly", "rw-ok"]
    assert sorted(p.name for p in data.iterdir()) == ["note.txt", "rw"]
    assert hosts.read_text().endswith("10.9.9.9 db\n")  # a single-file bind is the host's file
    assert leftovers(hanabi, cid) == []


def test_root_filesystem_writes_and_deletions_land_in_the_bundle_rootfs(hanabi, bundle, cid):
    path = bundle(["sh", "-c", "echo kept > /etc/written; rm /etc/group; mkdir /newdir; echo done"])
    rootfs = Path(path) / "rootfs"
    assert (rootfs / "etc" / "group").exists()
    assert run(hanabi, path, cid) == ["done"]
    assert (rootfs / "etc" / "written").read_text() == "kept\n"
    assert not (rootfs / "etc" / "group").exists()
    assert (rootfs / "newdir").is_dir()
    assert leftovers(hanabi, cid) == []


def test_the_guest_reaches_no_host_path_outside_the_share(hanabi, bundle, cid, tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("host secret\n")
    data = tmp_path / "data"
    data.mkdir()
    (data / "escape").symlink_to(secret)           # absolute: resolved inside the guest
    (data / "up").symlink_to("../secret")          # relative, climbing out of the share
    script = ("cat /data/escape 2>&1; cat /data/up 2>&1; cat /data/../secret 2>&1;"
              "ls /data/../../ | grep -c secret; echo end")
    path = with_mounts(bundle(["sh", "-c", script]), [bind(data, "/data")])
    out = run(hanabi, path, cid)
    assert "host secret" not in "\n".join(out), out
    assert out[-2:] == ["0", "end"]
    assert leftovers(hanabi, cid) == []


def test_fsynced_data_survives_a_sigkill_of_the_vmm(hanabi, bundle, cid, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    script = ("dd if=/dev/urandom of=/data/f bs=64k count=16 conv=fsync 2>/dev/null; "
              "md5sum /data/f > /data/f.md5; sync; echo ready > /data/ready; "
              "while :; do dd if=/dev/zero of=/data/churn bs=64k count=4 2>/dev/null; done")
    path = with_mounts(bundle(["sh", "-c", script]), [bind(data, "/data")])
    created = hanabi.runtime("create", "--bundle", path, cid)
    assert created.returncode == 0, created.stderr.decode()
    assert hanabi.runtime("start", cid).returncode == 0
    wait_for(data / "ready", 180)
    vm = json.loads((hanabi.config.sandboxes_dir / cid / "hypervisor.json").read_text())
    os.kill(vm["pid"], signal.SIGKILL)
    digest = (data / "f.md5").read_text().split()[0]
    import hashlib
    assert hashlib.md5((data / "f").read_bytes()).hexdigest() == digest
    assert (data / "f").stat().st_size == 1 << 20
    deleted = hanabi.runtime("delete", "--force", cid)
    assert deleted.returncode == 0, deleted.stderr.decode()
    assert leftovers(hanabi, cid) == []
    assert mounts_under(hanabi.config.shares_dir) == []


@pytest.mark.parametrize("kind", ["fifo", "socket", "device"])
def test_a_fifo_socket_or_device_as_bind_source_is_refused_clearly(hanabi, bundle, cid, tmp_path, kind):
    """runc binds them (one kernel); a VM's file share cannot carry a host fifo, socket or
    device node, so create fails with the source named (README) and nothing is left."""
    source = tmp_path / kind
    if kind == "fifo":
        os.mkfifo(source)
    elif kind == "socket":
        import socket
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(str(source))
    else:
        os.mknod(source, 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # a /dev/null
    path = with_mounts(bundle(["true"]), [bind(tmp_path / "ok", "/ok"), bind(source, "/x")])
    (tmp_path / "ok").mkdir()
    created = hanabi.runtime("create", "--bundle", path, cid, timeout=240)
    assert created.returncode != 0
    err = created.stderr.decode()
    assert f"bind mount source {source} is not a file or a directory" in err, err
    assert "sockets, devices and fifos cannot be shared" in err, err
    hanabi.runtime("delete", "--force", cid)  # as runc's caller would after a failed create
    assert leftovers(hanabi, cid) == []


def test_what_a_flock_in_the_guest_excludes_as_the_readme_says(hanabi, bundle, cid, tmp_path):
    """QEMU's 9P server answers every lock request "granted" without taking a host lock
    (hw/9pfs v9fs_lock), so a guest flock(2) excludes only what the guest kernel itself sees:
    the container's processes locking the same file by the same path. Pinned here so the
    README's list of what it does not exclude (host processes, the same host file through a
    second bind) stays true."""
    import fcntl

    data = tmp_path / "data"
    data.mkdir()
    (data / "host-held").write_text("")
    script = (
        "cd /data; flocker try /data/host-held > out; "
        "{ flocker hold /data/lk held 60 & } ; while [ ! -f held ]; do sleep 0.05; done; "
        "flocker try /data/lk >> out; flocker try /again/lk >> out; "
        "echo ready > ready; while [ ! -f host-done ]; do sleep 0.05; done; kill $!; wait")
    path = with_mounts(bundle(["sh", "-c", script]), [bind(data, "/data"), bind(data, "/again")])
    install_flocker(Path(path) / "rootfs")
    argv = [str(BIN / "hanabi-runtime"), "--config", str(hanabi.config_path), "run", "--bundle", path, cid]
    with open(data / "host-held") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # a host process holds this one all along
        with open(tmp_path / "log", "wb") as log:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for(data / "ready", 180, proc)
            with open(data / "lk") as lk:  # the container holds this one now
                try:
                    fcntl.flock(lk, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    host_view = "locked"
                except BlockingIOError:
                    host_view = "busy"
            (data / "host-done").write_text("")
            assert proc.wait(timeout=120) == 0, (tmp_path / "log").read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
                hanabi.runtime("delete", "--force", cid)
    guest_view = (data / "out").read_text().split()
    assert guest_view == ["locked", "busy", "locked"], guest_view  # host lock / same path / 2nd bind
    assert host_view == "locked"  # the guest's lock is not on the host
    assert leftovers(hanabi, cid) == []
