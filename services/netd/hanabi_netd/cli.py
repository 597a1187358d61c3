"""`hanabi-netd`: run netd, or inspect a running one (`hanabi-netd ctl list`)."""

from __future__ import annotations

from hanabi_common.daemon_cli import make_app, print_json


def _build(config):
    from hanabi_netd.service import NetworkService
    return NetworkService(config)


app, ctl = make_app("netd", _build)


@ctl.command("list")
def list_networks() -> None:
    """List every sandbox network."""
    app.with_client(lambda c: print_json(c.call("net.list", {})))


def main() -> None:
    """Entry point of the console script."""
    app()
