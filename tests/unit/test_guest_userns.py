"""User namespaces (linux.namespaces type user, linux.uidMappings/gidMappings) in the guest:
validation and map text as pure functions (hanabi_wire.ocispec.linux, namespaces.py, mounts.py), and the agent on the
host as root with namespaces and chroot on (as in the guest), where the init reads its maps,
its ids and capabilities, and a file it makes shows the mapped owner outside."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any
from collections.abc import Iterator

import pytest

from hanabi_wire.ocispec.linux import MAX_ID_MAP_LINES, check_id_mappings, check_linux, check_user_mapped, host_id

from hanabi_guest.mounts import tmpfs_in_user_namespace
from hanabi_guest.namespaces import id_map_text
from hanabi_common.errors import InvalidArgument
from hanabi_guest.core import AgentError
from hanabi_runtime.bundle import default_spec
from hanabi_runtime.guest_linux import check_guest_settings

from tests.unit.test_guest_agent import AgentProc

USER = [{"type": t} for t in ("pid", "ipc", "uts", "mount", "user")]
MAP = [{"containerID": 0, "hostID": 100000, "size": 65536}]


def userns(**extra: Any) -> dict[str, Any]:
    return {"namespaces": USER, "uidMappings": MAP, "gidMappings": MAP, **extra}


def test_a_user_namespace_with_maps_is_accepted() -> None:
    spec = check_linux(userns())
    assert spec is not None and spec.userns
    assert spec.uid_map == spec.gid_map == [(0, 100000, 65536)]
    assert spec.namespaces == ["ipc", "uts"]  # made by the init, inside the user namespace
    several = [{"containerID": 0, "hostID": 100000, "size": 1000}, {"containerID": 1000, "hostID": 1000, "size": 1}]
    spec = check_linux(userns(uidMappings=several))
    assert spec is not None and spec.uid_map == [(0, 100000, 1000), (1000, 1000, 1)]
    plain = check_linux({"namespaces": [{"type": "pid"}]})
    assert plain is not None and plain.userns is False


def test_map_text_and_lookups() -> None:
    maps = [(0, 100000, 1000), (1000, 1000, 1)]
    assert id_map_text(maps) == "0 100000 1000\n1000 1000 1\n"
    assert [host_id(i, maps) for i in (0, 999, 1000, 1001)] == [100000, 100999, 1000, None]
    assert id_map_text([]) == ""


def _ranges(n: int) -> list[dict[str, int]]:
    return [{"containerID": i * 10, "hostID": 100000 + i * 10, "size": 10} for i in range(n)]


@pytest.mark.parametrize("linux, message", [
    ({"namespaces": USER}, "linux.uidMappings: user namespaces enabled, but no uid mappings found"),
    ({"namespaces": USER, "uidMappings": MAP}, "linux.gidMappings: user namespaces enabled, but no gid mappings found"),
    ({"namespaces": USER, "uidMappings": [], "gidMappings": MAP}, "no uid mappings found"),
    ({"uidMappings": MAP}, "linux.uidMappings: user namespace mappings specified, but the user namespace isn't enabled"),
    ({"gidMappings": MAP}, "linux.gidMappings: user namespace mappings specified"),
    (userns(uidMappings=[{"containerID": 1, "hostID": 100000, "size": 10}]),
     r"linux.uidMappings: user namespaces enabled, but no user mapping found for the container's root \(uid 0\)"),
    (userns(gidMappings=[{"containerID": 1, "hostID": 100000, "size": 10}]), "no group mapping found"),
    (userns(uidMappings=[{"containerID": 0, "hostID": 100000, "size": 0}]), r"linux.uidMappings\[0\].size must be at least 1"),
    (userns(uidMappings=[{"containerID": 0, "hostID": 1, "size": 10}, {"containerID": 5, "hostID": 100, "size": 10}]),
     r"linux.uidMappings\[1\] overlaps linux.uidMappings\[0\]: their containerID ranges"),
    (userns(gidMappings=[{"containerID": 0, "hostID": 100, "size": 10}, {"containerID": 50, "hostID": 95, "size": 10}]),
     r"linux.gidMappings\[1\] overlaps linux.gidMappings\[0\]: their hostID ranges"),
    (userns(uidMappings=[{"containerID": 0, "hostID": -1, "size": 1}]), r"linux.uidMappings\[0\].hostID must be an integer"),
    (userns(uidMappings=[{"containerID": 0, "hostID": "1", "size": 1}]), r"linux.uidMappings\[0\].hostID must be an integer"),
    (userns(uidMappings=[{"containerID": 0, "hostID": 4294967295, "size": 1}]), r"hostID must be an integer 0..4294967294"),
    (userns(uidMappings=[{"containerID": 0, "hostID": 4294967290, "size": 10}]),
     r"linux.uidMappings\[0\]: hostID 4294967290 \+ size 10 goes past the last id"),
    (userns(uidMappings=[{"containerID": 0, "hostID": 1, "size": 1, "extra": 1}]), r"linux.uidMappings\[0\].extra: not a field"),
    (userns(uidMappings=[[0, 1, 1]]), r"linux.uidMappings\[0\] must be an object"),
    (userns(uidMappings={"containerID": 0}), "linux.uidMappings must be a list"),
    (userns(uidMappings=_ranges(MAX_ID_MAP_LINES + 1)), "linux.uidMappings has 341 ranges; the kernel takes at most 340"),
    ({"namespaces": [{"type": "user", "path": "/proc/1/ns/user"}], "uidMappings": MAP, "gidMappings": MAP},
     "linux.namespaces: user namespace '/proc/1/ns/user' is a namespace of the host, which a VM cannot join"),
], ids=lambda v: None if isinstance(v, str) else "")
def test_bad_maps_name_the_field(linux: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_linux(linux)


def test_340_ranges_are_the_most_and_accepted() -> None:
    spec = check_linux(userns(uidMappings=_ranges(MAX_ID_MAP_LINES)))
    assert spec is not None and len(spec.uid_map) == MAX_ID_MAP_LINES
    assert check_id_mappings(None, "x") == []


def test_the_process_user_must_be_mapped() -> None:
    spec = check_linux(userns(uidMappings=[{"containerID": 0, "hostID": 100000, "size": 1000}],
                              gidMappings=[{"containerID": 0, "hostID": 100000, "size": 10}]))
    check_user_mapped({"user": {"uid": 999, "gid": 9, "additionalGids": [5]}}, spec)
    with pytest.raises(ValueError, match="process.user.uid 1000 is not mapped by linux.uidMappings"):
        check_user_mapped({"user": {"uid": 1000, "gid": 0}}, spec)
    with pytest.raises(ValueError, match="process.user.additionalGids 10 is not mapped by linux.gidMappings"):
        check_user_mapped({"user": {"uid": 0, "gid": 0, "additionalGids": [1, 10]}}, spec)
    check_user_mapped({"user": {"uid": 1000}}, check_linux({}))  # no user namespace: nothing to map


def test_the_runtime_checks_maps_before_any_vm() -> None:
    config = default_spec(["true"])
    config["linux"].update(userns())
    config["linux"]["namespaces"] = USER
    check_guest_settings(config)
    config["process"]["user"] = {"uid": 70000, "gid": 0}
    with pytest.raises(InvalidArgument, match="config.json: process.user.uid 70000 is not mapped"):
        check_guest_settings(config)
    del config["linux"]["gidMappings"]
    with pytest.raises(InvalidArgument, match="linux.gidMappings: user namespaces enabled, but no gid mappings"):
        check_guest_settings(config)


def test_tmpfs_ids_are_the_namespaces() -> None:
    maps = [(0, 100000, 65536)]
    mounts = [{"destination": "/t", "type": "tmpfs", "source": None, "options": ["nosuid", "uid=1000", "mode=700"]},
              {"destination": "/u", "type": "tmpfs", "source": None, "options": []},
              {"destination": "/b", "type": "bind", "source": "m0", "options": ["rbind"]}]
    out = tmpfs_in_user_namespace(mounts, maps, maps)
    assert out[0]["options"] == ["nosuid", "uid=101000", "mode=700", "gid=100000"]
    assert out[1]["options"] == ["uid=100000", "gid=100000"]
    assert out[2] == mounts[2]
    with pytest.raises(AgentError, match="mount '/t': option gid=70000 names a gid"):
        tmpfs_in_user_namespace([{**mounts[0], "options": ["gid=70000"]}], maps, maps)


def _can_userns() -> bool:
    if os.geteuid() != 0 or not os.path.exists("/bin/busybox") or not shutil.which("unshare"):
        return False
    return subprocess.run(["unshare", "--user", "--fork", "--pid", "--mount", "true"], capture_output=True).returncode == 0


USERNS_AGENT = """
import sys
from hanabi_guest.agent import Agent
from hanabi_guest.channel import FdChannel
from hanabi_guest.sandbox import DirSandbox

