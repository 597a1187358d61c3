"""User namespaces (linux.namespaces type user with linux.uidMappings/gidMappings): the SAME
bundle under runc on the host and under hanabi (real daemons + VM), and what the container
sees compared: its uid_map, gid_map and setgroups, `id`, the Cap* lines of /proc/self/status,
the owners of /, /dev and a bind mount as it reads them, and a file it makes in the bind
mount, owned on the host by the mapped id (hostID). The rootfs is chowned to the mapped range
(as podman or Docker's userns-remap do for runc): hanabi never chowns the user's files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from collections.abc import Iterator

import pytest

from hanabi_runtime.demo_bundle import make_bundle
from tests.helpers.hanabi import leftovers
from tests.integration.test_runtime_security import SYSFS, runc_run

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(shutil.which("runc") is None, reason="runc is not installed")]

HOST_ID = 100000
RANGE = 65536
SEEN = ("cat /proc/self/uid_map /proc/self/gid_map /proc/self/setgroups; id; grep ^Cap /proc/self/status;"
        "stat -c '%n %u:%g' / /dev /data; touch /data/made && echo made;"
        "unshare -U true && echo nested-userns-ok")


def one_range(spec: dict) -> None:
    maps = [{"containerID": 0, "hostID": HOST_ID, "size": RANGE}]
    spec["linux"]["namespaces"].append({"type": "user"})
    spec["linux"]["uidMappings"] = maps
    spec["linux"]["gidMappings"] = maps


def several_ranges(spec: dict) -> None:
    """Two ranges a map, the process not root: uid 1000 is the host's 1000 itself."""
    one_range(spec)
    spec["linux"]["uidMappings"] = [{"containerID": 0, "hostID": HOST_ID, "size": 1000},
                                    {"containerID": 1000, "hostID": 1000, "size": 1},
                                    {"containerID": 1001, "hostID": HOST_ID + 1001, "size": 1000}]
    spec["linux"]["gidMappings"] = [{"containerID": 0, "hostID": HOST_ID, "size": 10},
                                    {"containerID": 10, "hostID": HOST_ID + 500, "size": 3000}]
    spec["process"]["user"] = {"uid": 1000, "gid": 1000, "additionalGids": [5]}


@pytest.fixture
def place() -> Iterator[Path]:
    """A directory every id can enter (pytest's are 0700: the mapped root could not)."""
    top = Path(tempfile.mkdtemp(prefix="hanabi-userns-"))
    top.chmod(0o755)
    try:
        yield top
    finally:
        shutil.rmtree(top, ignore_errors=True)


def userns_bundle(place: Path, args: list[str], change, data_owner: tuple[int, int]) -> tuple[str, Path]:
    """A busybox bundle with ``change`` applied, its rootfs chowned to the mapped range and a
    bind mount /data of a host directory owned by ``data_owner``."""
    path = make_bundle(place / "bundle", args)
    rootfs = path / "rootfs"
    subprocess.run(["chown", "-R", f"{HOST_ID}:{HOST_ID}", str(rootfs)], check=True)
    data = place / "data"
    data.mkdir()
    os.chown(data, *data_owner)
    config = path / "config.json"
    spec = json.loads(config.read_text())
    change(spec)
    spec["mounts"].append({"destination": "/data", "type": "bind", "source": str(data), "options": ["rbind"]})
    config.write_text(json.dumps(spec))
    return str(path), data


@pytest.mark.parametrize("change, owner", [(one_range, (HOST_ID, HOST_ID)), (several_ranges, (1000, HOST_ID + 1490))],
                         ids=["one-range", "several-ranges"])
def test_what_the_container_sees_matches_runc(hanabi, cid, place, tmp_path, change, owner):
    path, data = userns_bundle(place, ["sh", "-c", SEEN], change, owner)
    under_runc = runc_run(path, cid, tmp_path)
    assert under_runc.returncode == 0, under_runc.stderr.decode()
    made = data / "made"
    st = made.stat()
    assert (st.st_uid, st.st_gid) == owner  # the container's uid and gid as the host has them
    made.unlink()
    under_hanabi = hanabi.runtime("run", "--bundle", path, cid)
    assert under_hanabi.returncode == 0, under_hanabi.stderr.decode()
    assert leftovers(hanabi, cid) == []
    assert under_hanabi.stdout.decode() == under_runc.stdout.decode()
    st = made.stat()
    assert (st.st_uid, st.st_gid) == owner
    lines = under_hanabi.stdout.decode().splitlines()
    assert "allow" in lines and lines[-2:] == ["made", "nested-userns-ok"]


