"""The hot commands (state, start, kill, delete, pause, resume, ps, events) without pydantic.

Each does what `hanabi_runtime.lifecycle.Runtime` and `hanabi_runtime.cli` do for it, in
the same order, with the same messages, over the lean client: one RPC where the command
needs one. A command raises `Fallback` only before it changed anything (or when what it did
so far only read), and the full CLI then does the whole command instead: recorded
poststart/poststop hooks, a state file or reply the hand checks cannot vouch for.
"""

from __future__ import annotations

import json
import os
import time

from hanabi_common.errors import FailedPrecondition, HanabiError, NotFound, Unavailable
from hanabi_runtime.lean.ids import checked_id, wire_constants
from hanabi_runtime.lean.records import (Fallback, LeanConfig, exec_standins, load_state, read_state,
                                         write_state)
from hanabi_runtime.lean.rpc import LeanClient
from hanabi_runtime.procs import START_FIFO, is_same_process_alive, oci_document, release_standin

AGENTD_SLACK_S = 5.0  # hanabi_agentd.client.SLACK_S
BLOCKD_MIN_TIMEOUT_S = 120.0  # hanabi_blockd.client.BlockdClient
STATUSES = ("created", "running", "stopped")  # hanabi_common.models.agentd.ProcessStatus
POD_CONTAINER_TYPE = "io.kubernetes.cri.container-type"  # hanabi_runtime.pod.CONTAINER_TYPE


class Daemons:
    """Lean clients of the four daemons, with the typed clients' timeouts."""

    def __init__(self, config: LeanConfig) -> None:
        self.config = config

    def _client(self, name: str, timeout: float) -> LeanClient:
        return LeanClient(name, self.config.socket_path(name), timeout=timeout)

    @property
    def agentd(self) -> LeanClient:
        """agentd."""
        c = self.config
        return self._client("agentd", max(c.default_timeout_s, c.request_timeout_s + AGENTD_SLACK_S))

    @property
    def vmmd(self) -> LeanClient:
        """vmmd."""
        return self._client("vmmd", self.config.default_timeout_s)

    @property
    def netd(self) -> LeanClient:
        """netd."""
        return self._client("netd", self.config.default_timeout_s)

    @property
    def blockd(self) -> LeanClient:
        """blockd."""
        return self._client("blockd", max(self.config.default_timeout_s, BLOCKD_MIN_TIMEOUT_S))


def _ref(state: dict) -> dict:
    """The container's reference for agentd: in its pod's VM (`sandbox`) or its own."""
    return {"sandbox_id": state["sandbox"] or state["id"], "container_id": state["id"]}


def _load(config: LeanConfig, cid: str) -> dict:
    return load_state(config, checked_id(cid))


def status(daemons: Daemons, state: dict) -> str:
    """Runtime.status: creating, created, running, paused or stopped."""
    if state["standin_pid"] is None:
        return "creating"
    alive = is_same_process_alive(state["standin_pid"], state["standin_start_time"])
    if not state["started"]:
        return "created" if alive else "stopped"
    try:
        reply = daemons.agentd.call("container.state", _ref(state), idempotent=True)
    except (Unavailable, NotFound):
        current = "running" if alive else "stopped"
    else:
        got = reply.get("status")
        if not isinstance(got, str) or got not in STATUSES:
            raise Fallback()  # a malformed reply: the typed client names what is wrong
        current = got
    return "paused" if current == "running" and state["paused"] else current


def _refuse_hooks(state: dict | None, phase: str) -> None:
    if state is not None and state["hooks"].get(phase):
        raise Fallback()  # hooks run through hanabi_runtime.hooks, by the full CLI


def cmd_state(config: LeanConfig, args: dict) -> int:
    """`state ID`."""
    daemons = Daemons(config)
    state = _load(config, args["id"])
    print(json.dumps(oci_document(state, status(daemons, state)), indent=2))
    return 0


