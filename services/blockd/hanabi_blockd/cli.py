"""`hanabi-blockd`: run blockd, or inspect a running one (`hanabi-blockd ctl list`)."""

from __future__ import annotations

import time

import typer

from hanabi_common.daemon_cli import make_app, print_json


def _build(config):
    from hanabi_blockd.service import BlockService
    return BlockService(config)


app, ctl = make_app("blockd", _build)


def _mib(n: int) -> str:
    """Bytes for humans: 20.4M, 78.4G."""
    return f"{n / (1 << 30):.1f}G" if n >= 10 << 30 else f"{n / (1 << 20):.1f}M"


def _ago(t: float) -> str:
    seconds = max(0, time.time() - t)
    return f"{seconds:.0f}s ago" if seconds < 120 else f"{seconds / 60:.0f}m ago" if seconds < 7200 else f"{seconds / 3600:.0f}h ago"


def render_listing(listing: dict) -> str:
    """The block.list reply as tables for humans."""
    lines = [f"backend: {listing['backend']} ({listing['reason']})", "", "POOL      HEALTHY  FREE/TOTAL  BASES/BUDGET  PATH"]
    for p in listing["pools"]:
        lines.append(f"{p['name']:<9} {'yes' if p['healthy'] else 'NO':<8} {_mib(p['free_bytes'])}/{_mib(p['total_bytes'])}  "
                     f"{_mib(p['bases_bytes'])}/{_mib(p['bases_budget_bytes'])}  {p['path']}" + (f"  {p['detail']}" if p['detail'] else ""))
    lines += ["", "BASE                                  SIZE     ON-DISK  LAST USED  HOLDERS  KIND"]
    for b in listing["bases"]:
        lines.append(f"{b['key']:<37} {_mib(b['size_bytes']):<8} {_mib(b['allocated_bytes']):<8} {_ago(b['last_used']):<10} "
                     f"{','.join(b['holders']) or '-':<8} {b['kind']} ({b['detail']})")
    lines += ["", "SANDBOX               SERIAL        LAYOUT       FORMAT  BASE                                  PATH"]
    for v in listing["volumes"]:
        lines.append(f"{v['sandbox_id']:<21} {v['serial']:<13} {v.get('layout', 'image'):<12} {v['format']:<7} "
                     f"{v.get('base_key') or '-':<37} {v['path']}")
    return "\n".join(lines)


@ctl.command("list")
def list_all(as_json: bool = typer.Option(False, "--json", help="the raw block.list reply")) -> None:
    """Pools, bases (image key, size, last use, holders) and volumes with their sandbox."""
    def show(client) -> None:
        listing = client.call("block.list", {})
        if as_json:
            print_json(listing)
        else:
            typer.echo(render_listing(listing))
    app.with_client(show)


@ctl.command("volumes")
def list_volumes() -> None:
    """Every volume and the sandbox holding it (JSON)."""
    app.with_client(lambda c: print_json(c.call("volume.list", {})))


@ctl.command("collect")
def collect(budget_mib: int = typer.Option(None, help="collect down to this many MiB (default: the configured budget)")) -> None:
    """Remove unused bases beyond the budget, least recently used first."""
    app.with_client(lambda c: print_json(c.call("block.collect", {"budget_mib": budget_mib})))


@ctl.command("backend")
def backend() -> None:
    """Show the backend in use and why it was chosen."""
    app.with_client(lambda c: print_json(c.call("backend.info", {})))


def main() -> None:
    """Entry point of the console script."""
    app()
