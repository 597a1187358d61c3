"""The container's host cgroup: path rules, and placement in a fake hierarchy (no root)."""

from __future__ import annotations

import pytest

from hanabi_common.errors import InvalidArgument
from hanabi_runtime import cgroups


@pytest.mark.parametrize("given,expected", [
    ("/docker/abc", "docker/abc"),
    ("system.slice:docker:abc", "system.slice/docker-abc.scope"),
    (":docker:abc", "system.slice/docker-abc.scope"),
    ("user.slice/u.slice::abc", "user.slice/u.slice/abc.scope"),
])
def test_normalize(given, expected):
    assert cgroups.normalize(given) == expected


@pytest.mark.parametrize("bad", ["", "/", "/a/../b", "a//b"])
def test_normalize_refuses(bad):
    with pytest.raises(InvalidArgument):
        cgroups.normalize(bad)


def test_place_join_remove_in_v1_layout(tmp_path):
    for controller in ("cpu", "memory"):
        (tmp_path / controller).mkdir()
        (tmp_path / controller / "cgroup.procs").write_text("")
    (tmp_path / "not-a-hierarchy").mkdir()
    made = cgroups.place("docker/c1", [11, 22], root=tmp_path)
    assert made == [str(tmp_path / "cpu/docker/c1"), str(tmp_path / "memory/docker/c1")]
    assert (tmp_path / "memory/docker/c1/cgroup.procs").read_text() == "22\n"
    cgroups.join(made, 33)
    assert (tmp_path / "cpu/docker/c1/cgroup.procs").read_text() == "33\n"
    for directory in made:  # a real cgroupfs has no files to delete; the fake one does
        (tmp_path / directory / "cgroup.procs").unlink()
    assert cgroups.remove(made, timeout=0.1) == []
    assert not (tmp_path / "cpu/docker/c1").exists()


def test_v2_layout_is_one_hierarchy(tmp_path):
    (tmp_path / "cgroup.controllers").write_text("cpu memory\n")
    (tmp_path / "cpu").mkdir()
    assert cgroups.hierarchies(tmp_path) == [tmp_path]
