"""Network benchmarks (issue 4): the tap + tc path against two plain namespaces, same run.

Needs root, QEMU, the guest image and busybox on the host. Starts its own daemons. The
"container" sits in a test-made namespace joined by a veth pair to a peer namespace
(traffic never leaves them). Measured, each for a hanabi container and for a plain
process in the same namespace (what runc gives):
- TCP throughput container -> peer: busybox `dd | nc` sending PAYLOAD_MIB, a Python
  receiver in the peer namespace timing first byte to EOF;
- round-trip latency: busybox `ping -c PINGS`, the average;
- the time netd's `attach` takes on such a namespace (median of ATTACH_RUNS).
Ratios are hanabi / plain. Writes bench/results/network.json.
"""

from __future__ import annotations

import json
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

from bench.run import publish  # noqa: E402
from hanabi_runtime.demo_bundle import make_bundle  # noqa: E402
from tests.helpers.hanabi import integration_skip_reason, start_daemons  # noqa: E402
from tests.helpers.netns import netns_pair  # noqa: E402

PAYLOAD_MIB = 32
PINGS = 20
ATTACH_RUNS = 20
PORT = 5201
RTT = re.compile(r"min/avg/max = [\d.]+/([\d.]+)/")


class Receiver:
    """A TCP sink in the peer namespace: bytes received and seconds from first byte to EOF."""

    def __init__(self, netns: str, address: str) -> None:
        code = ("import socket, sys, time\n"
                "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
                f"s.bind(({address!r}, {PORT})); s.listen(1); print('ready', flush=True)\n"
                "c, _ = s.accept(); n = 0; first = None\n"
                "while True:\n"
                "    d = c.recv(1 << 20)\n"
                "    if not d: break\n"
                "    first = first or time.monotonic(); n += len(d)\n"
                "print(n, time.monotonic() - (first or time.monotonic()), flush=True); c.close()\n")
        self.proc = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-c", code],
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "ready"

    def result(self) -> tuple[int, float]:
        line = self.proc.stdout.readline().split()
        self.proc.wait(30)
        return int(line[0]), float(line[1])


def sender_script(peer: str) -> str:
    return f"dd if=/dev/zero bs=65536 count={PAYLOAD_MIB * 16} 2>/dev/null | nc {peer} {PORT}"


def ping_script(peer: str) -> str:
    return f"ping -c {PINGS} -i 0.2 {peer}"


def plain(pair, script: str) -> str:
    """Run a busybox shell script in the inner namespace directly (the runc baseline)."""
    busybox = shutil.which("busybox")
    done = subprocess.run(["ip", "netns", "exec", pair.inner, busybox, "sh", "-c", script.replace(
        "nc ", f"{busybox} nc ").replace("ping ", f"{busybox} ping ")], capture_output=True, text=True, timeout=300)
    return done.stdout


def in_vm(daemons, work: Path, pair, script: str, name: str) -> str:
    bundle = make_bundle(work / name, ["sh", "-c", script])
    config = json.loads((bundle / "config.json").read_text())
    config["linux"]["namespaces"] = [ns for ns in config["linux"]["namespaces"] if ns["type"] != "network"] + [
        {"type": "network", "path": pair.inner_path}]
    (bundle / "config.json").write_text(json.dumps(config))
    done = daemons.runtime("run", "--bundle", str(bundle), name, timeout=600)
    return done.stdout.decode()


def throughput(run, pair) -> float:
    """MiB/s of one transfer made by `run(script)`."""
    receiver = Receiver(pair.outer, pair.outer_ip)
    run(sender_script(pair.outer_ip))
    received, seconds = receiver.result()
    return round(received / (1 << 20) / max(seconds, 1e-6), 1)


def latency(run, pair) -> float:
    """Average ping round trip (ms) from `run(script)` to the peer."""
    match = RTT.search(run(ping_script(pair.outer_ip)))
    return float(match.group(1)) if match else float("nan")


def attach_times(daemons, pair) -> list[float]:
    """Seconds each net.attach of the pair's inner namespace took."""
    from hanabi_netd.client import NetdClient

    client = NetdClient(daemons.config)
    times = []
    for index in range(ATTACH_RUNS):
        began = time.monotonic()
        client.attach(f"bench-attach-{index}", pair.inner_path)
        times.append(time.monotonic() - began)
        client.detach(f"bench-attach-{index}")
    return times


def main() -> None:
    reason = integration_skip_reason()
    if reason or not shutil.which("busybox"):
        sys.exit(f"cannot benchmark here: {reason or 'busybox is not installed'}")
    work = Path(tempfile.mkdtemp(prefix="hanabi-bench-net-"))
    daemons = start_daemons(work / "hanabi")
    pair = netns_pair()
    try:
        runs = iter(range(1000))
        vm = lambda script: in_vm(daemons, work, pair, script, f"net{next(runs)}")  # noqa: E731
        direct = lambda script: plain(pair, script)  # noqa: E731
        report_raw = {"plain_mib_s": throughput(direct, pair), "hanabi_mib_s": throughput(vm, pair),
                      "plain_rtt_ms": latency(direct, pair), "hanabi_rtt_ms": latency(vm, pair),
                      "attach_s": attach_times(daemons, pair)}
    finally:
        pair.destroy()
        daemons.stop_all()
        shutil.rmtree(work, ignore_errors=True)
    report = {
        "payload_mib": PAYLOAD_MIB,
        "throughput_container_to_peer_mib_s": {"plain_netns": report_raw["plain_mib_s"],
                                               "hanabi": report_raw["hanabi_mib_s"]},
        "ratio_throughput_hanabi_vs_plain": round(report_raw["hanabi_mib_s"] / report_raw["plain_mib_s"], 3),
        "rtt_avg_ms": {"plain_netns": report_raw["plain_rtt_ms"], "hanabi": report_raw["hanabi_rtt_ms"]},
        "ratio_rtt_hanabi_vs_plain": round(report_raw["hanabi_rtt_ms"] / report_raw["plain_rtt_ms"], 1),
        "netd_attach_median_ms": round(statistics.median(report_raw["attach_s"]) * 1000, 2),
        "netd_attach_runs": ATTACH_RUNS,
    }
    publish(report, "network.json")


if __name__ == "__main__":
    main()
