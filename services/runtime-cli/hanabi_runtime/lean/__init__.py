"""The entry point of `hanabi-runtime`: the hot commands without pydantic, typer or pyzmq.

containerd's shim runs `state`, `start`, `kill`, `ps`, `events`, `pause`, `resume` and
`delete` as fresh processes, over and over; each pays for every module it imports (`delete`
runs `hanabi_runtime.teardown`, the full CLI's teardown too). `main`
parses those command lines by hand (`argv`), runs them over plain dicts (`records`) and a
stdlib ZMTP client of the RPC envelope (`rpc`), and hands anything else (other commands,
--help, --debug, what the hand checks cannot vouch for) to the typer CLI in
`hanabi_runtime.cli`, which answers exactly as before.
"""

from __future__ import annotations

import sys

HYPERVISORS = (None, "auto", "qemu", "firecracker")  # Runtime's check


def _full_cli() -> None:
    from hanabi_runtime.cli import main as full_main
    full_main()


def main() -> None:
    """Entry point of the console script."""
    from hanabi_runtime.lean.argv import parse

    command = parse(sys.argv[1:])
    if command is None or command.globals["hypervisor"] not in HYPERVISORS:
        return _full_cli()
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
