"""Storage through the VM's live file share, against runc in the same run (issue #12).

Part of `make bench`. One private dockerd (tests/e2e/docker_env.py) with the hanabi
daemons; for runc and for hanabi, through the same dockerd and image:
- 5,000 small files written and read back, on the root filesystem and on a named volume;
- 512 MiB written sequentially (fsync'd) and read back, on both.
Each workload runs inside one `docker run`, timed by the container itself (/proc/uptime
before and after, so VM boot is not counted). Then `hanabi-runtime run true` with the
rootfs shared (`[block] rootfs = "share"`, the default) against the block layer
(`"block"`), interleaved, medians of HANABI_BENCH_RUNS. Prints ratios, writes
bench/results/storage.json. Asserts nothing.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.run import publish  # noqa: E402
from tests.e2e.docker_env import IMAGE, PrivateDocker, e2e_skip_reason, make_base_dir  # noqa: E402
from tests.helpers.hanabi import start_daemons  # noqa: E402

RUNS = int(os.environ.get("HANABI_BENCH_RUNS", "10"))
SMALL_FILES = int(os.environ.get("HANABI_BENCH_SMALL_FILES", "5000"))
BIG_MIB = int(os.environ.get("HANABI_BENCH_BIG_MIB", "512"))
# Each prints "<write seconds> <read seconds>", measured in the container.
CLOCK = "cut -d' ' -f1 /proc/uptime"
SMALL = (f"cd $DIR && t0=$({CLOCK}) && i=0 && while [ $i -lt {SMALL_FILES} ]; do echo $i > f$i; i=$((i+1)); done "
         f"&& sync && t1=$({CLOCK}) && cat f* > /dev/null && t2=$({CLOCK}) && echo $t0 $t1 $t2")
BIG = (f"cd $DIR && t0=$({CLOCK}) && dd if=/dev/zero of=big bs=1M count={BIG_MIB} conv=fsync 2>/dev/null "
       f"&& t1=$({CLOCK}) && dd if=big of=/dev/null bs=1M 2>/dev/null && t2=$({CLOCK}) && echo $t0 $t1 $t2")


def in_container(env: PrivateDocker, runtime: str, script: str, where: str) -> tuple[float, float]:
    volume = f"bench{time.monotonic_ns()}"
    mount = ["-v", f"{volume}:/vol"] if where == "volume" else []
    directory = "/vol" if where == "volume" else "/work"
    prep = "" if where == "volume" else "mkdir -p /work && "
    try:
        done = env.run("run", "--rm", f"--runtime={runtime}", "--network", "none", *mount, "-e", f"DIR={directory}",
                       IMAGE, "sh", "-c", prep + script, timeout=1800)
        if done.returncode != 0:
            raise RuntimeError(f"{runtime} {where}: {done.stderr.strip()[-500:]}")
        t0, t1, t2 = (float(x) for x in done.stdout.split())
        return t1 - t0, t2 - t1
    finally:
        env.run("volume", "rm", "-f", volume, timeout=60)


def docker_part() -> dict:
    logs = Path(tempfile.mkdtemp(prefix="hanabi-bench-storage-"))
    daemons = start_daemons(logs / "hanabi")
    env = PrivateDocker(base=make_base_dir(), logs=logs, hanabi=daemons)
    report: dict = {}
    try:
        env.start()
        env.import_busybox()
        for name, script in (("small_files", SMALL), ("sequential", BIG)):
            for where in ("rootfs", "volume"):
                times = {rt: in_container(env, rt, script, where) for rt in ("runc", "hanabi")}
                for i, phase in enumerate(("write", "read")):
                    runc, hanabi = times["runc"][i], times["hanabi"][i]
                    key = f"{name}_{where}_{phase}"
                    report[f"{key}_runc_s"] = round(runc, 3)
                    report[f"{key}_hanabi_s"] = round(hanabi, 3)
                    report[f"{key}_ratio"] = round(hanabi / runc, 1) if runc > 0 else None
    finally:
        env.close()
    return report


def start_part() -> dict:
    """`hanabi-runtime run true`, shared rootfs against the block layer."""
    from hanabi_runtime.demo_bundle import make_bundle
    base = Path(tempfile.mkdtemp(prefix="hanabi-bench-start-"))
    bundle = make_bundle(base / "bundle", ["true"])
    sets = {mode: start_daemons(base / mode, extra_toml=f'rootfs = "{mode}"\n') for mode in ("share", "block")}
    times: dict[str, list[float]] = {mode: [] for mode in sets}
    try:
        for index in range(RUNS + 1):
            for mode, daemons in sets.items():
                began = time.perf_counter()
                done = daemons.runtime("run", "--bundle", str(bundle), f"b{mode}{index}", timeout=300)
                if done.returncode != 0:
                    raise RuntimeError(f"{mode}: {done.stderr.decode()[-500:]}")
                if index:  # the first of each builds caches (the block base)
                    times[mode].append(time.perf_counter() - began)
    finally:
        for daemons in sets.values():
            daemons.stop_all()
    share, block = statistics.median(times["share"]), statistics.median(times["block"])
    return {"run_true_share_s": round(share, 3), "run_true_block_s": round(block, 3),
            "start_ratio_share_vs_block": round(share / block, 2)}


def main() -> None:
    reason = e2e_skip_reason()
    if reason:
        sys.exit(f"cannot benchmark here: {reason}")
    report = {"runs": RUNS, "small_files": SMALL_FILES, "big_mib": BIG_MIB}
    report.update(start_part())
    report.update(docker_part())
    publish(report, "storage.json")


if __name__ == "__main__":
    main()
