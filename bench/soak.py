"""Soak (issue 13, outside the suite): create/start/exec/delete cycles through a private
dockerd with a random hanabi daemon SIGKILLed and restarted every `--kill-every` cycles.

Each cycle: `docker run -d` (create + start), `docker exec` (must print what it was told),
`docker rm -f` (delete). A daemon is killed between cycles (seeded choice) and restarted the
way the test harness does it (each daemon once per round of four kills, seeded order)
(systemd would do the same with Restart=on-failure). At the end
the leftovers are compared with what there was before: processes (VMs, stand-ins, shims),
mounts, taps, network namespaces, loop devices, sockets, state files and volumes; the
report has the failures per step, the seconds per cycle and the fd count and RSS of each
daemon over the run. Writes bench/results/soak.json. Needs root, dockerd and QEMU.

    .venv/bin/python bench/soak.py [--cycles 300] [--kill-every 25] [--seed 13]
"""

from __future__ import annotations

import argparse
import random
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.run import median, publish  # noqa: E402
from hanabi_common.config import DAEMONS  # noqa: E402
from tests.e2e.docker_env import (IMAGE, RUNTIME, PrivateDocker, e2e_skip_reason,  # noqa: E402
                                  hanabi_leftovers, make_base_dir)
from tests.helpers.fuzz import fd_count  # noqa: E402
from tests.helpers.hanabi import start_daemons  # noqa: E402

SETTLE_S = 60.0


def rss_kib(pid: int) -> int:
    """Resident set size of `pid` in KiB (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def leftovers(env: PrivateDocker) -> dict[str, set[str]]:
    """hanabi_leftovers plus netd's namespaces and the sockets under the run directory."""
    found = hanabi_leftovers(env)
    run_dir = env.hanabi.config.run_dir
    netns = run_dir / "netns"
    found["network namespaces"] = set(p.name for p in netns.iterdir()) if netns.is_dir() else set()
    found["sockets"] = {str(p.relative_to(run_dir)) for p in run_dir.rglob("*.sock")}
    return found


def sample(env: PrivateDocker, cycle: int, series: dict) -> None:
    for name in DAEMONS:
        proc = env.hanabi.procs.get(name)
        if proc is not None:
            series[name].append({"cycle": cycle, "fds": fd_count(proc.pid), "rss_kib": rss_kib(proc.pid)})


def one_cycle(env: PrivateDocker, name: str, failures: dict[str, list[str]]) -> None:
    run = env.run("run", "-d", f"--runtime={RUNTIME}", "--network", "none", "--name", name, IMAGE,
                  "sh", "-c", "echo ready; exec sleep 3600", timeout=180)
    if run.returncode != 0:
        failures["run"].append(f"{name}: {run.stderr.strip()[-300:]}")
    else:
        done = env.run("exec", name, "echo", f"hi-{name}", timeout=120)
        if done.returncode != 0 or done.stdout.strip() != f"hi-{name}":
            failures["exec"].append(f"{name}: {done.returncode} {done.stderr.strip()[-300:]}")
    removed = env.run("rm", "-f", name, timeout=180)
    if removed.returncode != 0:
        failures["rm"].append(f"{name}: {removed.stderr.strip()[-300:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=300)
    parser.add_argument("--kill-every", type=int, default=25)
    parser.add_argument("--seed", type=int, default=13)
    args = parser.parse_args()
    reason = e2e_skip_reason()
    if reason:
        publish({"skipped": reason}, "soak.json")
        return
    rng = random.Random(args.seed)
    logs = Path(tempfile.mkdtemp(prefix="hanabi-soak-"))
    env = PrivateDocker(base=make_base_dir(), logs=logs, hanabi=start_daemons(logs / "hanabi"))
    series: dict[str, list[dict]] = {name: [] for name in DAEMONS}
    failures: dict[str, list[str]] = {"run": [], "exec": [], "rm": []}
    kills: list[dict] = []
    clean = False
    seconds: list[float] = []
    order: list[str] = []
    try:
        env.start()
        env.import_busybox()
        before = leftovers(env)
        sample(env, 0, series)
        for cycle in range(1, args.cycles + 1):
            started = time.monotonic()
            one_cycle(env, f"soak{cycle}", failures)
            seconds.append(time.monotonic() - started)
            if cycle % args.kill_every == 0:
                if not order:  # every daemon once per round, in a seeded random order
                    order = rng.sample(DAEMONS, len(DAEMONS))
                victim = order.pop()
                env.hanabi.stop(victim, sig=signal.SIGKILL)
                env.hanabi.start(victim)
                kills.append({"cycle": cycle, "daemon": victim})
            if cycle % 5 == 0 or cycle == args.cycles:
                sample(env, cycle, series)
                print(f"cycle {cycle}: {seconds[-1]:.1f} s, failures "
                      f"{ {k: len(v) for k, v in failures.items()} }", flush=True)
        deadline = time.monotonic() + SETTLE_S
        while True:
            after = leftovers(env)
            leaked = {kind: sorted(after[kind] - before[kind]) for kind in after if after[kind] - before[kind]}
            if not leaked or time.monotonic() > deadline:
                break
            time.sleep(1)
        report = {
            "cycles": args.cycles, "kill_every": args.kill_every, "seed": args.seed, "kills": kills,
            "failures": {k: len(v) for k, v in failures.items()},
            "failure_samples": {k: v[:5] for k, v in failures.items() if v},
            "cycle_seconds": {"median": round(median(seconds), 2), "max": round(max(seconds), 2)},
            "leaked": leaked,
            "daemons": {name: {"first": points[0] if points else None, "last": points[-1] if points else None,
                               "max_fds": max((p["fds"] for p in points), default=0),
                               "max_rss_kib": max((p["rss_kib"] for p in points), default=0),
                               "series": points} for name, points in series.items()},
        }
        publish(report, "soak.json")
        clean = not leaked and not any(failures.values())
    finally:
        env.close()
    if clean:
        shutil.rmtree(logs, ignore_errors=True)
    else:
        print(f"daemon and dockerd logs kept in {logs}", flush=True)


if __name__ == "__main__":
    main()