def cmd_start(config: LeanConfig, args: dict) -> int:
    """`start ID`: Runtime.start."""
    cid = args["id"]
    daemons = Daemons(config)
    state = _load(config, cid)
    _refuse_hooks(state, "poststart")
    current = status(daemons, state)
    if current != "created":
        raise FailedPrecondition(f"container {cid} is {current}, not created: cannot start it")
    daemons.agentd.call("container.start", _ref(state))
    write_state(config, cid, dict(state, started=True))
    release_standin(os.path.join(config.sandboxes_dir, cid, START_FIFO), cid)
    return 0


def cmd_kill(config: LeanConfig, args: dict) -> int:
    """`kill ID [SIGNAL] [--all]`: Runtime.kill."""
    from hanabi_runtime.signals import parse_signal

    cid = args["id"]
    signum = parse_signal(args.get("signal", "SIGTERM"))
    daemons = Daemons(config)
    state = _load(config, cid)
    body = dict(_ref(state), exec_id=wire_constants().INIT_EXEC_ID, signal=signum, all=bool(args.get("all")))
    if state["started"] and not state["paused"] and not body["all"] and state["standin_pid"] is not None:
        # One RPC: agentd refuses to signal a stopped process itself; only then is the
        # status asked, for today's words (an agentd that is down: its own error).
        try:
            daemons.agentd.call("container.signal", body)
            return 0
        except HanabiError as exc:
            current = status(daemons, state)
            if current == "running":
                raise exc from None
            if current == "created":
                os.kill(state["standin_pid"], signum)
                return 0
            raise FailedPrecondition(f"container {cid} is {current} (container not running): "
                                     "cannot send it a signal") from None
    current = status(daemons, state)
    if current == "created":
        os.kill(state["standin_pid"], signum)
        return 0
    if current == "stopped" and body["all"]:
        return 0  # Runtime.kill: as runc, none of its processes is left to signal
    if current != "running":
        raise FailedPrecondition(f"container {cid} is {current} (container not running): cannot send it a signal")
    daemons.agentd.call("container.signal", body)
    return 0


def _pause_or_resume(config: LeanConfig, cid: str, want: str, method: str, paused: bool, verb: str) -> int:
    daemons = Daemons(config)
    state = _load(config, cid)
    current = status(daemons, state)
    if current != want:
        raise FailedPrecondition(f"container {cid} is {current}, not {want}: cannot {verb} it")
    if state["sandbox"] is not None:
        raise Fallback()  # Runtime.pause/resume word the refusal for a pod's container
    daemons.vmmd.call(method, {"sandbox_id": cid}, idempotent=True)
    write_state(config, cid, dict(state, paused=paused))
    return 0


def cmd_pause(config: LeanConfig, args: dict) -> int:
    """`pause ID`: Runtime.pause."""
    return _pause_or_resume(config, args["id"], "running", "vm.pause", True, "pause")


def cmd_resume(config: LeanConfig, args: dict) -> int:
    """`resume ID`: Runtime.resume."""
    return _pause_or_resume(config, args["id"], "paused", "vm.resume", False, "resume")


def cmd_ps(config: LeanConfig, args: dict) -> int:
    """`ps ID [--format table|json]`: observe.host_pids or observe.guest_table."""
    from hanabi_runtime import observe

    cid = args["id"]
    state = _load(config, cid)
    if args.get("format", "table") == "json":
        pairs = [(state["standin_pid"], state["standin_start_time"])] + exec_standins(config, cid)
        print(json.dumps(observe.live_pids(pairs)))
        return 0
    print(observe.process_table(_guest_processes(Daemons(config), state)))
    return 0


def _guest_processes(daemons: Daemons, state: dict) -> list:
    reply = daemons.agentd.call("container.ps", _ref(state), idempotent=True)
    processes = reply.get("processes")
    if not isinstance(processes, list):
        raise Fallback()
    rows = []
    for p in processes:
        if not (isinstance(p, dict) and isinstance(p.get("pid"), int) and isinstance(p.get("args", []), list)
                and isinstance(p.get("exec_id"), (str, type(None)))):
            raise Fallback()
        rows.append((p["pid"], p.get("exec_id"), p.get("args", [])))
    return rows


