"""Looking at a running container: `ps`, `events --stats`, and the OCI features document.

`ps --format json` answers with host pids, as containerd's shim and `docker top` expect:
the stand-ins, which stand for the container's processes on the host. `ps` (table) shows
what the guest itself sees. Stats describe the VM as the host pays for it (the VMM's CPU
time and resident memory), with the guest's process count. `events` without --stats also
prints `{"type":"oom","id":ID}` each time the memory cgroup the shim watches runs out of
memory (the stand-in makes the guest's OOM kills that: hostoom.py).
"""

from __future__ import annotations

import os
import time

from hanabi_runtime.procs import is_same_process_alive

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def host_pids(runtime, cid: str) -> list[int]:
    """The live stand-in pids of a container: its init's, then every exec's."""
    state = runtime.load(cid)
    pairs = [(state.standin_pid, state.standin_start_time)]
    pairs += [(r.standin_pid, r.standin_start_time) for r in runtime.exec_records(cid)]
    return live_pids(pairs)


def live_pids(pairs: list[tuple[int | None, int | None]]) -> list[int]:
    """The pids of (pid, start time) pairs that still run as the recorded process."""
    return [pid for pid, start in pairs if pid and is_same_process_alive(pid, start)]


def guest_table(runtime, cid: str) -> str:
    """`ps` as the guest sees it: PID, EXEC and the command."""
    state = runtime.load(cid)
    processes = runtime.daemons.agentd.ps(state.vm_id, cid).processes
    return process_table([(p.pid, p.exec_id, p.args) for p in processes])


def process_table(processes: list[tuple[int, str | None, list[str]]]) -> str:
    """The `ps` table of (pid, exec id, args) as the guest reports them."""
    lines = [f"{'PID':>7}  {'EXEC':<18} CMD"]
    lines += [f"{pid:>7}  {exec_id or '-':<18} {' '.join(args)}" for pid, exec_id, args in processes]
    return "\n".join(lines)


def _proc_usage(pid: int) -> tuple[int, int]:
    """CPU time (ns) and resident memory (bytes) of a host process."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    cpu_ns = (int(fields[11]) + int(fields[12])) * 1_000_000_000 // CLOCK_TICKS
    rss = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
    return cpu_ns, rss


def stats(runtime, cid: str) -> dict:
    """One runc-style stats event for the container's VM."""
    state = runtime.load(cid)
    vm = runtime.daemons.vmmd.get(state.vm_id)  # a pod's containers: the pod's VM
    try:
        pids = len(runtime.daemons.agentd.ps(state.vm_id, cid).processes)
    except Exception:
        pids = 0
    return stats_event(state.id, {"pid": vm.pid, "vcpus": vm.vcpus, "memory_mib": vm.memory_mib,
                                  "state": vm.state}, pids)


def stats_event(cid: str, vm: dict, pids: int) -> dict:
    """The stats event of a VM (`vm`: its pid, vcpus, memory_mib and state) running `pids`
    guest processes."""
    try:
        cpu_ns, rss = _proc_usage(vm["pid"])
    except (OSError, IndexError, ValueError):
        cpu_ns, rss = 0, 0
    limit = vm["memory_mib"] << 20
    return {
        "type": "stats",
        "id": cid,
        "data": {
            "cpu": {"usage": {"total": cpu_ns, "kernel": 0, "user": cpu_ns}},
            "memory": {"usage": {"usage": rss, "limit": limit, "max": rss}},
            "pids": {"current": pids, "limit": 0},
            "vm": vm,
        },
        "time": time.time(),
    }


def oom_event(cid: str) -> dict:
    """runc's `events` record of an OOM of the container's memory cgroup."""
    return {"type": "oom", "id": cid}


def oom_notifier(runtime, cid: str):
    """An OOM notification of the memory cgroup the shim watches (the init's stand-in's,
    see hostoom.py), or None where there is none (a cgroup v2 host, no stand-in)."""
    from hanabi_runtime.hostoom import OomNotifier, own_memory_cgroup

    state = runtime.load(cid)
    if not live_pids([(state.standin_pid, state.standin_start_time)]):
        return None
    try:
        found = own_memory_cgroup(state.standin_pid)
        return OomNotifier(found[1]) if found is not None and found[0] == "v1" else None
    except OSError:
        return None


def features() -> dict:
    """The OCI features document (`hanabi-runtime features`)."""
    return {
        "ociVersionMin": "1.0.0",
        "ociVersionMax": "1.2.0",
        "hooks": [],
        "mountOptions": ["ro", "rw", "nosuid", "nodev", "noexec", "bind", "rbind"],
        "linux": {
            "namespaces": ["cgroup", "ipc", "mount", "network", "pid", "user", "uts"],
            "capabilities": [],
            "cgroup": {"v1": False, "v2": True, "systemd": False, "systemdUser": False},
            "seccomp": {"enabled": False},
            "apparmor": {"enabled": False},
            "selinux": {"enabled": False},
        },
        "annotations": {
            "io.github.hanabi.isolation": "microvm",
            "io.github.hanabi.hypervisors": "qemu,firecracker",
        },
    }
