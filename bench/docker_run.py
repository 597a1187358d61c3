"""`docker run --rm IMAGE true`: hanabi against runc, through the same private dockerd.

Part of `make bench`. Starts the hanabi daemons and a private dockerd (the e2e harness in
tests/e2e/docker_env.py), imports the busybox test image, then times N runs per runtime,
interleaved so that both see the same machine load. Prints medians and the ratio; writes
bench/results/docker.json. Asserts nothing.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.e2e.docker_env import IMAGE, PrivateDocker, e2e_skip_reason, make_base_dir  # noqa: E402
from bench.run import load_average, prepare, publish  # noqa: E402
from tests.helpers.hanabi import start_daemons  # noqa: E402

RUNS = int(os.environ.get("HANABI_BENCH_RUNS", "10"))


def timed_run(env: PrivateDocker, runtime: str) -> float:
    started = time.perf_counter()
    done = env.run("run", "--rm", f"--runtime={runtime}", "--network", "none", IMAGE, "true", timeout=120)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"docker run with {runtime} failed: {done.stderr.strip()[-500:]}")
    return elapsed


def main() -> None:
    reason = e2e_skip_reason()
    if reason:
        sys.exit(f"cannot benchmark here: {reason}")
    import tempfile
    prepare()
    load_at_start = load_average()
    logs = Path(tempfile.mkdtemp(prefix="hanabi-bench-docker-"))
    daemons = start_daemons(logs / "hanabi")
    env = PrivateDocker(base=make_base_dir(), logs=logs, hanabi=daemons)
    try:
        env.start()
        env.import_busybox()
        timed_run(env, "runc")  # warm the image and the shim once for both
        timed_run(env, "hanabi")  # and build the VM template (once per guest image and size)
        runc, hanabi = [], []
        for _ in range(RUNS):
            runc.append(timed_run(env, "runc"))
            hanabi.append(timed_run(env, "hanabi"))
    finally:
        env.close()
    report = {
        "runs": RUNS, "load_average_at_start": load_at_start,
        "docker_run_true_runc_s": round(statistics.median(runc), 3),
        "docker_run_true_hanabi_s": round(statistics.median(hanabi), 3),
        "ratio_hanabi_vs_runc": round(statistics.median(hanabi) / statistics.median(runc), 1),
        "walls_s": {"runc": [round(v, 3) for v in runc], "hanabi": [round(v, 3) for v in hanabi]},
    }
    publish(report, "docker.json")


if __name__ == "__main__":
    main()