def cmd_events(config: LeanConfig, args: dict) -> int:
    """`events ID --stats`: one observe.stats event (the stream, with oom events: the full CLI)."""
    from hanabi_runtime import observe

    cid = args["id"]
    if not args.get("stats"):
        raise Fallback()  # the stream with its oom events: the full CLI
    try:
        interval = float(args.get("interval", 5.0))
    except ValueError:
        raise Fallback() from None
    daemons = Daemons(config)
    while True:
        state = _load(config, cid)
        vm = daemons.vmmd.call("vm.get", {"sandbox_id": state["sandbox"] or cid}, idempotent=True)
        fields = {k: vm.get(k) for k in ("pid", "vcpus", "memory_mib", "state")}
        if not all(isinstance(fields[k], int) for k in ("pid", "vcpus", "memory_mib")) \
                or not isinstance(fields["state"], str):
            raise Fallback()
        try:
            pids = len(_guest_processes(daemons, state))
        except Exception:
            pids = 0
        print(json.dumps(observe.stats_event(state["id"], fields, pids)), flush=True)
        if args.get("stats") or status(daemons, _load(config, cid)) == "stopped":
            return 0
        time.sleep(max(interval, 0.1))


def cmd_delete(config: LeanConfig, args: dict) -> int:
    """`delete [--force] ID`: Runtime.delete, over the same `hanabi_runtime.teardown`."""
    from hanabi_runtime.teardown import teardown

    cid = checked_id(args["id"])
    force = bool(args.get("force"))
    state = read_state(config, cid)
    if state is None and not os.path.exists(os.path.join(config.sandboxes_dir, cid)):
        if force:
            return 0
        raise NotFound(f"container {cid} does not exist")
    if state is not None and state["annotations"].get(POD_CONTAINER_TYPE) == "sandbox":
        raise Fallback()  # a pod's sandbox: Runtime.delete removes its app containers first
    daemons = Daemons(config)
    if state is not None and not force:
        current = status(daemons, state)
        if current in ("running", "creating"):
            raise FailedPrecondition(f"cannot delete container {cid} that is {current}: "
                                     "stop it first or use --force")

    def call(daemon: str, method: str, body: dict) -> object:
        return getattr(daemons, daemon).call(method, body, idempotent=True)

    def standins() -> list:
        return ([(state["standin_pid"], state["standin_start_time"])] if state else []) + exec_standins(config, cid)
    try:
        teardown(cid, call, config.sandboxes_dir, standins, state["cgroups"] if state else [],
                 sandbox=state["sandbox"] if state else None, paused=bool(state and state.get("paused")))
    finally:
        if state is not None and state["hooks"].get("poststop"):
            _poststop(state)
    return 0


def _poststop(state: dict) -> None:
    """Runtime._run_later_hooks for poststop: run, a failure logged, not raised."""
    from hanabi_runtime.hooks import hook_state, run_phase

    run_phase({"hooks": state["hooks"]}, "poststop",
              hook_state(state["id"], state["bundle"], state["standin_pid"] or 0, "stopped",
                         state["annotations"], state["oci_version"]), must_succeed=False)


COMMANDS = {"state": cmd_state, "start": cmd_start, "kill": cmd_kill, "pause": cmd_pause,
            "resume": cmd_resume, "ps": cmd_ps, "events": cmd_events, "delete": cmd_delete}


def run(name: str, config: LeanConfig, args: dict, log: tuple) -> int:
    """Run one hot command; its exit status. `log`: (file, format, debug) of the warnings
    (delete's, when a daemon is down), set up as the full CLI does it."""
    if name == "delete":
        from hanabi_runtime.clilog import defer_logging
        defer_logging(*log)
    return COMMANDS[name](config, args)
