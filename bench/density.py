"""How many idle containers fit on this machine (`make bench`; issue 14, item 4).

With VM templates on (the default), start idle containers (`create` + `start` of `sleep
3600`, one after the other, as the shim does) until the host's memory is 80 % used
(MemAvailable below 20 % of MemTotal), or one start takes more than 5 s, or HANABI_DENSITY_CAP
(default 200) run. Reports how many fit and why it stopped, the last start's time, the host
PSS (/proc/PID/smaps_rollup) per idle container (its VMM + its stand-in) with all of them
running, and MemAvailable consumed per container. Then the same PSS for HANABI_DENSITY_COLD
(default 4) idle containers with templates off (cold boots). Everything is deleted after
(and the daemons drained: their release queues empty, nothing left). `runc` has no VM: its
idle `sleep` is measured in the same run as the baseline. HANABI_DENSITY_VMM_TOML adds [vmm]
keys to both phases (an A/B of a setting, e.g. "transparent_hugepages = true"). Writes
bench/results/density.json.

Measured here 2026-12-01 15:55 UTC (HANABI_DENSITY_CAP=200, HANABI_DENSITY_COLD=4; 24105 MiB,
2 cores, other helpers' tests running: load average 1.6 at the start, 2.8 with all 200 up): 200
clones ran (the cap); the last start took 1.41 s (median 1.66 s); host PSS 64.2 MiB per container
(QEMU 55.7 + stand-in 8.5) against 208.9 MiB booted cold (QEMU 199.8; clone/cold 0.31); runc's
idle `sleep` 1.34 MiB (clone/runc 47.9, cold/runc 155.9); MemAvailable fell 64.3 MiB per
container (the whole host: kernel memory per VM and the other helpers' work included), 10 GiB
were left. Idle, the 200 together used 7.1 % of one core in their QEMUs, 0.1 % in their
stand-ins and 0.4 % in the four daemons. Deleting the 200 and draining every daemon's release
queue: 27.7 s, nothing left.
Before (same day, 12:28 UTC, cap 20, load average 7-8): 7 clones ran when the 7th start took
5.48 s; 84.2 MiB per container (QEMU 64.8 + a stand-in of 19.4 that imported pydantic and pyzmq);
and at 15:00 UTC (cap 10, load 1.3-1.9): 85.6 MiB (QEMU 63.0 + stand-in 22.6), idle CPU per
container QEMU 0.26 %, daemons 0.07 %, and `delete --force` 5.1 s each (the guest's flush
request went unanswered).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.run import publish  # noqa: E402
from hanabi_runtime.demo_bundle import make_bundle  # noqa: E402
from tests.helpers.hanabi import BIN, drain, integration_skip_reason, leftovers, start_daemons  # noqa: E402

CAP = int(os.environ.get("HANABI_DENSITY_CAP", "200"))
COLD = int(os.environ.get("HANABI_DENSITY_COLD", "4"))
MAX_USED = 0.80
MAX_START_S = 5.0
SETTLE_S = 3.0  # after the last start, before reading PSS: the guests go idle
IDLE_CPU_S = float(os.environ.get("HANABI_DENSITY_IDLE_S", "20"))  # idle CPU measured over this
VMM_TOML = os.environ.get("HANABI_DENSITY_VMM_TOML", "")  # more [vmm] keys for both phases (an A/B)


def meminfo() -> dict[str, int]:
    """/proc/meminfo in KiB."""
    values = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        values[key] = int(rest.split()[0])
    return values


def pss_kib(pid: int) -> int:
    """A process's proportional set size (KiB), 0 when it is gone."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


