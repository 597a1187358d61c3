"""`make install` / `make uninstall` under a real systemd: a Debian 12 machine in systemd-nspawn.

The rootfs is made once by debootstrap and cached (tests/helpers/nspawn.py); each run boots a
fresh overlay over it. The project is copied to a temp dir, its wheel and pinned dependencies
are built on the host (`pip wheel`), and both are bound read-only into the machine, where
`make -C /src install WHEELHOUSE=/wheels` installs offline. Then: `systemd-analyze verify`,
the five Type=notify units (four daemons and the zygote) reach `active` only through READY=1, come back after kill -9, stop
cleanly with hanabi.target, their JSON log lines are in the journal, and `make uninstall`
leaves /etc, /opt and /usr/local exactly as they were before the install.
The daemons run no VM here (no guest image, no KVM in the machine): starting them is the point.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.helpers import nspawn
from tests.helpers.hanabi import processes_mentioning

pytestmark = pytest.mark.system

ROOT = Path(__file__).resolve().parents[2]
DAEMONS = ("vmmd", "netd", "blockd", "agentd", "zygote")
UNITS = [f"hanabi-{d}.service" for d in DAEMONS]
# What each says with READY=1: the RPC daemons their ZeroMQ endpoint, the zygote its socket.
SERVING = {**{d: f"serving on ipc:///run/hanabi/{d}.sock" for d in DAEMONS}, "zygote": "serving on /run/hanabi/zygote.sock"}
UNIT_FILES = ["/etc/systemd/system/hanabi.target", *[f"/etc/systemd/system/{u}" for u in UNITS]]
SNAPSHOT_DIRS = ("/etc", "/opt", "/usr/local")
COPY_IGNORE = shutil.ignore_patterns(".venv", ".git", ".tox", "build", "dist", "*.egg-info", "__pycache__",
                                     ".pytest_cache", "results")
WAIT_S = 30.0

# What a file tree looks like, printed by Python inside the machine: path, kind, mode, target/hash.
SNAPSHOT = r"""
import hashlib, json, os, stat, sys
out = {}
for top in sys.argv[1:]:
    for dirpath, dirs, files in os.walk(top):
        for name in dirs + files:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                what = "link " + os.readlink(path)
            elif stat.S_ISREG(st.st_mode):
                what = "file " + hashlib.sha256(open(path, "rb").read()).hexdigest()
            else:
                what = "dir" if stat.S_ISDIR(st.st_mode) else "other"
            out[path] = f"{oct(st.st_mode)} {what}"
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def machine(tmp_path_factory):
    """A booted machine with the project at /src and its wheels at /wheels (read-only)."""
    reason = nspawn.skip_reason()
    if reason:
        pytest.skip(reason)
    work = tmp_path_factory.mktemp("systemd")
    timings = {}
    started = time.monotonic()
    rootfs, timings["debootstrap_s"] = nspawn.ensure_rootfs(work / "debootstrap.log")
    src = work / "src"
    shutil.copytree(ROOT, src, ignore=COPY_IGNORE, symlinks=True)
    wheels = work / "wheels"
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check", "-w",
                           str(wheels), str(src)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"pip wheel failed: {done.stderr[-3000:]}"
    timings["wheels_s"] = time.monotonic() - t0
    box = nspawn.Machine(rootfs=rootfs, base=Path(tempfile.mkdtemp(prefix="hanabi-nspawn-", dir="/tmp")),
                         name=f"hanabi-test-{hashlib.sha256(str(work).encode()).hexdigest()[:8]}",
                         binds=[(src, "/src"), (wheels, "/wheels")])
    try:
        timings["boot_s"] = box.boot()
        box.timings = timings
        box.setup_s = time.monotonic() - started
        yield box
    finally:
        box.close()


@pytest.fixture(scope="module")
def installed(machine):
    """`make install` done in the machine; the snapshot of /etc, /opt, /usr/local taken before it."""
    machine.before = snapshot(machine)
    t0 = time.monotonic()
    out = machine.run("make", "-C", "/src", "install", "WHEELHOUSE=/wheels", timeout=600)
    machine.timings["make_install_s"] = time.monotonic() - t0
    machine.install_output = out.stdout
    print(f"\ntimings: {json.dumps({k: round(v, 1) for k, v in machine.timings.items()})}")
    return machine


def snapshot(box: nspawn.Machine) -> dict[str, str]:
    return json.loads(box.run("python3", "-c", SNAPSHOT, *SNAPSHOT_DIRS).stdout)


