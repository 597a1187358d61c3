"""VM templates and the warm pool against cold boots and runc (`make bench`), in one run:
`hanabi-runtime run true` with `vmm.templates = false` (cold boot), `true` (a clone, from a
spare VMM as by default; the first run, which builds the template, is not counted), `true`
with `spare_vmms = 0` (each clone starts its own QEMU) and `true` with `pool_size = 1` (each
run waits until the pool holds a VM, a clone too, as a host with spare capacity would), and
`runc run`, each as a ratio to runc's median; vmmd's clone-to-agent-ready time (from the
spare's claim, or from QEMU's spawn without spares, to the agent's answer to `restored`,
from its log); and the host PSS
(/proc/PID/smaps_rollup) of the QEMU of an idle container, cold and cloned. Medians of
HANABI_BENCH_RUNS (default 10). Writes bench/results/templates.json.
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

from bench.run import load_average, median, prepare, publish, time_command  # noqa: E402
from hanabi_runtime.demo_bundle import make_bundle  # noqa: E402
from hanabi_vmmd.client import VmmdClient  # noqa: E402
from tests.helpers.hanabi import BIN, integration_skip_reason, start_daemons  # noqa: E402

RUNS = int(os.environ.get("HANABI_BENCH_RUNS", "10"))
IDLE = int(os.environ.get("HANABI_BENCH_IDLE", "4"))  # idle containers measured per mode
SETTLE_S = 3.0  # after start, before reading PSS: the guest goes idle
POOL_WAIT_S = 120.0


def pss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    raise RuntimeError(f"no Pss in /proc/{pid}/smaps_rollup")


def quiet(argv: list[str]) -> None:
    """Run a CLI call whose stdio a container's stand-in may keep (create): no pipes."""
    done = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if done.returncode != 0:
        raise RuntimeError(f"{argv} failed with status {done.returncode}")


def runtime(daemons) -> list[str]:
    return [str(BIN / "hanabi-runtime"), "--config", str(daemons.config_path)]


def run_true(daemons, bundle: Path, label: str, pooled: bool = False) -> list[float]:
    walls = []
    for i in range(RUNS):
        if pooled:
            wait_pool(daemons)
        walls.append(time_command(runtime(daemons) + ["run", "--bundle", str(bundle), f"tb-{label}-{i}"]))
    return walls


def wait_pool(daemons) -> None:
    """Until the warm pool holds a VM (not timed: a host with spare capacity has one)."""
    vmmd, deadline = VmmdClient(daemons.config), time.monotonic() + POOL_WAIT_S
    while not vmmd.pool().vms:
        if time.monotonic() > deadline:
            raise RuntimeError("the warm pool did not fill")
        time.sleep(0.05)


def idle_pss(daemons, bundle: Path, label: str) -> list[int]:
    """PSS (KiB) of the QEMU of each of IDLE idle containers running at once."""
    ids = [f"tb-idle-{label}-{i}" for i in range(IDLE)]
    try:
        for cid in ids:
            quiet(runtime(daemons) + ["create", "--bundle", str(bundle), cid])
            quiet(runtime(daemons) + ["start", cid])
        time.sleep(SETTLE_S)
        vmmd = VmmdClient(daemons.config)
        return [pss_kib(vmmd.get(cid).pid) for cid in ids]
    finally:
        for cid in ids:
            subprocess.run(runtime(daemons) + ["delete", "--force", cid], stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def clone_ready_ms(log: Path) -> list[float]:
    out = []
    for line in log.read_text().splitlines():
        if '"vm cloned from a template"' in line:
            out.append(json.loads(line)["agent_ready_ms"])
    return out


def main() -> None:
    reason = integration_skip_reason()
    if reason or not shutil.which("runc"):
        sys.exit(f"cannot benchmark here: {reason or 'runc is not installed'}")
    prepare()
    load_at_start = load_average()
    work = Path(tempfile.mkdtemp(prefix="hanabi-bench-templates-"))
    bundle = make_bundle(work / "bundle", ["true"])
    idle = make_bundle(work / "idle", ["sleep", "3600"])
    walls = {"runc": [time_command(["runc", "run", "--bundle", str(bundle), f"tb-runc-{i}"]) for i in range(RUNS)]}
    pss: dict[str, list[int]] = {}
    ready: list[float] = []
    ready_without_spare: list[float] = []
    for label, vmm_toml in (("cold", "templates = false"), ("clone", "templates = true"),
                            ("clone_no_spare", "templates = true\nspare_vmms = 0"),
                            ("pool", "templates = true\npool_size = 1")):
        daemons = start_daemons(work / label, vmm_toml=vmm_toml)
        try:
            if label != "cold":  # builds the template: not counted
                time_command(runtime(daemons) + ["run", "--bundle", str(bundle), "tb-warmup"])
            walls[label] = run_true(daemons, bundle, label, pooled=label == "pool")
            if label in ("cold", "clone"):
                pss[label] = idle_pss(daemons, idle, label)
            if label == "clone":
                ready = clone_ready_ms(daemons.root / "vmmd.log")[1:]  # [0]: the warm-up's
            if label == "clone_no_spare":
                ready_without_spare = clone_ready_ms(daemons.root / "vmmd.log")[1:]
        finally:
            daemons.stop_all()
    walls["runc_after"] = [time_command(["runc", "run", "--bundle", str(bundle), f"tb-runc2-{i}"])
                           for i in range(RUNS)]  # the load may have changed meanwhile
    shutil.rmtree(work, ignore_errors=True)
    runc = median(walls["runc"] + walls["runc_after"])
    cold, clone, pool = (median(walls[k]) for k in ("cold", "clone", "pool"))
    no_spare = median(walls["clone_no_spare"])
    publish({
        "runs": RUNS, "idle_containers": IDLE, "load_average_at_start": load_at_start,
        "runc_run_true_s": runc, "cold_run_true_s": cold, "clone_run_true_s": clone, "pool_run_true_s": pool,
        "ratio_cold_vs_runc": round(cold / runc, 1), "ratio_clone_vs_runc": round(clone / runc, 1),
        "ratio_pool_vs_runc": round(pool / runc, 1),
        "clone_no_spare_run_true_s": no_spare, "ratio_clone_no_spare_vs_runc": round(no_spare / runc, 1),
        "clone_vs_clone_no_spare": round(clone / no_spare, 2),
        "clone_vs_cold": round(clone / cold, 2), "pool_vs_clone": round(pool / clone, 2),
        "clone_to_agent_ready_ms_median": round(statistics.median(ready), 1) if ready else None,
        "clone_no_spare_to_agent_ready_ms_median":
            round(statistics.median(ready_without_spare), 1) if ready_without_spare else None,
        "idle_pss_mib_median": {k: round(statistics.median(v) / 1024, 1) for k, v in pss.items()},
        "walls_s": {k: [round(v, 3) for v in vs] for k, vs in walls.items()},
        "clone_to_agent_ready_ms": ready,
        "clone_no_spare_to_agent_ready_ms": ready_without_spare,
        "idle_pss_kib": pss,
    }, "templates.json")


if __name__ == "__main__":
    main()