sandbox = DirSandbox({root!r})
sandbox.use_chroot = sandbox.use_pid_namespace = True
Agent(FdChannel(int(sys.argv[1])), sandbox).run()
"""
HOST_ID = 200000
SEEN = "cat /proc/self/uid_map /proc/self/gid_map /proc/self/setgroups; id; grep ^Cap /proc/self/status"


@pytest.fixture
def rootfs() -> Iterator[Path]:
    """A busybox rootfs every id can reach (pytest's temp dirs are 0700: the mapped root,
    which is not the host's root, could not enter them); /rw belongs to the mapped root."""
    top = Path(tempfile.mkdtemp(prefix="hanabi-userns-"))
    try:
        top.chmod(0o755)
        root = top / "rootfs"
        for d in ("bin", "proc", "etc", "rw"):
            (root / d).mkdir(parents=True)
        shutil.copy2("/bin/busybox", root / "bin/busybox")
        for applet in ("sh", "cat", "id", "grep", "sleep", "touch", "stat", "ls", "unshare", "hostname"):
            (root / "bin" / applet).symlink_to("busybox")
        (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
        (root / "etc/group").write_text("root:x:0:\n")
        os.chown(root / "rw", HOST_ID, HOST_ID)
        yield root
    finally:
        shutil.rmtree(top, ignore_errors=True)


@pytest.mark.skipif(not _can_userns(), reason="needs root, /bin/busybox and user namespaces")
def test_the_init_runs_in_its_user_namespace_on_the_host(rootfs: Path) -> None:
    maps = [{"containerID": 0, "hostID": HOST_ID, "size": 65536}]
    linux = {"namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount", "user")],
             "uidMappings": maps, "gidMappings": maps}
    caps = ["CAP_CHOWN", "CAP_SYS_ADMIN", "CAP_SETUID", "CAP_SETGID"]
    spec = {"args": ["sh", "-c", f"{SEEN}; touch /rw/made; hostname inside; hostname; exec sleep 600"],
            "env": ["PATH=/bin"], "cwd": "/", "user": {"uid": 0, "gid": 0},
            "capabilities": {k: caps for k in ("bounding", "effective", "permitted")}}
    a = AgentProc(rootfs, script=USERNS_AGENT.format(root=str(rootfs)))
    try:
        a.ok("create_container", container_id="c1", rootfs={"serial": "s"}, process=spec, linux=linux,
             hostname="box")
        pid = a.ok("start", container_id="c1")["pid"]
        deadline = time.monotonic() + 10
        while not (rootfs / "rw/made").exists():
            assert time.monotonic() < deadline, a.output_of("init", "stderr")
            time.sleep(0.02)
        st = (rootfs / "rw/made").stat()
        assert (st.st_uid, st.st_gid) == (HOST_ID, HOST_ID)  # the container's root, outside
        # Its namespaces: user is new, and owns the uts namespace (hostname could be set).
        assert os.readlink(f"/proc/{pid}/ns/user") != os.readlink("/proc/self/ns/user")
        assert Path(f"/proc/{pid}/uid_map").read_text().split() == ["0", str(HOST_ID), "65536"]
        status = Path(f"/proc/{pid}/status").read_text()
        assert f"Uid:\t{HOST_ID}\t{HOST_ID}" in status
        out = b""
        while not out.endswith(b"inside\n"):
            assert time.monotonic() < deadline, out
            a._pump(0.2)
            out += a.output_of("init", "stdout")
        lines = out.decode().splitlines()
        assert lines[0].split() == lines[1].split() == ["0", str(HOST_ID), "65536"]
        assert lines[2] == "allow"
        assert lines[3].startswith("uid=0(root) gid=0(root)")
        assert lines[4:9] == ["CapInh:\t0000000000000000", "CapPrm:\t00000000002000c1",
                              "CapEff:\t00000000002000c1", "CapBnd:\t00000000002000c1", "CapAmb:\t0000000000000000"]
        assert lines[-1] == "inside"

        a.ok("exec", container_id="c1", exec_id="e1", process={**spec, "args": ["sh", "-c", SEEN + "; hostname"],
                                                                "user": {"uid": 1000, "gid": 1000}})
        assert a.exit_of("e1")["exit_code"] == 0
        seen = a.output_of("e1", "stdout").decode().splitlines()
        assert seen[0].split() == ["0", str(HOST_ID), "65536"] and seen[2] == "allow"
        assert seen[3].startswith("uid=1000 gid=1000") and seen[-1] == "inside"
        # On a pty: the agent owns it to the process's uid as the host has it.
        a.ok("exec", container_id="c1", exec_id="pty", process={
            **spec, "terminal": True, "user": {"uid": 1000, "gid": 1000},
            "args": ["sh", "-c", "[ -t 0 ] && stat -L -c tty-%u /proc/self/fd/0"]})
        assert a.exit_of("pty")["exit_code"] == 0
        assert a.output_of("pty", "stdout") == b"tty-1000\r\n"
        a.ok("signal", container_id="c1", exec_id="init", signal=9)
        assert a.exit_of("init")["signal"] == 9
        a.ok("destroy_container", container_id="c1")
    finally:
        rc = a.close()
    assert rc == 0, a.stderr()
    assert not os.path.ismount(rootfs / "proc")