def show(box: nspawn.Machine, unit: str) -> dict[str, str]:
    props = "ActiveState,SubState,MainPID,NRestarts,StatusText,Type,Result,ExecMainCode,ExecMainStatus,NotifyAccess"
    out = box.run("systemctl", "show", "-p", props, unit).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def wait_for(box: nspawn.Machine, unit: str, ok, what: str) -> dict[str, str]:
    """Poll `systemctl show` until ok(props); fail with the last props and journal after WAIT_S."""
    deadline = time.monotonic() + WAIT_S
    while True:
        props = show(box, unit)
        if ok(props):
            return props
        if time.monotonic() > deadline:
            journal = box.run("journalctl", "-u", unit, "--no-pager", "-n", "30", check=False).stdout
            raise AssertionError(f"{unit} not {what} within {WAIT_S:.0f} s: {props}\n{journal}")
        time.sleep(0.2)


def journal_json(box: nspawn.Machine, unit: str) -> list[dict]:
    """The unit's journal entries (journalctl -o json), each with its MESSAGE parsed as JSON if it is."""
    out = box.run("journalctl", "-u", unit, "-o", "json", "--no-pager").stdout
    entries = []
    for line in out.splitlines():
        entry = json.loads(line)
        message = entry.get("MESSAGE")
        if isinstance(message, list):  # journald gives non-UTF-8 messages as byte arrays
            message = bytes(message).decode(errors="replace")
        try:
            entry["json"] = json.loads(message) if isinstance(message, str) else None
        except ValueError:
            entry["json"] = None
        entries.append(entry)
    return entries


def started_all(box: nspawn.Machine) -> dict[str, dict[str, str]]:
    box.run("systemctl", "start", "hanabi.target", timeout=120)
    return {unit: show(box, unit) for unit in UNITS}


def test_units_pass_systemd_analyze_verify(installed):
    done = installed.run("systemd-analyze", "verify", *UNIT_FILES, check=False)
    assert done.returncode == 0 and not done.stderr.strip(), f"verify: {done.returncode} {done.stderr}"


def test_install_put_everything_in_place(installed):
    box = installed
    for path in [*UNIT_FILES, "/etc/hanabi/hanabi.toml", "/opt/hanabi/README.md", "/opt/hanabi/MANIFEST"]:
        box.run("test", "-f", path)
    # The default config is the commented one, and every daemon reads it.
    assert box.run("cat", "/etc/hanabi/hanabi.toml").stdout == (ROOT / "deploy" / "hanabi.toml").read_text()
    doc = json.loads(box.run("cat", "/etc/docker/daemon.json").stdout)
    assert set(doc["runtimes"]) == {"hanabi", "hanabi-qemu", "hanabi-fc"}
    assert doc["runtimes"]["hanabi"]["path"] == "/opt/hanabi/.venv/bin/hanabi-runtime"
    assert box.run("readlink", "/usr/local/bin/hanabi-runtime").stdout.strip() == "/opt/hanabi/.venv/bin/hanabi-runtime"
    assert "hanabi-runtime version" in box.run("hanabi-runtime", "version").stdout
    # Not an editable install: the venv holds the code (the source is not on its path).
    where = box.run("/opt/hanabi/.venv/bin/python", "-c", "import hanabi_common; print(hanabi_common.__file__)")
    assert where.stdout.startswith("/opt/hanabi/.venv/lib/")


def test_the_target_starts_the_five_and_each_reports_ready(installed):
    box = installed
    props = started_all(box)
    for unit, p in props.items():
        daemon = unit.split("-")[1].split(".")[0]
        assert p["Type"] == "notify" and p["ActiveState"] == "active" and p["SubState"] == "running", (unit, p)
        # STATUS= comes only from the daemon's sd_notify, sent with READY=1 once its socket is bound.
        assert p["StatusText"] == SERVING[daemon], (unit, p)
        ping = box.run(f"/opt/hanabi/.venv/bin/hanabi-{daemon}", "ctl", "--timeout", "5", "ping")
        assert ping.returncode == 0
    listed = box.run("systemctl", "list-dependencies", "--plain", "--no-pager", "hanabi.target").stdout
    assert all(unit in listed for unit in UNITS), listed


def test_each_daemon_comes_back_after_kill_9(installed):
    box = installed
    before = started_all(box)
    for unit, p in before.items():
        old_pid, restarts = int(p["MainPID"]), int(p["NRestarts"])
        assert old_pid > 0, (unit, p)
        box.run("kill", "-9", str(old_pid))
        after = wait_for(box, unit, lambda q, old_pid=old_pid, restarts=restarts: q["ActiveState"] == "active"
                         and int(q["MainPID"]) not in (0, old_pid) and int(q["NRestarts"]) == restarts + 1, "restarted")
        assert after["StatusText"].startswith("serving on"), after
        daemon = unit.split("-")[1].split(".")[0]
        box.run(f"/opt/hanabi/.venv/bin/hanabi-{daemon}", "ctl", "--timeout", "5", "ping")
        log = box.run("journalctl", "-u", unit, "--no-pager", "-o", "cat").stdout
        assert "Failed with result 'signal'" in log or "code=killed, status=9/KILL" in log, log[-2000:]


