"""The CLI's hot paths (issue 14, item 2): wall time of each call as a fresh process.

Needs root, QEMU, the guest image and runc (as bench/run.py). Starts its own daemons, runs
one `sleep` container and, for `start` and `delete`, a fresh one per call (`start` right
after `create`, as containerd's shim calls it, and `start, init ready` 0.5 s after it, once
the guest has made the waiting init: what start costs itself). Each command is
timed RUNS times (default 20) with the lean entry point (`hanabi-runtime`, now
`hanabi_runtime.lean:main`) and with the full typer CLI (`hanabi_runtime.cli:main`, what the
console script ran before), in the same run, against `runc state` on a runc container of the
same bundle. Reports medians in ms, full/lean ratios and lean/runc-state ratios; writes
bench/results/cli.json. Not part of the test suite.

Measured here (2-core TCG machine shared with three other QEMU users, load average 3.0),
2026-12-01 10:47 UTC, medians of 20, a wheel install (`pip install .`, as deploy/install.sh
does; an editable install adds ~13 ms of site-packages start-up to every call), guest
image built from this branch:

    command            full ms  lean ms  full/lean  lean/runc-state
    state                342.5     37.8       9.06              4.9
    ps                   348.1     34.4      10.12              4.5
    ps --format json     262.4     28.3       9.27              3.7
    events --stats       353.3     46.5       7.60              6.0
    kill                 353.7     36.1       9.80              4.7
    pause                402.0     49.3       8.15              6.4
    resume               403.2     54.3       7.43              7.1
    start                387.7    157.8       2.46             20.5
    delete --force       655.7    464.8       1.41             60.4
    runc state: 7.7 ms; `python -c pass`: 12.9 ms

`start` and `delete` are the daemons' time now (agentd starting the process in the guest;
the five teardown calls, `vm.stop` first among them: issue 14, item 3).

Since teardown left the critical path (issue 14, item 3: one release call per daemon, the VM
SIGKILLed, the rest finished by the daemons after `delete` returned) `delete` is on the lean
path too. 2026-12-01 12:25 UTC, medians of 10, editable install, the host far busier (load
average 7.8: `python -c pass` 142.8 ms, `runc state` 10.2 ms):

    command            full ms  lean ms  full/lean  lean/runc-state
    state                1351.4    181.1       7.46             17.8
    kill                 1388.1    178.4       7.78             17.5
    start                1182.4    473.8        2.5             46.5
    delete --force       1043.9    250.7       4.16             24.6

`delete --force` of a running container now costs 1.38 `state` calls (was 12.3 in the 10:47
run): about 108 ms above the interpreter's start-up here against 38 ms for `state`, the VMM's
SIGKILL and reaping (vm.release, 9-26 ms on a quieter host) the largest part.

2026-12-01 15:38 UTC, medians of 10, editable install with the sources byte-compiled first
(`bench.run.prepare`: the runs above had no .pyc files where PYTHONDONTWRITEBYTECODE=1 was
set, so each call compiled its modules, 70+ ms), guest image of the `fastpath` branch, load
average 3.6 (5.8 at the start):

    command            full ms  lean ms  full/lean  lean/runc-state
    state                353.8     38.4       9.21              5.5
    ps                   364.7     44.2       8.25              6.3
    ps --format json     251.2     40.4       6.22              5.8
    events --stats       378.8     42.3       8.96              6.0
    kill                 352.0     42.5       8.28              6.1
    pause                386.0     44.8       8.62              6.4
    resume               422.9     46.7       9.06              6.7
    start                596.8    320.1       1.86             45.7
    delete --force       445.2    143.8        3.1             20.5
    runc state: 7.0 ms; `python -c pass`: 29.2 ms

`delete --force` of a running container had taken 5.19 s lean (the same morning's code,
load 1.9): agentd's flush request was named `sync`, the name of the SYNC marker's
pseudo-message, so the guest took it for a marker and never answered, and agentd waited
its 5 s bound every time. `start` is the guest's work (agentd's container.start: 170-240 ms
of forking and setting up the process under TCG).

`start` no longer waits for the exec (it replies once the held init is past its wait, as
`runc start` returns once its init wrote the exec fifo); the lean `delete` imports neither
logging, dataclasses (hanabi_runtime.pod), shutil, signal nor pathlib; vmmd, blockd and netd
wake their release worker once the reply is sent (rpc.context.after_reply: the worker's
Python held the GIL the reply needed); vmmd waits for the killed QEMU on its pidfd, not with
Popen.wait's doubling sleep. 2026-12-01 21:26 UTC, medians of 10, editable install
byte-compiled, guest image of the `startdel` branch, load average 1.5-1.6 (`python -c pass`
17.7 ms, against 11.3 on the quiet host):

    command            full ms  lean ms  full/lean  lean/runc-state
    state                443.1     32.2      13.76              4.7
    ps                   389.8     38.6       10.1              5.6
    ps --format json     306.3     33.9       9.04              4.9
    events --stats       460.3     43.7      10.53              6.3
    kill                 427.0     42.1      10.14              6.1
    pause                457.3     41.8      10.94              6.1
    resume               457.3     40.7      11.24              5.9
    start                469.9    169.4       2.77             24.6
    delete --force       419.3     67.7       6.19              9.8
    start, init ready    402.8     66.2       6.08              9.6
    runc state: 6.9 ms; `python -c pass`: 17.7 ms

(A run at 21:19, load 1.0-1.7, `python -c pass` 14.5 ms, all but the pidfd wait: `state`
25.5, `start` 149.6, `delete --force` 55.0, `start, init ready` 51.0.) The branch's base
(30130ba, its own venv and guest image) and the branch side by side, their own daemons at
once, each call alternated, lean CLI: medians of 20 at load 1.35, `start` right after
`create` 151.9 -> 84.8 ms, `delete --force` of the running container 85.9 -> 59.5, `state`
36.3 / 34.5, `create` 467.6 / 470.1; 0.5 s after create (medians of 12, load 1.25) `start`
124.0 -> 73.4, `delete --force` 122.2 -> 70.0, `state` 40.0 / 41.0. agentd's container.start
alone from a warm client, init ready: 93.1 -> 33.8 ms (load 4.0), 75.7 -> 34.5 (3.2); the
guest's own handling of start (`hanabi.trace=1`) 50-80 -> 10-25 ms. Per delete, in the CLI
(load 1.5): the release calls 30 -> 20-22 ms once the workers woke after the replies
(volume.release 5.2 -> 2.0-2.4 ms, net.detach 3.0 -> 2.0-2.3), the code before them 13-17
-> 1.4-1.6 ms.
What is left above 50 ms:
- `start` right after `create` waits for the guest to make the container's init, which it
  begins when create has replied: fork of the agent 30-38 ms, then in the child its cgroup
  joined 15-48 ms, its mount namespace 23-38, hardening (masked and read-only paths,
  sysctls) 24-40, the rootfs entered 15-30, the program looked up over the 9P share 13-20
  (6 stats along $PATH), capabilities and user ~10: about 200 ms of the one vCPU, first-time
  code for the clone under TCG, of which create's own remainder and start's start-up hide
  80-100 ms. Moving that setup before create's reply (as runc's create does) would bring
  `start` to the `init ready` figure and make `create`, `run` and `docker run` slower by
  about as much.
- `start, init ready`: the CLI's start-up (`state` minus its RPC, ~24 ms on the quiet host),
  agentd's relay and its fsynced agent.json (2-7 ms), the guest's reply 10-25 ms.
- `delete --force`: the CLI's start-up plus the four release calls, 20-22 ms together at
  load 1.5: agentd 5-10 (the guest's sync 3-9), vmmd 9-12 (SIGKILL and reap: QEMU's exit
  takes 4-8), blockd and netd ~2 each (about 1 ms of that the connection and envelope).
  Folding blockd's and netd's calls into vmmd's would save about 2 ms at the price of vmmd
  calling both; netd's call beside agentd's (in parallel) would have its worker remove the
  taps under a QEMU still flushing; blockd's cannot come before the VM is dead.
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

from bench.run import load_average, prepare  # noqa: E402
from hanabi_runtime.demo_bundle import make_bundle  # noqa: E402
from tests.helpers.hanabi import BIN, integration_skip_reason, start_daemons  # noqa: E402

RUNS = int(os.environ.get("HANABI_BENCH_RUNS", "20"))
FULL = [sys.executable, "-c", "import sys; sys.argv[0] = 'hanabi-runtime'; "
        "from hanabi_runtime.cli import main; main()"]
LEAN = [str(BIN / "hanabi-runtime")]
READY_PAUSE_S = 0.5  # "start, init ready": from create's return (the init takes ~0.2 s under TCG)


def timed(argv: list[str], ok: bool = True) -> float:
    """Seconds one call took (stdio to /dev/null, as the shim's files)."""
    started = time.perf_counter()
    done = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    elapsed = time.perf_counter() - started
    if ok and done.returncode != 0:
        raise RuntimeError(f"{argv} failed: {done.stderr.decode()[-500:]}")
    return elapsed


def ms(values: list[float]) -> float:
    return round(statistics.median(values) * 1000, 1)


def main() -> None:
    reason = integration_skip_reason()
    if reason or not shutil.which("runc"):
        sys.exit(f"cannot benchmark here: {reason or 'runc is not installed'}")
    prepare()
    load_at_start = load_average()
    work = Path(tempfile.mkdtemp(prefix="hanabi-bench-cli-"))
    bundle = make_bundle(work / "bundle", ["sleep", "600"])
    daemons = start_daemons(work / "hanabi")
    cfg = ["--config", str(daemons.config_path)]
    times: dict[str, dict[str, list[float]]] = {}

    def record(command: str, entry: str, seconds: float) -> None:
        times.setdefault(command, {}).setdefault(entry, []).append(seconds)

    def create(cid: str) -> None:
        with tempfile.TemporaryFile() as err:  # not a pipe: the stand-in keeps create's stdio
            done = subprocess.run(LEAN + cfg + ["create", "--bundle", str(bundle), cid],
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
            err.seek(0)
            if done.returncode != 0:
                raise RuntimeError(f"create {cid} failed: {err.read().decode()[-800:]}")

    runc_state, floor = [], []
    try:
        subprocess.run(["runc", "create", "--bundle", str(bundle), "bench-cli-runc"], check=True,
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        create("bench-cli")
        subprocess.run(LEAN + cfg + ["start", "bench-cli"], check=True)
        for _ in range(RUNS):
            runc_state.append(timed(["runc", "state", "bench-cli-runc"]))
            floor.append(timed([sys.executable, "-c", "pass"]))
            for entry, argv in (("full", FULL + cfg), ("lean", LEAN + cfg)):
                for command in (["state"], ["ps"], ["ps", "--format", "json"], ["events", "--stats"],
                                ["kill"], ["pause"], ["resume"]):
                    args = command + ["bench-cli"] + (["CONT"] if command == ["kill"] else [])
                    record(" ".join(command), entry, timed(argv + args))
        for i in range(RUNS):
            for entry, argv in (("full", FULL + cfg), ("lean", LEAN + cfg)):
                cid = f"bench-{entry}-{i}"
                create(cid)
                record("start", entry, timed(argv + ["start", cid]))
                record("delete --force", entry, timed(argv + ["delete", "--force", cid]))
                # The same once the guest has made the waiting init (it does so after create
                # replied, while the host goes on): what start costs itself, without the wait.
                cid = f"bench-{entry}-ready-{i}"
                create(cid)
                time.sleep(READY_PAUSE_S)
                record("start, init ready", entry, timed(argv + ["start", cid]))
                subprocess.run(LEAN + cfg + ["delete", "--force", cid], capture_output=True)
    finally:
        subprocess.run(["runc", "delete", "--force", "bench-cli-runc"], capture_output=True)
        subprocess.run(LEAN + cfg + ["delete", "--force", "bench-cli"], capture_output=True)
        daemons.stop_all()
        shutil.rmtree(work, ignore_errors=True)
    runc_ms = ms(runc_state)
    report = {"runs": RUNS, "runc_state_ms": runc_ms, "python_startup_ms": ms(floor),
              "load_average": os.getloadavg(), "load_average_at_start": load_at_start,
              "commands": {}}
    for command, entries in times.items():
        full, lean = ms(entries["full"]), ms(entries["lean"])
        report["commands"][command] = {"full_ms": full, "lean_ms": lean, "full_over_lean": round(full / lean, 2),
                                       "lean_over_runc_state": round(lean / runc_ms, 1)}
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "cli.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'command':<18}{'full ms':>9}{'lean ms':>9}{'full/lean':>11}{'lean/runc-state':>17}")
    for command, row in report["commands"].items():
        print(f"{command:<18}{row['full_ms']:>9}{row['lean_ms']:>9}{row['full_over_lean']:>11}"
              f"{row['lean_over_runc_state']:>17}")
    print(f"runc state: {runc_ms} ms; `python -c pass`: {report['python_startup_ms']} ms; "
          f"load average {report['load_average'][0]:.1f}")


if __name__ == "__main__":
    main()
