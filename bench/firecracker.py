"""Firecracker boot benchmark (issue #6): per VM, the time from spawning the process to its
API socket answering, to InstanceStart accepted, to the guest agent answering over hybrid
vsock, and the VMM's resident memory once the agent is ready.

Drives vmmd's FirecrackerHypervisor and agentd's AgentSession directly (no daemons), with
the guest image of `vmm.guest_dir`. Needs `firecracker` (>= 1.8) on PATH and a /dev/kvm that
boots stock kernels; elsewhere it prints why it cannot run and exits 0 having measured
nothing. Reports medians; asserts nothing. Writes bench/results/firecracker.json.

    .venv/bin/python bench/firecracker.py   # HANABI_BENCH_RUNS=5 by default
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.helpers.firecracker_host import firecracker_skip_reason  # noqa: E402
from tests.helpers.hanabi import GUEST_DIR  # noqa: E402

RUNS = int(os.environ.get("HANABI_BENCH_RUNS", "5"))


class _BootLog(logging.Handler):
    """Keeps the backend's "firecracker running" record (it carries the phase timings)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage() == "firecracker running":
            self.records.append(record)


def rss_kib(pid: int) -> int | None:
    """VmRSS of a process in KiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def boot_once(work: Path, index: int, boot_log: _BootLog) -> dict:
    """Boot one VM, wait for its agent, measure, stop it."""
    from hanabi_agentd.channel import address_for, make_channel
    from hanabi_agentd.session import AgentSession
    from hanabi_common.config import AgentConfig, Config
    from hanabi_vmmd.firecracker.backend import FirecrackerHypervisor
    from hanabi_vmmd.hypervisor import VmSpec
    from hanabi_vmmd.qemu_cmdline import kernel_cmdline

    backend = FirecrackerHypervisor(start_timeout=30.0)
    vm_dir = work / "vm" / f"{index:016x}"
    spec = VmSpec.in_dir(f"bench{index}", vm_dir, memory_mib=256, vcpus=1, kernel=GUEST_DIR / "vmlinux",
                         initrd=GUEST_DIR / "initrd.img", cmdline=kernel_cmdline(), accel="kvm")
    began = time.perf_counter()
    handle = backend.start(spec)
    started = time.perf_counter() - began
    address = address_for(str(handle.agent_socket), handle.agent_transport, handle.agent_port)
    session = AgentSession(spec.sandbox_id, lambda: make_channel(address),
                           Config(run_dir=work / "run", agent=AgentConfig(ready_timeout_s=30.0)))
    try:
        session.connect()
        ready = time.perf_counter() - began
        rss = rss_kib(handle.pid)
    finally:
        session.close()
        backend.stop(handle, timeout=5.0)
        shutil.rmtree(vm_dir, ignore_errors=True)
    record = boot_log.records[-1]
    return {"api_socket_s": record.api_socket_ms / 1000, "instance_start_s": record.instance_start_ms / 1000,
            "start_returned_s": started, "agent_ready_s": ready, "vmm_rss_kib": rss}


def main() -> None:
    reason = firecracker_skip_reason()
    if reason:
        print(json.dumps({"skipped": reason}))
        return
    boot_log = _BootLog()
    logging.getLogger("hanabi.vmmd.firecracker").addHandler(boot_log)
    logging.getLogger("hanabi.vmmd.firecracker").setLevel(logging.INFO)
    work = Path(tempfile.mkdtemp(prefix="hfcb"))
    try:
        runs = [boot_once(work, i, boot_log) for i in range(RUNS)]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    keys = ["api_socket_s", "instance_start_s", "agent_ready_s", "vmm_rss_kib"]
    report = {"runs": RUNS, "median": {k: round(statistics.median(r[k] for r in runs if r[k] is not None), 4)
                                       for k in keys}, "all": runs}
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "firecracker.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