def test_an_exec_joins_the_user_namespace(hanabi, cid, place):
    path, _ = userns_bundle(place, ["sleep", "600"], one_range, (HOST_ID, HOST_ID))
    hanabi.runtime("create", "--bundle", path, cid, check=True)
    try:
        hanabi.runtime("start", cid, check=True)
        script = ("cat /proc/self/uid_map; id -u; for ns in user mnt pid ipc uts; do "
                  "[ $(readlink /proc/self/ns/$ns) = $(readlink /proc/1/ns/$ns) ] && echo same-$ns; done")
        out = hanabi.runtime("exec", cid, "sh", "-c", script, check=True).stdout.decode().split()
        assert out == ["0", str(HOST_ID), str(RANGE), "0", "same-user", "same-mnt", "same-pid", "same-ipc", "same-uts"]
    finally:
        hanabi.runtime("delete", "--force", cid)
    assert leftovers(hanabi, cid) == []


def _overlapping(spec):
    one_range(spec)
    spec["linux"]["uidMappings"] = [{"containerID": 0, "hostID": HOST_ID, "size": 10},
                                    {"containerID": 5, "hostID": 200000, "size": 10}]


def _no_maps(spec):
    spec["linux"]["namespaces"].append({"type": "user"})


def _no_root_mapping(spec):
    one_range(spec)
    spec["linux"]["uidMappings"] = [{"containerID": 1, "hostID": HOST_ID, "size": 10}]


def _size_zero(spec):
    one_range(spec)
    spec["linux"]["uidMappings"] = [{"containerID": 0, "hostID": HOST_ID, "size": 0}]


def _a_host_user_namespace(spec):
    one_range(spec)
    spec["linux"]["namespaces"][-1]["path"] = "/proc/1/ns/user"


@pytest.mark.parametrize("change, runc_says, hanabi_says", [
    (_overlapping, "failed to update /proc/", r"linux.uidMappings[1] overlaps linux.uidMappings[0]"),
    (_no_maps, "User namespaces enabled, but no uid mappings found.",
     "linux.uidMappings: user namespaces enabled, but no uid mappings found"),
    (_no_root_mapping, "User namespaces enabled, but no user mapping found.",
     "linux.uidMappings: user namespaces enabled, but no user mapping found for the container's root"),
    (_size_zero, "", "linux.uidMappings[0].size must be at least 1"),
    (_a_host_user_namespace, "/proc/1/ns/user", "user namespace '/proc/1/ns/user' is a namespace of the host"),
], ids=["overlapping", "no-maps", "no-root-mapping", "size-zero", "host-namespace"])
def test_bad_maps_fail_create_naming_the_field(hanabi, cid, place, tmp_path, change, runc_says, hanabi_says):
    path, _ = userns_bundle(place, ["true"], change, (HOST_ID, HOST_ID))
    under_runc = runc_run(path, cid, tmp_path)
    assert under_runc.returncode != 0 and runc_says in under_runc.stderr.decode(), under_runc.stderr.decode()
    done = hanabi.runtime("create", "--bundle", path, cid)
    assert done.returncode == 1 and hanabi_says in done.stderr.decode(), done.stderr.decode()
    assert leftovers(hanabi, cid) == []


def test_maps_without_a_user_namespace_are_refused(hanabi, cid, place):
    """runc 1.1 ignores them silently (runc 1.2 refuses them, as hanabi does)."""
    def change(spec):
        spec["linux"]["uidMappings"] = [{"containerID": 0, "hostID": HOST_ID, "size": RANGE}]
    path, _ = userns_bundle(place, ["true"], change, (HOST_ID, HOST_ID))
    done = hanabi.runtime("create", "--bundle", path, cid)
    assert done.returncode == 1
    assert "linux.uidMappings: user namespace mappings specified, but the user namespace isn't enabled" \
        in done.stderr.decode()
    assert leftovers(hanabi, cid) == []


