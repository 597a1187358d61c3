"""What enforcing the security settings in the guest costs at create (issue 11's budget:
`container_create_s` within +20 %), measured in one run with the same daemons.

Three bundles, each created and deleted `HANABI_BENCH_RUNS` times (default 10), interleaved:
- `plain`: runc's spec capabilities, no seccomp (what create did before the guest enforced
  anything beyond capabilities);
- `docker`: a profile of Docker's shape (defaultAction SCMP_ACT_ERRNO, one allow rule with
  every syscall name of this architecture, ~360 names, as moby's default lists), Docker's
  default capability set and noNewPrivileges;
- `privileged`: every capability, no seccomp.
Reports the medians of the runtime's own `container_create_s` phase (the guest's part) and
of the whole `create`, and the ratios against `plain`. Writes bench/results/security.json.

    .venv/bin/python bench/security.py
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.run import median, publish  # noqa: E402
from hanabi_runtime.demo_bundle import make_bundle  # noqa: E402
from tests.helpers.hanabi import BIN, integration_skip_reason, start_daemons  # noqa: E402

RUNS = int(os.environ.get("HANABI_BENCH_RUNS", "10"))
UNISTD = Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h")
DOCKER_CAPS = ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
               "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
               "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE"]
ALL_CAPS = DOCKER_CAPS + ["CAP_DAC_READ_SEARCH", "CAP_LINUX_IMMUTABLE", "CAP_NET_BROADCAST", "CAP_NET_ADMIN",
                          "CAP_IPC_LOCK", "CAP_IPC_OWNER", "CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_PTRACE",
                          "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE", "CAP_SYS_RESOURCE",
                          "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_LEASE", "CAP_AUDIT_CONTROL", "CAP_MAC_OVERRIDE",
                          "CAP_MAC_ADMIN", "CAP_SYSLOG", "CAP_WAKE_ALARM", "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ",
                          "CAP_PERFMON", "CAP_BPF", "CAP_CHECKPOINT_RESTORE"]


def syscall_names() -> list[str]:
    """Every syscall name of x86_64 (from the kernel headers libc6-dev installs)."""
    return sorted(set(re.findall(r"^#define __NR_(\w+)\s+\d+", UNISTD.read_text(), re.M)))


def caps(names: list[str]) -> dict[str, list[str]]:
    return {kind: list(names) for kind in ("bounding", "effective", "permitted")}


def bundles(base: Path) -> dict[str, Path]:
    made = {}
    for name in ("plain", "docker", "privileged"):
        bundle = make_bundle(base / name, ["true"])
        config = json.loads((bundle / "config.json").read_text())
        if name == "docker":
            config["process"]["capabilities"] = caps(DOCKER_CAPS)
            config["process"]["noNewPrivileges"] = True
            config["linux"]["seccomp"] = {
                "defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 1,
                "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
                "syscalls": [{"names": syscall_names(), "action": "SCMP_ACT_ALLOW"}]}
        elif name == "privileged":
            config["process"]["capabilities"] = caps(ALL_CAPS)
        (bundle / "config.json").write_text(json.dumps(config))
        made[name] = bundle
    return made


def create_and_delete(runtime: list[str], daemons, bundle: Path, cid: str) -> tuple[float, float]:
    """(container_create_s as the runtime recorded it, the whole create's wall time)."""
    began = time.perf_counter()
    subprocess.run(runtime + ["create", "--bundle", str(bundle), cid], check=True,
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - began
    state = json.loads((daemons.config.sandboxes_dir / cid / "state.json").read_text())
    subprocess.run(runtime + ["delete", "--force", cid], check=True, capture_output=True)
    return state["timings"]["container_create_s"], wall


def main() -> None:
    reason = integration_skip_reason()
    if reason or not UNISTD.exists():
        sys.exit(f"cannot run: {reason or f'{UNISTD} is missing (apt install libc6-dev)'}")
    base = Path(tempfile.mkdtemp(prefix="hanabi-bench-sec-"))
    daemons = start_daemons(base / "hanabi")
    try:
        runtime = [str(BIN / "hanabi-runtime"), "--config", str(daemons.config_path)]
        made = bundles(base / "bundles")
        create_and_delete(runtime, daemons, made["plain"], "bench-sec-warmup")  # the template
        samples: dict[str, dict[str, list[float]]] = {n: {"container_create_s": [], "create_s": []} for n in made}
        for i in range(RUNS):
            for name, bundle in made.items():
                guest, wall = create_and_delete(runtime, daemons, bundle, f"bench-sec-{name}-{i}")
                samples[name]["container_create_s"].append(guest)
                samples[name]["create_s"].append(wall)
    finally:
        daemons.stop_all()
    medians = {n: {k: median(v) for k, v in s.items()} for n, s in samples.items()}
    report = {
        "runs": RUNS,
        "seccomp_rule_names": len(syscall_names()),
        "medians_s": medians,
        "ratio_vs_plain": {n: {k: round(m[k] / medians["plain"][k], 3) for k in m} for n, m in medians.items()},
    }
    publish(report, "security.json")


if __name__ == "__main__":
    main()
