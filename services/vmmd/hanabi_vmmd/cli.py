"""`hanabi-vmmd`: run vmmd (`serve`), or inspect a running one (`ctl list|pool|inspect|stop`)."""

from __future__ import annotations


import typer

from hanabi_common.daemon_cli import make_app, print_json


def _build(config):
    from hanabi_vmmd import hostmem
    from hanabi_vmmd.service import VmService

    # before any VMM is spawned (recovery adopts running ones; the pool and templates start new ones)
    hostmem.apply(config.vmm.transparent_hugepages, config.vmm.ksm)
    return VmService(config)


app, ctl = make_app("vmmd", _build)


def _client(rpc):
    from hanabi_common.config import load_config
    from hanabi_vmmd.client import VmmdClient
    client = VmmdClient(load_config(app.state.get("config")), timeout=app.state.get("timeout"))
    client.rpc = rpc
    return client


@ctl.command("list")
def list_vms() -> None:
    """List every VM vmmd owns."""
    app.with_client(lambda rpc: print_json(_client(rpc).list()))


@ctl.command("pool")
def pool() -> None:
    """List the warm pool's VMs that are ready to be taken."""
    app.with_client(lambda rpc: print_json(_client(rpc).pool()))


@ctl.command("inspect")
def inspect(sandbox_id: str) -> None:
    """Show one sandbox's VM."""
    app.with_client(lambda rpc: print_json(_client(rpc).get(sandbox_id)))


@ctl.command("stop")
def stop(sandbox_id: str,
         grace: float | None = typer.Option(None, "--timeout", help="seconds before SIGKILL")) -> None:
    """Stop a sandbox's VM and forget it."""
    app.with_client(lambda rpc: print_json(_client(rpc).stop(sandbox_id, grace)))


def main() -> None:
    """Entry point of the console script."""
    app()
