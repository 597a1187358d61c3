"""`hanabi-runtime check` run for real on this host: it must say whether Firecracker can run
here and, if not, why (on this development machine: no binary, nested PVM KVM)."""

from __future__ import annotations

import json
import shutil
import subprocess

from hanabi_vmmd import accel
from tests.helpers.hanabi import BIN


def run_check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "hanabi-runtime"), "check", "--no-daemons", *args],
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


def test_check_says_whether_firecracker_can_run_and_why():
    binary = shutil.which("firecracker")
    kvm_problem = accel.kvm_problem(accel.probe_facts())
    done = run_check()
    out = done.stdout
    report = json.loads(run_check("--json").stdout)
    fc = next(b for b in report["backends"] if b["name"] == "firecracker")
    if binary is None:
        assert "firecracker: CANNOT run on this host" in out
        assert "firecracker not on PATH" in out and "to fix: install a Firecracker release binary" in out
        assert not fc["can_run"] and "firecracker not on PATH" in fc["problems"]
    if kvm_problem:
        assert f"KVM unusable: {kvm_problem}" in out and not fc["can_run"]
    if binary is None or kvm_problem:
        assert report["auto"] != "firecracker"
    qemu = next(b for b in report["backends"] if b["name"] == "qemu")
    assert done.returncode == (0 if fc["can_run"] or qemu["can_run"] else 1)
    assert report["ok"] == (done.returncode == 0)