def test_their_json_logs_reach_journald(installed):
    box = installed
    props = started_all(box)
    for unit, p in props.items():
        pid = p["MainPID"]
        mine = [e for e in journal_json(box, unit) if e.get("_PID") == pid]
        assert mine, f"no journal entry of {unit} from its pid {pid}"
        parsed = [e["json"] for e in mine if e["json"] is not None]
        assert len(parsed) == len(mine), f"non-JSON lines from {unit}: {[e['MESSAGE'] for e in mine if e['json'] is None]}"
        ready = [j for j in parsed if j.get("msg") == "ready"]
        assert ready and ready[-1]["level"] == "info" and ready[-1]["config"] == "/etc/hanabi/hanabi.toml", parsed
        assert all({"ts", "level", "logger", "msg"} <= set(j) for j in parsed), parsed
        assert mine[0]["SYSLOG_IDENTIFIER"] == unit.removesuffix(".service")


def test_stopping_the_target_stops_each_cleanly(installed):
    box = installed
    pids = {unit: p["MainPID"] for unit, p in started_all(box).items()}
    box.run("systemctl", "stop", "hanabi.target", timeout=120)
    for unit in UNITS:
        p = wait_for(box, unit, lambda q: q["ActiveState"] in ("inactive", "failed"), "stopped")
        # Exited by itself with 0 on SIGTERM (not killed after the stop timeout, not failed).
        assert p["ActiveState"] == "inactive" and p["Result"] == "success", (unit, p)
        entries = journal_json(box, unit)
        said = [i for i, e in enumerate(entries) if e.get("_PID") == pids[unit] and e["json"]
                and e["json"].get("msg") == "signal received, stopping" and e["json"].get("signal") == "SIGTERM"]
        assert said, f"{unit} did not log the SIGTERM: {[e['MESSAGE'] for e in entries[-10:]]}"
        systemd_said = [e["MESSAGE"] for e in entries[said[-1]:] if e.get("_PID") == "1"]
        assert any("Deactivated successfully" in m for m in systemd_said), systemd_said
        assert not any(word in m for m in systemd_said for word in ("timed out", "SIGKILL", "code=killed",
                                                                     "status=")), systemd_said
    left = box.run("ps", "-eo", "pid=,args=").stdout
    assert "/opt/hanabi" not in left, left


def test_reinstall_over_a_running_install_keeps_a_changed_config(installed):
    box = installed
    before = started_all(box)
    box.run("sh", "-c", "echo '# changed by the admin' >> /etc/hanabi/hanabi.toml")
    out = box.run("make", "-C", "/src", "install", "WHEELHOUSE=/wheels", timeout=600).stdout
    assert "keeping the config already at /etc/hanabi/hanabi.toml" in out and "started again" in out, out
    assert box.run("tail", "-n", "1", "/etc/hanabi/hanabi.toml").stdout.strip() == "# changed by the admin"
    for unit, p in before.items():  # restarted on the new venv, and ready again
        now = show(box, unit)
        assert now["ActiveState"] == "active" and now["MainPID"] != p["MainPID"], (unit, now)
    doc = json.loads(box.run("cat", "/etc/docker/daemon.json").stdout)
    assert set(doc["runtimes"]) == {"hanabi", "hanabi-qemu", "hanabi-fc"}


def test_uninstall_removes_exactly_what_install_put(installed):
    box = installed
    started_all(box)
    box.run("systemctl", "enable", "hanabi.target")
    box.run("sh", "-c", "echo '# changed by the admin' >> /etc/hanabi/hanabi.toml")
    out = box.run("make", "-C", "/src", "uninstall", timeout=300).stdout
    # A changed config is the admin's: kept, and said so; removed here by hand for the comparison.
    assert "keeping /etc/hanabi/hanabi.toml: it was changed" in out, out
    box.run("rm", "-r", "/etc/hanabi")
    for unit in UNITS:
        assert show(box, unit)["ActiveState"] == "inactive"
    assert "hanabi" not in box.run("systemctl", "list-unit-files", "--no-pager", "--no-legend").stdout
    after = snapshot(box)
    added = sorted(set(after) - set(box.before))
    removed = sorted(set(box.before) - set(after))
    changed = sorted(p for p in set(after) & set(box.before) if after[p] != box.before[p])
    assert (added, removed, changed) == ([], [], []), f"added {added} removed {removed} changed {changed}"


def test_the_machine_leaves_nothing_behind(machine):
    base, root = machine.base, machine.root
    machine.close()
    assert machine.proc.returncode is not None
    assert not processes_mentioning(str(base)) and not processes_mentioning(machine.name)
    mounted = Path("/proc/self/mountinfo").read_text()
    assert str(root) not in mounted and not base.exists()
