"""The warm pool's effect on container start (`make bench`): `hanabi-runtime run true` with
`vmm.pool_size = 1` (each run waits until the pool holds a VM, a clone of the template, as
a host with spare capacity would), against the same without a pool (a clone made at
create) and against `runc run`, in one run; the first run of each, which builds the
template, is not counted. Medians of HANABI_BENCH_RUNS (default 10). bench/templates.py
measures the same three (and cold boots) in its run. Writes bench/results/pool.json.
"""

from __future__ import annotations

import os
import shutil
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

POOL_WAIT_S = 120.0
RUNS = int(os.environ.get("HANABI_BENCH_RUNS", "10"))


def run_true(daemons, bundle: Path, name: str, pooled: bool) -> float:
    """Wall seconds of `hanabi-runtime run` of one container (after the pool filled)."""
    if pooled:
        vmmd, deadline = VmmdClient(daemons.config), time.monotonic() + POOL_WAIT_S
        while not vmmd.pool().vms:
            if time.monotonic() > deadline:
                raise RuntimeError("the warm pool did not fill")
            time.sleep(0.1)
    runtime = [str(BIN / "hanabi-runtime"), "--config", str(daemons.config_path)]
    return time_command(runtime + ["run", "--bundle", str(bundle), name])


def main() -> None:
    reason = integration_skip_reason()
    if reason or not shutil.which("runc"):
        sys.exit(f"cannot benchmark here: {reason or 'runc is not installed'}")
    prepare()
    load_at_start = load_average()
    work = Path(tempfile.mkdtemp(prefix="hanabi-bench-pool-"))
    bundle = make_bundle(work / "bundle", ["true"])
    runc_argv = ["runc", "run", "--bundle", str(bundle)]
    results: dict[str, list[float]] = {"runc": [time_command(runc_argv + [f"pool-runc-{i}"]) for i in range(RUNS)]}
    for label, vmm_toml in (("clone", ""), ("pooled", "pool_size = 1")):
        daemons = start_daemons(work / label, vmm_toml=vmm_toml)
        try:
            run_true(daemons, bundle, f"pool-bench-{label}-warmup", False)  # builds the template
            results[label] = [run_true(daemons, bundle, f"pool-bench-{label}-{i}", bool(vmm_toml))
                              for i in range(RUNS)]
        finally:
            daemons.stop_all()
    shutil.rmtree(work, ignore_errors=True)
    runc, clone, pooled = (median(results[k]) for k in ("runc", "clone", "pooled"))
    publish({"runs": RUNS, "load_average_at_start": load_at_start, "runc_run_true_s": runc,
             "hanabi_clone_run_true_s": clone, "hanabi_pooled_run_true_s": pooled,
             "ratio_clone_vs_runc": round(clone / runc, 1), "ratio_pooled_vs_runc": round(pooled / runc, 1),
             "pooled_vs_clone": round(pooled / clone, 2),
             "walls_s": {k: [round(v, 3) for v in vs] for k, vs in results.items()}}, "pool.json")


if __name__ == "__main__":
    main()
