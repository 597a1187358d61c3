"""Fuzzing at length (issue 13): 100,000+ generated malformed messages for the RPC server of
each of the four daemons and 100,000+ hostile chunks for agentd's guest channel, with the
suite's generators (tests/helpers/fuzz.py) and fixed seeds. Reports counts, rates, crashes
(0: a crash fails the run) and fd counts; writes bench/results/fuzz.json. Needs root (the
real daemons), like the integration tests. `--count N` sets the number per target.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.run import publish  # noqa: E402
from hanabi_common.config import DAEMONS  # noqa: E402
from tests.helpers.fuzz import fd_count, fuzz_daemon, settled_fd_count  # noqa: E402
from tests.helpers.hanabi import integration_skip_reason, start_daemons  # noqa: E402
from tests.unit.test_agentd_fuzz import fuzz_guest_channel, hostile_rig  # noqa: E402

SEED = 20261201
BUDGET_S = 3600.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100_000)
    args = parser.parse_args()
    logging.getLogger("hanabi").setLevel(logging.ERROR)  # each cut-off guest is logged: thousands
    report: dict = {"count_per_target": args.count, "seed": SEED, "rpc": {}, "guest_channel": {}}
    reason = integration_skip_reason()
    if reason:
        report["rpc"] = {"skipped": reason}
    else:
        root = Path(tempfile.mkdtemp(prefix="hanabi-fuzz-"))
        daemons = start_daemons(root / "hanabi")
        try:
            for index, name in enumerate(DAEMONS):
                pid = daemons.procs[name].pid
                before = fd_count(pid)
                started = time.monotonic()
                count = fuzz_daemon(daemons, name, budget_s=BUDGET_S, max_items=args.count,
                                    first_seed=SEED + index * 1000)
                elapsed = time.monotonic() - started
                report["rpc"][name] = {"messages": count, "seconds": round(elapsed, 1),
                                       "per_second": round(count / elapsed), "crashes": 0,
                                       "fds_before": before, "fds_after": settled_fd_count(pid, before)}
                print(name, report["rpc"][name], flush=True)
        finally:
            daemons.stop_all()
            shutil.rmtree(root, ignore_errors=True)
    with hostile_rig() as (svc, _good, bad):
        started = time.monotonic()
        got = fuzz_guest_channel(svc, bad, budget_s=BUDGET_S, max_items=args.count, first_seed=SEED)
        got.update(seconds=round(time.monotonic() - started, 1), crashes=0)
        report["guest_channel"] = got
    publish(report, "fuzz.json")


if __name__ == "__main__":
    main()
