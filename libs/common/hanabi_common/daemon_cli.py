"""The command line every daemon shares: `serve` and a `ctl` group for debugging.

`hanabi-<daemon> serve` runs the daemon; `hanabi-<daemon> ctl ping|describe|call` talks to
a running one. Each daemon adds its own `ctl` commands (list, inspect...) on top.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any
from collections.abc import Callable

import typer

from hanabi_common.config import Config, load_config
from hanabi_common.errors import HanabiError

if TYPE_CHECKING:
    from hanabi_common.daemon import Service

ConfigOption = typer.Option(None, "--config", "-c", help="config file (default $HANABI_CONFIG or /etc/hanabi/hanabi.toml)")


def print_json(value: object) -> None:
    """Print a JSON document for humans and scripts alike."""
    if hasattr(value, "model_dump"):
        value = value.model_dump(mode="json")
    typer.echo(json.dumps(value, indent=2, sort_keys=True))


def fail(exc: HanabiError) -> None:
    """Report a typed error on stderr and exit 1."""
    typer.echo(f"error: {exc.code.value}: {exc.message}", err=True)
    raise typer.Exit(1)


class DaemonApp(typer.Typer):
    """The `hanabi-<name>` app: `state` holds the `ctl` options, `with_client(action)` runs
    `action` on a client of the running daemon (typed errors exit 1)."""

    state: dict[str, Any]
    with_client: Callable[[Callable[[Any], object]], None]


def make_app(name: str, build: Callable[[Config], Service]) -> tuple[DaemonApp, typer.Typer]:
    """Build the `hanabi-<name>` app and its `ctl` sub-app (add commands to the latter)."""
    app = DaemonApp(help=f"hanabi {name} daemon", no_args_is_help=True, add_completion=False)
    ctl = typer.Typer(help=f"talk to a running {name}", no_args_is_help=True)
    app.add_typer(ctl, name="ctl")
    state: dict = {}

    @app.command()
    def serve(config: Path | None = ConfigOption,
              pid_file: Path | None = typer.Option(None, help="write the pid here once ready")) -> None:
        """Run the daemon in the foreground until SIGTERM."""
        from hanabi_common.daemon import serve as run
        try:
            cfg = load_config(config)
        except HanabiError as exc:
            fail(exc)
        raise typer.Exit(run(name, cfg, build, pid_file))

    @ctl.callback()
    def _ctl(config: Path | None = ConfigOption,
             timeout: float = typer.Option(10.0, help="seconds to wait for the daemon")) -> None:
        state["config"], state["timeout"] = config, timeout

    @ctl.command()
    def ping() -> None:
        """Check the daemon answers."""
        with_client(lambda c: print_json(c.ping(timeout=state["timeout"])))

    @ctl.command()
    def describe() -> None:
        """List the daemon's RPC methods."""
        with_client(lambda c: print_json(c.call("describe", timeout=state["timeout"])))

    @ctl.command()
    def metrics() -> None:
        """Print the daemon's Prometheus metrics (text exposition format)."""
        with_client(lambda c: typer.echo(c.call("metrics", timeout=state["timeout"])["text"], nl=False))

    @ctl.command()
    def call(method: str, body: str = typer.Argument("{}", help="JSON object, or - for stdin")) -> None:
        """Call any RPC method with a raw JSON body."""
        raw = sys.stdin.read() if body == "-" else body
        try:
            payload = json.loads(raw)
        except ValueError as exc:
            typer.echo(f"error: body is not JSON: {exc}", err=True)
            raise typer.Exit(2) from None
        with_client(lambda c: print_json(c.call(method, payload, timeout=state["timeout"])))

    def with_client(action: Callable) -> None:
        from hanabi_common.rpc.client import RpcClient
        try:
            cfg = load_config(state.get("config"))
            action(RpcClient(name, cfg.endpoint(name), timeout=state.get("timeout", 10.0)))
        except HanabiError as exc:
            fail(exc)

    app.state = state
    app.with_client = with_client
    return app, ctl
