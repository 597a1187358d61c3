"""Time namespaces (linux.namespaces type time, linux.timeOffsets) as runc 1.2 makes them.

The runc installed here (1.1) refuses the namespace type, so what the container sees in the
guest is checked instead: its boottime and monotonic clocks carry the offsets (/proc/uptime,
/proc/self/timens_offsets), an exec joins the same namespace, and bad offsets fail create
naming the field with nothing left behind."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.helpers.hanabi import leftovers
from tests.integration.test_runtime_security import edit

pytestmark = pytest.mark.integration

DAY = 86400
# (busybox runs cat inside the shell itself: the shell's own namespace counts)
SHOW = "cat /proc/self/timens_offsets; cut -d' ' -f1 /proc/uptime"


def with_time(offsets):
    def change(spec):
        spec["linux"]["namespaces"].append({"type": "time"})
        spec["linux"]["timeOffsets"] = offsets
    return change


def _offsets_and_uptime(out: str) -> tuple[dict[str, tuple[int, int]], float]:
    lines = out.split()
    offsets = {lines[i]: (int(lines[i + 1]), int(lines[i + 2])) for i in range(0, len(lines) - 1, 3)}
    return offsets, float(lines[-1])


@pytest.mark.skipif(shutil.which("runc") is None, reason="runc is not installed")
def test_runc_here_does_not_know_time_namespaces(bundle, cid, tmp_path):
    path = edit(bundle(["true"]), with_time({"boottime": {"secs": DAY}}))
    done = subprocess.run(["runc", "--root", str(tmp_path / "st"), "run", "--bundle", path, cid],
                          stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
    version = subprocess.run(["runc", "--version"], capture_output=True, text=True).stdout
    if done.returncode == 0:
        pytest.skip(f"this runc makes time namespaces: {version.splitlines()[0]}")
    assert 'namespace {"time" ""} does not exist' in done.stderr.decode().replace('\\"', '"')


def test_the_container_sees_its_offsets_and_an_exec_joins_them(hanabi, bundle, cid):
    path = edit(bundle(["sh", "-c", f"{SHOW}; sleep 600"]),
                with_time({"boottime": {"secs": DAY, "nanosecs": 5}, "monotonic": {"secs": 2 * DAY}}))
    hanabi.runtime("create", "--bundle", path, cid, check=True)
    try:
        hanabi.runtime("start", cid, check=True)
        seen = hanabi.runtime("exec", cid, "sh", "-c", SHOW, check=True).stdout.decode()
        offsets, uptime = _offsets_and_uptime(seen)
        assert offsets == {"monotonic": (2 * DAY, 0), "boottime": (DAY, 5)}
        assert DAY < uptime < DAY + 3600  # the guest booted moments ago
        guest = hanabi.runtime("exec", cid, "cat", "/proc/1/timens_offsets", check=True).stdout.decode()
        assert guest.split() == seen.split()[:6]  # the init's namespace is the exec's
    finally:
        hanabi.runtime("delete", "--force", cid)
    assert leftovers(hanabi, cid) == []


def test_without_a_time_namespace_the_clocks_are_the_guests(hanabi, bundle, cid):
    done = hanabi.runtime("run", "--bundle", bundle(["sh", "-c", SHOW]), cid, check=True)
    offsets, uptime = _offsets_and_uptime(done.stdout.decode())
    assert offsets == {"monotonic": (0, 0), "boottime": (0, 0)} and uptime < 3600
    assert leftovers(hanabi, cid) == []


@pytest.mark.parametrize("offsets, message", [
    ({"boottime": {"secs": 1, "nanosecs": 1_000_000_000}}, "linux.timeOffsets.boottime.nanosecs must be 0..999999999"),
    ({"realtime": {"secs": 1}}, "linux.timeOffsets: 'realtime' is not a clock"),
    ({"monotonic": {"secs": -10 * 365 * DAY}}, "linux.timeOffsets.monotonic: the offset puts the monotonic clock out of range"),
], ids=["nanosecs", "clock", "negative-clock"])
def test_bad_offsets_fail_create_naming_the_field(hanabi, bundle, cid, offsets, message):
    path = edit(bundle(["true"]), with_time(offsets))
    done = hanabi.runtime("create", "--bundle", path, cid)
    assert done.returncode == 1 and message in done.stderr.decode(), done.stderr.decode()
    assert leftovers(hanabi, cid) == []
