"""Benchmarks of hanabi against runc, measured in the same run (`make bench`).

Needs root, the daemons' binaries in this venv, QEMU, the guest image and runc. Starts its
own daemons under a temp run dir. Reports medians and ratios (hanabi / runc); asserts
nothing. Writes bench/results/latest.json as well.

Measured:
- `hanabi-runtime run <bundle> true`, wall time, split into the create phases the runtime
  records (VM start, boot to agent ready, volume, disk hotplug, container create, stand-in),
  start, wait and delete;
- the same `runc run` on the same bundle, as the ratios' denominator;
- the CLI's start-up: `hanabi-runtime state` wall time and `python -X importtime` total.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hanabi_runtime.demo_bundle import make_bundle  # noqa: E402
from tests.helpers.hanabi import BIN, integration_skip_reason, start_daemons  # noqa: E402

RUNS = int(os.environ.get("HANABI_BENCH_RUNS", "5"))


def median(values: list[float]) -> float:
    return round(statistics.median(values), 4)


def time_command(argv: list[str], env: dict | None = None) -> float:
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, env=env)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{argv} failed: {done.stderr.decode()[-500:]}")
    return elapsed


def bench_runc(bundle: Path) -> list[float]:
    return [time_command(["runc", "run", "--bundle", str(bundle), f"bench-runc-{i}"]) for i in range(RUNS)]


def bench_hanabi(daemons, bundle: Path) -> dict:
    runtime = [str(BIN / "hanabi-runtime"), "--config", str(daemons.config_path)]
    walls, phases, state_times = [], {}, []
    for i in range(RUNS):
        cid = f"bench-{i}"
        started = time.perf_counter()
        # Not pipes: the stand-in keeps create's stdio, as a shim expects, so a pipe never ends.
        subprocess.run(runtime + ["create", "--bundle", str(bundle), cid], check=True,
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        created = time.perf_counter()
        state = json.loads((daemons.config.sandboxes_dir / cid / "state.json").read_text())
        for name, value in state["timings"].items():
            phases.setdefault(name, []).append(value)
        state_times.append(time_command(runtime + ["state", cid]))
        before_start = time.perf_counter()
        subprocess.run(runtime + ["start", cid], check=True, capture_output=True)
        begun = time.perf_counter()
        phases.setdefault("start_cli_s", []).append(begun - before_start)
        while json.loads(subprocess.run(runtime + ["state", cid], capture_output=True).stdout)["status"] != "stopped":
            time.sleep(0.01)
        ended = time.perf_counter()
        subprocess.run(runtime + ["delete", cid], check=True, capture_output=True)
        deleted = time.perf_counter()
        walls.append(deleted - started)
        phases.setdefault("create_total_s", []).append(created - started)
        phases.setdefault("start_to_exit_s", []).append(ended - begun)
        phases.setdefault("delete_s", []).append(deleted - ended)
    # `run` itself, end to end, as a user sees it.
    run_walls = [time_command(runtime + ["run", "--bundle", str(bundle), f"bench-run-{i}"]) for i in range(RUNS)]
    return {"lifecycle_wall_s": walls, "run_wall_s": run_walls, "phases": phases, "state_cli_s": state_times}


def import_time() -> float:
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", "import hanabi_runtime.cli"],
                          capture_output=True, text=True)
    totals = [int(m.group(1)) for m in re.finditer(r"\|\s+(\d+) \| hanabi_runtime.cli$", done.stderr, re.M)]
    return totals[-1] / 1e6 if totals else float("nan")


def main() -> None:
    reason = integration_skip_reason()
    if reason or not shutil.which("runc"):
        sys.exit(f"cannot benchmark here: {reason or 'runc is not installed'}")
    prepare()
    work = Path(tempfile.mkdtemp(prefix="hanabi-bench-"))
    bundle = make_bundle(work / "bundle", ["true"])
    daemons = start_daemons(work / "hanabi")
    try:
        runc = bench_runc(bundle)
        hanabi = bench_hanabi(daemons, bundle)
    finally:
        daemons.stop_all()
        shutil.rmtree(work, ignore_errors=True)
    runc_median = median(runc)
    report = {
        "runs": RUNS,
        "runc_run_true_s": runc_median,
        "hanabi_run_true_s": median(hanabi["run_wall_s"]),
        "ratio_run_vs_runc": round(median(hanabi["run_wall_s"]) / runc_median, 1),
        "hanabi_create_start_wait_delete_s": median(hanabi["lifecycle_wall_s"]),
        "phases_median_s": {k: median(v) for k, v in sorted(hanabi["phases"].items())},
        "boot_to_agent_ready_s": median(hanabi["phases"]["agent_ready_s"]),
        "state_cli_wall_s": median(hanabi["state_cli_s"]),
        "cli_calls_s": {"create": median(hanabi["phases"]["create_total_s"]),
                        "start": median(hanabi["phases"]["start_cli_s"]),
                        "state": median(hanabi["state_cli_s"]),
                        "delete": median(hanabi["phases"]["delete_s"])},
        "state_cli_vs_runc_run": round(median(hanabi["state_cli_s"]) / runc_median, 1),
        "cli_import_s": round(import_time(), 4),
    }
    publish(report, "latest.json")


def prepare() -> None:
    """Before timing anything: byte-compile the project's sources, as a wheel install
    (deploy/install.sh) has them. Without `.pyc` files (an editable install run with
    PYTHONDONTWRITEBYTECODE=1) every CLI call and stand-in compiles its modules from source
    (64 modules, 70+ ms a process here), which no installed host pays."""
    import compileall

    for folder in ("libs", "services", "guest"):
        compileall.compile_dir(str(ROOT / folder), quiet=2)


def load_average() -> list[float]:
    """The host's 1/5/15-minute load averages (the benches share 2 cores with other work)."""
    return [round(v, 2) for v in os.getloadavg()]


def publish(report: dict, name: str) -> None:
    """Print a report (with the load average at its end) and keep it as bench/results/<name>."""
    report = {**report, "load_average_at_end": load_average()}
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / name).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
