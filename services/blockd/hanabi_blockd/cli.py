"""`hanabi-blockd`: run blockd, or inspect a running one (`hanabi-blockd ctl list`)."""

from __future__ import annotations

from hanabi_common.daemon_cli import make_app, print_json


def _build(config):
    from hanabi_blockd.service import BlockService
    return BlockService(config)


app, ctl = make_app("blockd", _build)


@ctl.command("list")
def list_volumes() -> None:
    """List every volume and the sandbox holding it."""
    app.with_client(lambda c: print_json(c.call("volume.list", {})))


@ctl.command("backend")
def backend() -> None:
    """Show the backend in use and why it was chosen."""
    app.with_client(lambda c: print_json(c.call("backend.info", {})))


def main() -> None:
    """Entry point of the console script."""
    app()
