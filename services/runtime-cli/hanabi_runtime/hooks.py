"""OCI lifecycle hooks (config.json `hooks`), run on the host as runc runs them.

Each hook is a program run with its `args` and `env`, the container's state JSON on
stdin, and an optional `timeout` in seconds. `prestart` and `createRuntime` hooks run
during `create`, once the container's network namespace exists and before anything is
looked for inside it: that is where Docker's `libnetwork-setkey` hook moves the
container's endpoint into the namespace. A failing one fails `create`. `poststart` and
`poststop` hooks failing only warn (runtime-spec: "the error MUST be logged").

The state's `pid` must name a process whose /proc entry leads to the container's
namespaces; a VM has none on the host, so the caller passes the id of a thread parked in
the network namespace (`hanabi_common.netns.NetnsHolder`), as Kata does.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess

from hanabi_common.errors import FailedPrecondition, InvalidArgument

log = logging.getLogger("hanabi.runtime.hooks")
DEFAULT_TIMEOUT_S = 120.0
CREATE_PHASES = ("prestart", "createRuntime")
OUTPUT_LIMIT = 2000


def hooks_of(config: dict, phase: str) -> list[dict]:
    """The hooks of one phase, checked to be runnable definitions."""
    hooks = (config.get("hooks") or {}).get(phase) or []
    for index, hook in enumerate(hooks):
        path = hook.get("path", "")
        if not os.path.isabs(path):
            raise InvalidArgument(f"config.json: hooks.{phase}[{index}].path {path!r} must be absolute")
        timeout = hook.get("timeout")
        if timeout is not None and (not isinstance(timeout, int) or timeout <= 0):
            raise InvalidArgument(f"config.json: hooks.{phase}[{index}].timeout must be a positive integer")
    return list(hooks)


def hook_state(cid: str, bundle: str, pid: int, status: str, annotations: dict, oci_version: str) -> dict:
    """The state JSON a hook reads on stdin (runtime-spec "State")."""
    return {"ociVersion": oci_version, "id": cid, "status": status, "pid": pid, "bundle": bundle,
            "annotations": annotations}


def run_hook(hook: dict, state: dict, phase: str, index: int) -> None:
    """Run one hook; FailedPrecondition naming it when it fails or overruns its timeout."""
    path = hook["path"]
    argv = hook.get("args") or [path]
    timeout = hook.get("timeout") or DEFAULT_TIMEOUT_S
    what = f"{phase} hook #{index} ({path})"
    try:
        done = subprocess.run(argv, executable=path, input=json.dumps(state).encode(),
                              env=dict(item.split("=", 1) for item in hook.get("env") or [] if "=" in item),
                              capture_output=True, timeout=timeout, close_fds=True)
    except subprocess.TimeoutExpired:
        raise FailedPrecondition(f"{what} did not finish within {timeout:g}s") from None
    except OSError as exc:
        raise FailedPrecondition(f"{what} cannot run: {exc.strerror or exc}") from None
    if done.returncode != 0:
        output = (done.stderr or done.stdout).decode(errors="replace").strip()[-OUTPUT_LIMIT:]
        raise FailedPrecondition(f"{what} failed with status {done.returncode}: {output or 'no output'}")
    log.info("hook ran", extra={"phase": phase, "index": index, "path": path})


def run_phase(config: dict, phase: str, state: dict, *, must_succeed: bool) -> list[str]:
    """Run every hook of `phase` in order. With `must_succeed` the first failure raises;
    otherwise failures are logged and returned."""
    failures = []
    for index, hook in enumerate(hooks_of(config, phase)):
        try:
            run_hook(hook, state, phase, index)
        except FailedPrecondition as exc:
            if must_succeed:
                raise
            log.warning("hook failed", extra={"phase": phase, "index": index, "error": exc.message})
            failures.append(exc.message)
    return failures
