"""The entry point of `hanabi-runtime`: the hot commands without pydantic, typer or pyzmq.

containerd's shim runs `state`, `start`, `kill`, `ps`, `events`, `pause`, `resume` and
`delete` as fresh processes (and `create` once per container: `_create` runs it through the
full `Runtime`, only without typer), over and over; each pays for every module it imports (`delete`
runs `hanabi_runtime.teardown`, the full CLI's teardown too). `main`
parses those command lines by hand (`argv`), runs them over plain dicts (`records`) and a
stdlib ZMTP client of the RPC envelope (`rpc`), and hands anything else (other commands,
--help, --debug, what the hand checks cannot vouch for) to the typer CLI in
`hanabi_runtime.cli`, which answers exactly as before. Either way the process ends with
`exit_now`: its output flushed, without the interpreter's teardown (with pydantic, pyzmq
and typer loaded that is 65-100 ms on this host, paid by every `create`).
"""

from __future__ import annotations

import os
import sys

HYPERVISORS = (None, "auto", "qemu", "firecracker")  # Runtime's check
ZYGOTE_COMMANDS = ("create", "run", "exec")  # the ones that import the models and clients


def _full_cli() -> None:
    from hanabi_runtime.cli import main as full_main
    full_main()


def exit_now(code: object) -> None:
    """End the process as `sys.exit(code)` would at the end of the program (`finish`),
    but skipping the teardown of the interpreter (module cleanup, garbage collection, the
    zmq context): every call was answered already."""
    os._exit(finish(code))


def finish(code: object) -> int:
    """The exit status `sys.exit(code)` gives (None: 0, an int: that status, anything else
    printed to stderr, then 1; 120 when stdout cannot be flushed), after the atexit
    handlers (logging's flush among them) and flushing stdio."""
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:
        print(code, file=sys.stderr)
        status = 1
    import atexit

    atexit._run_exitfuncs()  # logging's flush among them, as at a normal exit
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            if stream is sys.stdout and status == 0:
                status = 120  # what the interpreter's own exit makes of it
    return status


def main() -> None:
    """Entry point of the console script."""
    try:
        dispatch()
    except SystemExit as exc:
        exit_now(exc.code)
    exit_now(0)


def dispatch(zygote: bool = True) -> None:
    """Run the command of sys.argv (SystemExit with its status): in a zygote worker
    when one serves (`zygote`, for create, run and exec), else here."""
    from hanabi_runtime.lean.argv import parse, split_globals

    if zygote:
        found = split_globals(sys.argv[1:])
        if found is not None and found[1] in ZYGOTE_COMMANDS:
            status = _in_zygote(found[0])
            if status is not None:
                sys.exit(status)
    command = parse(sys.argv[1:])
    if command is None or command.globals["hypervisor"] not in HYPERVISORS:
        return _full_cli()
    if command.name == "create":
        return _create(command)
    from hanabi_common.errors import HanabiError
    from hanabi_runtime.lean.records import Fallback, load_config

    g = command.globals
    log = (g["log"], g["log_format"], False)
    if g["log"] is not None:
        try:  # the full CLI opens it at once (logging.FileHandler), whatever happens next
            open(g["log"], "a").close()
        except OSError:
            return _full_cli()
    try:
        from hanabi_runtime.lean.commands import run

        code = run(command.name, load_config(g["config"]), command.args, log)
    except Fallback:
        return _full_cli()
    except HanabiError as exc:
        from hanabi_runtime.clilog import report_error

        report_error(exc, g["log"], g["log_format"])
        sys.exit(1)
    sys.exit(code)


def _in_zygote(options: dict) -> int | None:
    """The command's status from a zygote worker; None to run it here (no zygote serves
    this config's run_dir, or the config is not one the lean reader vouches for)."""
    from hanabi_common.errors import HanabiError
    from hanabi_runtime.lean.records import Fallback, load_config

    try:
        run_dir = load_config(options["config"]).run_dir
    except (Fallback, HanabiError):
        return None
    from hanabi_runtime.lean.zygote import run_in_zygote

    return run_in_zygote(run_dir, list(sys.argv))


def _create(command) -> None:
    """`create` as `hanabi_runtime.cli.create` does it (`Runtime.create`, the same messages),
    without importing typer and click (60-100 ms of every container's start). A
    --preserve-fds that is not a plain number is typer's to refuse, in its words."""
    g, args = command.globals, command.args
    count = args.get("preserve_fds", "0")
    if not (count.isascii() and count.isdigit()):
        return _full_cli()
    from hanabi_common.errors import HanabiError
    from hanabi_runtime.clilog import report_error, setup_logging

    setup_logging(g["log"], g["log_format"], False)
    try:
        from hanabi_runtime.lifecycle import open_runtime, refuse_preserve_fds

        refuse_preserve_fds(args["id"], int(count))
        open_runtime(g["config"], g["root"], g["hypervisor"]).create(
            args["id"], args.get("bundle", "."), args.get("pid_file"), console_socket=args.get("console_socket"))
    except HanabiError as exc:
        report_error(exc, g["log"], g["log_format"])
        sys.exit(1)