def cpu_ns(pid: int) -> dict[int, int]:
    """CPU time each thread of a process has run, in ns by thread id (/proc/PID/task/*/schedstat);
    empty when the process is gone."""
    times = {}
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return {}
    for task in tasks:
        try:
            times[int(task)] = int(Path(f"/proc/{pid}/task/{task}/schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return times


def idle_cpu(groups: dict[str, list[int]], seconds: float) -> dict[str, float]:
    """Percent of one core each group of processes used over `seconds` (everything idle).
    Thread by thread: a thread that ends in the window (QEMU's idle pool workers do) takes
    its earlier time with it, which summing whole processes would count as negative time."""
    before = {pid: cpu_ns(pid) for pids in groups.values() for pid in pids}
    time.sleep(seconds)  # a measurement window, not a wait for a condition
    used = {}
    for name, pids in groups.items():
        total = 0
        for pid in pids:
            earlier = before.get(pid, {})
            total += sum(ns - earlier.get(tid, 0) for tid, ns in cpu_ns(pid).items())
        used[name] = 100 * total / (seconds * 1e9)
    return used


def runtime(daemons, *args: str) -> int:
    """A CLI call whose stdio a stand-in may keep (create): no pipes; its exit status."""
    return subprocess.run([str(BIN / "hanabi-runtime"), "--config", str(daemons.config_path), *args],
                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode


def start_idle(daemons, bundle: Path, cid: str) -> float:
    """create + start one idle container; seconds taken (RuntimeError if it failed)."""
    began = time.monotonic()
    if runtime(daemons, "create", "--bundle", str(bundle), cid) != 0 or runtime(daemons, "start", cid) != 0:
        raise RuntimeError(f"starting {cid} failed")
    return time.monotonic() - began


def container_pids(daemons, cid: str) -> tuple[int, int]:
    """(VMM pid, stand-in pid) of one container, from its state files."""
    directory = daemons.config.sandboxes_dir / cid
    vm = json.loads((directory / "hypervisor.json").read_text())
    state = json.loads((directory / "state.json").read_text())
    return vm["pid"], state["standin_pid"]


def fill(daemons, bundle: Path, label: str, cap: int, stop_early: bool) -> dict:
    """Start idle containers until a stop condition (or `cap`); measure; delete them all."""
    ids: list[str] = []
    starts: list[float] = []
    total = meminfo()["MemTotal"]
    before = meminfo()["MemAvailable"]
    why = f"cap of {cap} reached"
    try:
        while len(ids) < cap:
            if stop_early and 1 - meminfo()["MemAvailable"] / total >= MAX_USED:
                why = f"host memory {MAX_USED:.0%} used"
                break
            cid = f"dens-{label}-{len(ids)}"
            ids.append(cid)
            try:
                starts.append(start_idle(daemons, bundle, cid))
            except RuntimeError as exc:
                why = str(exc)
                break
            if stop_early and starts[-1] > MAX_START_S:
                why = f"a start took {starts[-1]:.2f} s (> {MAX_START_S} s)"
                break
            print(f"{label}: {len(ids)} running, last start {starts[-1]:.2f} s", file=sys.stderr, flush=True)
        time.sleep(SETTLE_S)
        running = [cid for cid in ids if (daemons.config.sandboxes_dir / cid / "hypervisor.json").exists()]
        pids = [container_pids(daemons, cid) for cid in running]
        pss = [(pss_kib(vmm), pss_kib(standin)) for vmm, standin in pids]
        after = meminfo()["MemAvailable"]
        load = os.getloadavg()
        cpu = idle_cpu({"vmm": [v for v, _ in pids], "standin": [s for _, s in pids],
                        "daemons": [p.pid for p in daemons.procs.values()]}, IDLE_CPU_S) if pids else {}
    finally:
        began = time.monotonic()
        for cid in ids:
            runtime(daemons, "delete", "--force", cid)
        deleted_s = time.monotonic() - began
        left = drain(daemons, timeout=300)
        drained_s = time.monotonic() - began
    per = [vmm + standin for vmm, standin in pss]
    return {
        "running": len(running), "stopped_because": why,
        "last_start_s": round(starts[-1], 3) if starts else None,
        "start_s_median": round(statistics.median(starts), 3) if starts else None,
        "start_s": [round(s, 3) for s in (starts if len(starts) <= 20 else starts[:10] + starts[-10:])],
        "pss_mib_per_container_median": round(statistics.median(per) / 1024, 1) if per else None,
        "pss_mib_vmm_median": round(statistics.median(v for v, _ in pss) / 1024, 1) if pss else None,
        "pss_mib_standin_median": round(statistics.median(s for _, s in pss) / 1024, 1) if pss else None,
        "mem_available_used_mib_per_container": round((before - after) / 1024 / len(running), 1) if running else None,
        "load_average_when_full": [round(x, 2) for x in load],
        "idle_cpu_pct_of_a_core_per_container": {name: round(value / len(running), 4) for name, value in cpu.items()}
        if running else None,
        "idle_cpu_pct_of_a_core_all": {name: round(value, 2) for name, value in cpu.items()},
        "delete_all_s": round(deleted_s, 2), "delete_and_drain_s": round(drained_s, 2),
        "left_pending_after_drain": {k: v for k, v in left.items() if v},
        "leftovers": [item for cid in ids for item in leftovers(daemons, cid)],
    }


def runc_idle_pss(bundle: Path) -> int | None:
    """PSS (KiB) of one idle `sleep` under runc, the baseline."""
    if not shutil.which("runc"):
        return None
    cid = "dens-runc"
    subprocess.run(["runc", "run", "-d", "--bundle", str(bundle), cid], stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    try:
        state = json.loads(subprocess.run(["runc", "state", cid], capture_output=True, check=True).stdout)
        return pss_kib(state["pid"])
    finally:
        subprocess.run(["runc", "delete", "--force", cid], capture_output=True)


def main() -> None:
    reason = integration_skip_reason()
    if reason:
        sys.exit(f"cannot benchmark here: {reason}")
    work = Path(tempfile.mkdtemp(prefix="hanabi-bench-density-"))
    idle = make_bundle(work / "idle", ["sleep", "3600"])
    report: dict = {"cap": CAP, "vmm_toml": VMM_TOML, "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
                    "host_mem_total_mib": meminfo()["MemTotal"] // 1024,
                    "host_mem_available_mib_at_start": meminfo()["MemAvailable"] // 1024,
                    "cpus": os.cpu_count()}
    try:
        for label, on, cap, stop_early in (("clone", "true", CAP, True), ("cold", "false", COLD, False)):
            daemons = start_daemons(work / label, vmm_toml=f"templates = {on}\n{VMM_TOML}")
            try:
                if on == "true":  # builds the template first: not counted
                    runtime(daemons, "run", "--bundle", str(make_bundle(work / "warm", ["true"])), "dens-warm")
                report[label] = fill(daemons, idle, label, cap, stop_early)
            finally:
                daemons.stop_all()
        runc = runc_idle_pss(idle)
        report["runc_idle_pss_mib"] = round(runc / 1024, 2) if runc is not None else None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    clone, cold = report["clone"]["pss_mib_per_container_median"], report["cold"]["pss_mib_per_container_median"]
    if clone and cold:
        report["pss_clone_vs_cold"] = round(clone / cold, 2)
    runc_mib = report["runc_idle_pss_mib"]
    if runc_mib:
        for label in ("clone", "cold"):
            if report[label]["pss_mib_per_container_median"]:
                report[f"pss_{label}_vs_runc"] = round(report[label]["pss_mib_per_container_median"] / runc_mib, 1)
    publish(report, "density.json")


if __name__ == "__main__":
    main()
