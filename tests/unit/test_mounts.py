"""Mount planning on the host and mount validation in the guest (pure, no root)."""

from __future__ import annotations

import pytest

from hanabi_common.errors import InvalidArgument
from hanabi_guest.core import AgentError
from hanabi_guest.mounts import check_mounts, make_mounts
from hanabi_guest.sandbox import Rootfs
from hanabi_runtime.mounts import plan_mounts

DOCKER_MOUNTS = [
    {"destination": "/proc", "type": "proc", "source": "proc"},
    {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755"]},
    {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup"},
    {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue"},
    {"destination": "/etc/hosts", "type": "bind", "source": "/var/lib/docker/c/hosts", "options": ["rbind", "rprivate"]},
    {"destination": "/data", "type": "bind", "source": "/srv/data", "options": ["rbind", "ro"]},
    {"destination": "/scratch", "type": "tmpfs", "source": "tmpfs", "options": ["rw", "noexec", "size=65536k", "weird"]},
]


def test_plan_keeps_binds_and_tmpfs_and_leaves_the_rest_to_the_agent():
    plan = plan_mounts(DOCKER_MOUNTS)
    assert plan.binds == [("m0", "/var/lib/docker/c/hosts", False), ("m1", "/srv/data", True)]
    assert plan.guest == [
        {"destination": "/etc/hosts", "type": "bind", "source": "m0", "options": ["rbind"]},
        {"destination": "/data", "type": "bind", "source": "m1", "options": ["rbind", "ro"]},
        {"destination": "/scratch", "type": "tmpfs", "source": None, "options": ["rw", "noexec", "size=65536k"]},
    ]
    assert check_mounts(plan.guest)[1]["options"] == ["rbind", "ro"]


@pytest.mark.parametrize("mount,match", [
    ({"destination": "relative", "type": "bind", "source": "/x"}, "absolute"),
    ({"destination": "/a/../b", "type": "bind", "source": "/x"}, "'..'"),
    ({"destination": "/n", "type": "nfs", "source": "srv:/x"}, "cannot be made in a VM"),
    ({"destination": "/b", "type": "bind", "source": "rel"}, "absolute source"),
])
def test_plan_refuses(mount, match):
    with pytest.raises(InvalidArgument, match=match):
        plan_mounts([mount])


@pytest.mark.parametrize("mounts", [
    "nope", [1], [{"destination": "/x", "type": "overlay"}],
    [{"destination": "/x", "type": "bind", "source": "../etc"}],
    [{"destination": "x", "type": "tmpfs"}],
    [{"destination": "/x/../y", "type": "tmpfs"}],
    [{"destination": "/x", "type": "tmpfs", "options": ["size=1g,exec"]}],
    [{"destination": "/x", "type": "bind", "source": "m0", "options": ["suid"]}],
])
def test_guest_refuses_bad_mounts(mounts):
    with pytest.raises(AgentError):
        check_mounts(mounts)


def test_guest_makes_mount_points_and_calls_mount_in_order(tmp_path):
    binds = tmp_path / "binds"
    (binds / "m0").mkdir(parents=True)
    (binds / "m1").write_text("x")
    root = Rootfs(str(tmp_path / "root"))
    calls = []
    mounts = check_mounts([
        {"destination": "/data", "type": "bind", "source": "m0", "options": ["rbind", "ro"]},
        {"destination": "/etc/hosts", "type": "bind", "source": "m1"},
        {"destination": "/scratch", "type": "tmpfs", "options": ["noexec", "size=1m"]},
    ])
    make_mounts(root, str(binds), mounts, lambda *a: calls.append(a))
    assert (tmp_path / "root/data").is_dir() and (tmp_path / "root/etc/hosts").is_file()
    assert calls == [
        (str(binds / "m0"), f"{root.path}/data", "", 4096 | 16384),
        ("", f"{root.path}/data", "", 4096 | 32 | 1),
        (str(binds / "m1"), f"{root.path}/etc/hosts", "", 4096),
        ("tmpfs", f"{root.path}/scratch", "tmpfs", 8, "size=1m"),
    ]
    assert root.mounts == [f"{root.path}/data", f"{root.path}/etc/hosts", f"{root.path}/scratch"]
