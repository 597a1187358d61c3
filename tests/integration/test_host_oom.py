"""hostoom.py against a real cgroup v1 memory group of the host (root): the group goes out
of memory once (an eventfd registered as containerd's shim registers it sees it), nobody
is killed, limit and OOM killer come back; a group that is not the container's is refused."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hanabi_runtime import hostoom

MEMORY = Path("/sys/fs/cgroup/memory")
pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(os.geteuid() != 0 or not (MEMORY / "cgroup.event_control").exists(),
                                 reason="needs root and a cgroup v1 memory hierarchy")]


@pytest.fixture
def group():
    directory = MEMORY / f"hanabi-test-oom-{os.getpid()}"
    directory.mkdir()
    # A stand-in's neighbour in the group (the VMM there): it must survive.
    neighbour = subprocess.Popen([sys.executable, "-c", "import time; b = bytearray(8 << 20); time.sleep(60)"])
    (directory / "cgroup.procs").write_text(str(neighbour.pid))
    yield directory, neighbour
    neighbour.kill()
    neighbour.wait()
    directory.rmdir()


def test_the_group_sees_one_oom_and_nobody_is_killed(group):
    directory, neighbour = group
    watcher = hostoom.OomNotifier(directory)  # as the shim's epoller
    limit = (directory / "memory.limit_in_bytes").read_text()
    try:
        took = hostoom.raise_oom_v1(directory)
        assert watcher.wait(2.0) >= 1
    finally:
        watcher.close()
    assert took < 5
    assert neighbour.poll() is None
    assert (directory / "memory.limit_in_bytes").read_text() == limit
    control = (directory / "memory.oom_control").read_text()
    assert "oom_kill_disable 0" in control and "under_oom 0" in control and "oom_kill 0" in control
    assert (directory / "cgroup.procs").read_text().split() == [str(neighbour.pid)]


def test_a_group_that_is_not_the_containers_is_left_alone(group):
    directory, neighbour = group
    with pytest.raises(hostoom.HostOomError, match="not in a memory cgroup of the container"):
        hostoom.raise_oom(allowed=[str(directory)], pid=os.getpid())  # this test's own group
    assert hostoom.own_memory_cgroup(neighbour.pid) == ("v1", directory)


def test_memory_cgroup_of_proc_texts(tmp_path):
    assert hostoom.memory_cgroup("4:memory:/docker/abc\n0::/\n", tmp_path) == ("v1", tmp_path / "memory/docker/abc")
    assert hostoom.memory_cgroup("4:memory:/\n", tmp_path) is None
    assert hostoom.memory_cgroup("0::/x\n", tmp_path) is None  # no v2 memory controller there
    (tmp_path / "cgroup.controllers").write_text("cpu memory pids\n")
    assert hostoom.memory_cgroup("0::/x/y\n", tmp_path) == ("v2", tmp_path / "x/y")
