"""``hanabi-image``: build the guest kernel + initramfs, or show the current one.

    hanabi-image build [--out DIR] [--force]   # prints the result directory
    hanabi-image info                          # prints manifest.json of `current`
"""

from __future__ import annotations

import json
import sys

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Build and inspect the hanabi guest image (kernel + initramfs + agent).")


@app.command()
def build(
    out: str | None = typer.Option(None, "--out", help="Result directory (default: "
                                      "/var/lib/hanabi/guest/<inputs-hash>, and `current` points at it)."),
    force: bool = typer.Option(False, "--force", help="Rebuild even if the inputs did not change."),
    cache: str = typer.Option("/var/cache/hanabi/debs", "--cache", help="Where downloaded .deb files are kept."),
) -> None:
    """Build the guest from Debian packages (skipped when the inputs hash is unchanged)."""
    from .debs import DebError
    from .image import BuildError, build as do_build
    from .kernel import KernelError

    try:
        path, built = do_build(out, force=force, cache=cache)
    except (BuildError, DebError, KernelError, OSError) as exc:
        typer.echo(f"hanabi-image: build failed: {exc}", err=True)
        raise typer.Exit(1) from None
    if not built:
        typer.echo("hanabi-image: up to date (inputs unchanged)", err=True)
    typer.echo(path)


@app.command()
def info() -> None:
    """Print the manifest of /var/lib/hanabi/guest/current."""
    from .image import BuildError, info as do_info

    try:
        manifest = do_info()
    except BuildError as exc:
        typer.echo(f"hanabi-image: {exc}", err=True)
        raise typer.Exit(1) from None
    json.dump(manifest, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
