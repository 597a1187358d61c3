"""`hanabi-agentd`: run agentd, or inspect a running one (`hanabi-agentd ctl list`)."""

from __future__ import annotations

import typer

from hanabi_common.daemon_cli import make_app, print_json


def _build(config):
    from hanabi_agentd.service import AgentService
    return AgentService(config)


app, ctl = make_app("agentd", _build)


@ctl.command("list")
def list_agents() -> None:
    """List every sandbox agent agentd knows."""
    app.with_client(lambda c: print_json(c.call("agent.list", {})))


@ctl.command("inspect")
def inspect(sandbox_id: str = typer.Argument(..., help="sandbox id")) -> None:
    """Show one agent with its containers and processes."""
    app.with_client(lambda c: print_json(c.call("agent.inspect", {"sandbox_id": sandbox_id})))


def main() -> None:
    """Entry point of the console script."""
    app()