def test_linux_settings_inside_the_user_namespace_match_runc(hanabi, cid, place, tmp_path):
    """hostname, namespaced sysctls (ipc inside the user namespace, net.* of the network
    namespace), masked and read-only paths, and a cgroup namespace, all made with a user
    namespace: what the container reads is runc's."""
    script = (
        "hostname; cat /proc/sys/kernel/shmmax /proc/sys/net/ipv4/ip_unprivileged_port_start;"
        "wc -c < /proc/keys;"
        # (not /proc/keys, /proc/timer_list: runc binds the host's /dev/null over them, a
        # devtmpfs node with other flags; here the VM's in the container's /dev)
        "awk '$5 ~ /^\\/(proc\\/(sys|bus|irq|fs|acpi)|sys\\/firmware)$/ {print $5, $6}' "
        "/proc/self/mountinfo | sort;"
        "echo 5 > /proc/sys/kernel/shmmni 2>/dev/null && echo sys-writable || echo sys-readonly;"
        "umount /proc/keys 2>/dev/null && echo mask-removable || echo mask-stays;"
        "grep -c . /proc/self/uid_map; cat /proc/self/cgroup")

    def change(spec):
        one_range(spec)
        spec["hostname"] = "userns-host"
        spec["linux"]["sysctl"] = {"kernel.shmmax": "123456789", "net.ipv4.ip_unprivileged_port_start": "100"}
        spec["linux"]["namespaces"].append({"type": "cgroup"})
        spec["process"]["capabilities"] = {k: ["CAP_SYS_ADMIN", "CAP_KILL"] for k in ("bounding", "effective", "permitted")}
        for mount in spec["mounts"]:
            if mount["destination"] == "/proc":  # as Docker's (the agent's /proc has these flags)
                mount["options"] = ["nosuid", "noexec", "nodev"]
        spec["mounts"].append(SYSFS)  # the agent always gives a /sys
    path, _ = userns_bundle(place, ["sh", "-c", script], change, (HOST_ID, HOST_ID))
    under_runc = runc_run(path, cid, tmp_path)
    assert under_runc.returncode == 0, under_runc.stderr.decode()
    under_hanabi = hanabi.runtime("run", "--bundle", path, cid)
    assert under_hanabi.returncode == 0, under_hanabi.stderr.decode()
    assert leftovers(hanabi, cid) == []
    runc_lines, lines = under_runc.stdout.decode().splitlines(), under_hanabi.stdout.decode().splitlines()
    assert lines[:3] == ["userns-host", "123456789", "100"]
    # mask-removable: under runc the masks are made inside the user namespace, whose root may
    # unmount them again; hanabi makes them there too.
    # The host's cgroup v1 under runc, the guest's v2: either way the namespace's root.
    cut = lines.index("1")
    assert lines[:cut + 1] == runc_lines[:cut + 1], (lines, runc_lines)
    assert "/proc/sys ro,nosuid,nodev,noexec,relatime" in lines and "sys-readonly" in lines
    assert lines[cut + 1:] == ["0::/"] and all(line.endswith(":/") for line in runc_lines[cut + 1:])


def test_a_time_namespace_inside_the_user_namespace(hanabi, cid, place):
    """runc 1.1 knows no time namespace: the offsets are checked in the guest alone."""
    def change(spec):
        one_range(spec)
        spec["linux"]["namespaces"].append({"type": "time"})
        spec["linux"]["timeOffsets"] = {"boottime": {"secs": 86400}}
    path, _ = userns_bundle(place, ["sh", "-c", "cat /proc/self/timens_offsets; cat /proc/self/uid_map"],
                            change, (HOST_ID, HOST_ID))
    done = hanabi.runtime("run", "--bundle", path, cid)
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode().split() == ["monotonic", "0", "0", "boottime", "86400", "0", "0", str(HOST_ID), str(RANGE)]
    assert leftovers(hanabi, cid) == []
