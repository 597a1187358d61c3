"""`hanabi-zygote`: `serve` runs the zygote (a systemd unit, or `make up`); `ctl ping` checks
that one answers on the config's run_dir."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import typer

from hanabi_common.config import load_config
from hanabi_common.daemon_cli import fail
from hanabi_common.errors import HanabiError

app = typer.Typer(help="hanabi zygote: forks workers that run create, run and exec with their imports done",
                  no_args_is_help=True, add_completion=False)
ctl = typer.Typer(help="talk to a running zygote", no_args_is_help=True)
app.add_typer(ctl, name="ctl")
ConfigOption = typer.Option(None, "--config", "-c", help="config file (default $HANABI_CONFIG or /etc/hanabi/hanabi.toml)")
state: dict = {}


@app.command()
def serve(config: Path | None = ConfigOption,
          pid_file: Path | None = typer.Option(None, help="write the pid here once ready")) -> None:
    """Run the zygote in the foreground until SIGTERM."""
    from hanabi_common.logs import setup_logging
    from hanabi_runtime.lifecycle import open_runtime
    from hanabi_runtime.zygote.server import serve as run

    try:
        # Validated, and stamped for the lean CLI, which finds the zygote through it.
        cfg = open_runtime(config, None, None).config
        setup_logging("zygote", cfg.log_level)
        raise typer.Exit(run(cfg, pid_file))
    except HanabiError as exc:
        fail(exc)


@ctl.callback()
def _ctl(config: Path | None = ConfigOption,
         timeout: float = typer.Option(10.0, help="seconds to wait for the zygote")) -> None:
    state["config"], state["timeout"] = config, timeout


@ctl.command()
def ping() -> None:
    """Check the zygote answers: its pid."""
    from hanabi_runtime.zygote import protocol as P

    try:
        path = P.socket_path(load_config(state["config"]).run_dir)
    except HanabiError as exc:
        fail(exc)
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(state["timeout"])
        try:
            sock.connect(path)
            P.send(sock, P.PING)
            reply, _ = P.recv(sock)
        except (OSError, P.ProtocolError) as exc:
            typer.echo(f"error: UNAVAILABLE: no zygote answers on {path}: {exc}", err=True)
            raise typer.Exit(1) from None
    typer.echo(json.dumps({"pid": reply.get("pid"), "socket": path}))


def main() -> None:
    """Entry point of the console script."""
    app()
