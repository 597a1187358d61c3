"""`exec`: one more process in a running container, with a stand-in of its own.

Each exec gets an id, a process spec (from `--process FILE` as containerd's shim passes it,
or from the command line), and a stand-in that relays its stdio and exits with its status;
the stand-in's pid goes to `--pid-file`, as runc does. Each exec is recorded in its own
state file (`exec-<id>.json`), so concurrent execs never rewrite each other's records.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

from hanabi_common.errors import InvalidArgument, NotFound
from hanabi_common.state import VersionedState

EXEC_PREFIX = "exec-"


class ExecRecord(VersionedState):
    """One exec'd process and its stand-in."""

    exec_id: str
    args: list[str]
    standin_pid: int
    standin_start_time: int | None = None


def new_exec_id() -> str:
    """A fresh exec id."""
    return "x" + uuid.uuid4().hex[:15]


def load_process(process_file: str | None, args: list[str], *, cwd: str | None, env: list[str],
                 user: str | None, tty: bool, base: dict) -> dict:
    """The exec's OCI process: the file's if given, else `base` (the container's) with overrides."""
    from hanabi_common.oci import validate_config
    from hanabi_runtime.bundle import check_process

    if process_file:
        try:
            process = json.loads(Path(process_file).read_text())
        except FileNotFoundError:
            raise NotFound(f"process file {process_file} does not exist") from None
        except ValueError as exc:
            raise InvalidArgument(f"process file {process_file} is not valid JSON: {exc}") from None
    else:
        if not args:
            raise InvalidArgument("exec needs a command (arguments after the id) or --process")
        # As runc: the container's process is the template (its capabilities, no_new_privs,
        # LSM labels and limits included), then the command line's overrides.
        process = {key: base[key] for key in ("env", "cwd", "user", "rlimits", "capabilities", "noNewPrivileges",
                                              "apparmorProfile", "selinuxLabel", "oomScoreAdj") if key in base}
        process["args"] = list(args)
        process["terminal"] = tty
        if cwd:
            process["cwd"] = cwd
        if env:
            process["env"] = list(process.get("env", [])) + list(env)
        if user:
            process["user"] = parse_user(user)
        process.setdefault("cwd", "/")
        process.setdefault("user", {"uid": 0, "gid": 0})
    validate_config({"ociVersion": "1.0.2", "process": process}, "exec process")
    check_process(process)
    return process


def parse_user(value: str) -> dict:
    """`uid[:gid]` as runc's --user takes it."""
    uid, _, gid = value.partition(":")
    try:
        return {"uid": int(uid), "gid": int(gid or 0)}
    except ValueError:
        raise InvalidArgument(f"--user {value!r} must be uid[:gid] with numbers") from None


def run_exec(runtime, cid: str, process: dict, pid_file: str | None, detach: bool,
             console_socket: str | None = None) -> int:
    """Start `process` in container `cid`; detached: return 0 once the stand-in runs,
    else wait and return the process's status. With a terminal, the pty master goes to
    `console_socket` (detached, as containerd's shim asks) or our own tty is used."""
    from hanabi_common.errors import FailedPrecondition
    from hanabi_runtime import console
    from hanabi_runtime.state import process_start_time, write_pid_file

    console_args = console.standin_args(bool(process.get("terminal")), console_socket, detach)
    state = runtime.load(cid)
    status = runtime.status(state)
    if status != "running":
        raise FailedPrecondition(f"cannot exec in container {cid}: it is {status}, not running")
    exec_id = new_exec_id()
    terminal = console.save_terminal(0)
    runtime.daemons.agentd.exec(state.vm_id, cid, exec_id, process)
    standin = runtime.spawn_standin(cid, None, detach, exec_id=exec_id, console=console_args,
                                    args=process["args"], sandbox=state.sandbox)
    if state.cgroups:
        from hanabi_runtime.cgroups import join
        join(state.cgroups, standin.pid)
    runtime.store.write(cid, f"{EXEC_PREFIX}{exec_id}", ExecRecord(
        exec_id=exec_id, args=list(process.get("args", [])), standin_pid=standin.pid,
        standin_start_time=process_start_time(standin.pid)))
    if pid_file:
        write_pid_file(pid_file, standin.pid)
    if detach:
        return 0
    try:
        code = standin.wait()
    finally:
        console.restore(0, terminal)
    return 128 - code if code < 0 else code
