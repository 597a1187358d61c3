"""`start` returns as runc's does: once the container's init is past its wait, before its
exec. A program that is missing fails (as runc's create does, here at start: the init is
made after create replied); one the kernel cannot run fails after start, in the container's
stderr with status 1, as under runc (the same bundle run by both)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.hanabi import leftovers
from tests.integration.test_runtime_security import runc_run

pytestmark = pytest.mark.integration


def _unrunnable(path: str) -> str:
    program = Path(path) / "rootfs" / "bad"
    program.write_bytes(b"\x00\x01 not a program\n")
    program.chmod(0o755)
    return path


def test_a_program_the_kernel_cannot_run_fails_after_start_as_under_runc(hanabi, bundle, cid, tmp_path):
    path = _unrunnable(bundle(["/bad"]))
    under_runc = runc_run(path, cid, tmp_path)
    assert under_runc.returncode == 1 and b"exec /bad: exec format error" in under_runc.stderr, under_runc
    under_hanabi = hanabi.runtime("run", "--bundle", path, cid)
    assert (under_hanabi.returncode, under_hanabi.stderr) == (1, b"exec /bad: exec format error\n")
    assert leftovers(hanabi, cid) == []
    hanabi.runtime("create", "--bundle", path, cid, check=True)
    started = hanabi.runtime("start", cid)
    assert started.returncode == 0, started.stderr.decode()
    hanabi.wait_stopped(cid, 60)
    hanabi.runtime("delete", cid, check=True)
    assert leftovers(hanabi, cid) == []


@pytest.mark.parametrize("program, says", [
    ("/nonexistent", 'exec: "/nonexistent": stat /nonexistent: no such file or directory'),
    ("no-such-program", 'exec: "no-such-program": executable file not found in $PATH'),
])
def test_a_missing_program_fails_start(hanabi, bundle, cid, tmp_path, program, says):
    path = bundle([program])
    under_runc = runc_run(path, cid, tmp_path)  # runc's create looks it up
    assert under_runc.returncode == 1 and says.encode() in under_runc.stderr.replace(b'\\"', b'"')
    hanabi.runtime("create", "--bundle", path, cid, check=True)
    started = hanabi.runtime("start", cid)
    assert started.returncode == 1 and says in started.stderr.decode(), started.stderr.decode()
    hanabi.runtime("delete", "--force", cid, check=True)
    assert leftovers(hanabi, cid) == []
