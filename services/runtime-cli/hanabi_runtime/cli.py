"""`hanabi-runtime`: the runc-compatible OCI runtime command line that Docker and containerd call.

Global flags as runc has them (`--root`, `--log`, `--log-format`, `--debug`,
`--systemd-cgroup`), then a command: create, start, state, kill, delete, run, list, spec,
version. Errors go to stderr (and to the --log file as JSON) and exit with status 1.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import typer

from hanabi_common.errors import HanabiError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="hanabi: run OCI containers, each in its own microVM (runc-compatible CLI)")
_globals: dict = {}
VERSION = "0.1.0"
OCI_SPEC_VERSION = "1.0.2"


def _version_text() -> str:
    return f"hanabi-runtime version {VERSION}\nspec: {OCI_SPEC_VERSION}"


def _print_version(value: bool) -> None:
    if value:
        typer.echo(_version_text())
        raise typer.Exit(0)


@app.callback()
def _global(version: bool = typer.Option(False, "--version", "-v", callback=_print_version, is_eager=True,
                                         help="print the version (as `runc --version`; podman info asks for it)"),
            root: str | None = typer.Option(None, help="runc's state root (recorded; hanabi keeps state under run_dir)"),
            log: Path | None = typer.Option(None, help="also write errors to this file"),
            log_format: str = typer.Option("text", help="text or json, for --log"),
            debug: bool = typer.Option(False, help="verbose logging to stderr"),
            systemd_cgroup: bool = typer.Option(False, help="accepted for runc compatibility"),
            config: Path | None = typer.Option(None, help="hanabi config file (default $HANABI_CONFIG or /etc/hanabi/hanabi.toml)"),
            hypervisor: str | None = typer.Option(None, help="auto, qemu or firecracker (default: the config's vmm.hypervisor)")) -> None:
    _globals.update(root=root, log=log, log_format=log_format, debug=debug, config=config, hypervisor=hypervisor)
    _setup_logging(log, log_format, debug)


def _setup_logging(log: Path | None, log_format: str, debug: bool) -> None:
    from hanabi_runtime.clilog import setup_logging
    setup_logging(log, log_format, debug)


def _runtime():
    from hanabi_runtime.lifecycle import open_runtime

    return open_runtime(_globals.get("config"), _globals.get("root"), _globals.get("hypervisor"))


def _fail(exc: HanabiError) -> None:
    from hanabi_runtime.clilog import report_error
    report_error(exc, _globals.get("log"), _globals.get("log_format"))
    raise typer.Exit(1)


def _refuse_preserve_fds(container_id: str, count: int) -> None:
    """Extra file descriptors cannot cross into the VM: refuse them instead of dropping them."""
    from hanabi_runtime.lifecycle import refuse_preserve_fds

    _guard(lambda: refuse_preserve_fds(container_id, count))


def _guard(action):
    try:
        return action()
    except HanabiError as exc:
        _fail(exc)


@app.command()
def create(container_id: str = typer.Argument(..., metavar="ID"),
           bundle: str = typer.Option(".", "--bundle", "-b", help="path to the OCI bundle"),
           pid_file: str | None = typer.Option(None, help="write the container's host pid here"),
           console_socket: str | None = typer.Option(None, help="unix socket that gets the pty master (process.terminal: true)"),
           no_pivot: bool = typer.Option(False, help="accepted for runc compatibility"),
           no_new_keyring: bool = typer.Option(False, help="accepted for runc compatibility"),
           preserve_fds: int = typer.Option(0, help="extra fds to pass (only 0: they cannot reach the VM)")) -> None:
    """Create a container in a new microVM; its process waits for `start`."""
    _refuse_preserve_fds(container_id, preserve_fds)
    _guard(lambda: _runtime().create(container_id, bundle, pid_file, console_socket=console_socket))


@app.command()
def start(container_id: str = typer.Argument(..., metavar="ID")) -> None:
    """Start a created container's process."""
    _guard(lambda: _runtime().start(container_id))


@app.command()
def state(container_id: str = typer.Argument(..., metavar="ID")) -> None:
    """Print the container's OCI state as JSON."""
    from hanabi_runtime.state import oci_state

    def show():
        runtime = _runtime()
        recorded = runtime.load(container_id)
        typer.echo(json.dumps(oci_state(recorded, runtime.status(recorded)), indent=2))
    _guard(show)


@app.command()
def kill(container_id: str = typer.Argument(..., metavar="ID"),
         signal_name: str = typer.Argument("SIGTERM", metavar="SIGNAL"),
         all_processes: bool = typer.Option(False, "--all", "-a", help="signal every process of the container")) -> None:
    """Send a signal (name or number) to the container's process."""
    from hanabi_runtime.signals import parse_signal
    _guard(lambda: _runtime().kill(container_id, parse_signal(signal_name), all_processes))


@app.command()
def delete(container_id: str = typer.Argument(..., metavar="ID"),
           force: bool = typer.Option(False, "--force", "-f", help="kill and delete a running container")) -> None:
    """Delete a container and everything it had: VM, volume, network, state."""
    _guard(lambda: _runtime().delete(container_id, force))


@app.command()
def run(container_id: str = typer.Argument(..., metavar="ID"),
        bundle: str = typer.Option(".", "--bundle", "-b", help="path to the OCI bundle"),
        pid_file: str | None = typer.Option(None, help="write the container's host pid here"),
        detach: bool = typer.Option(False, "--detach", "-d", help="do not wait for the container"),
        console_socket: str | None = typer.Option(None, help="with --detach: unix socket that gets the pty master"),
        no_pivot: bool = typer.Option(False, help="accepted for runc compatibility"),
        no_new_keyring: bool = typer.Option(False, help="accepted for runc compatibility"),
        keep: bool = typer.Option(False, help="do not delete the container after it exits")) -> None:
    """Create and start a container; without --detach, wait and exit with its status."""
    def go() -> int:
        from hanabi_runtime import console
        runtime = _runtime()
        terminal = console.save_terminal(0)  # the stand-in makes it raw: restore it even if it is killed
        created = runtime.create(container_id, bundle, pid_file, detach_standin=detach,
                                 console_socket=console_socket)
        try:
            runtime.start(container_id)
        except BaseException:
            runtime.delete(container_id, force=True)
            raise
        if detach:
            return 0
        status = _wait_forwarding_signals(created.standin)
        console.restore(0, terminal)
        if not keep:
            runtime.delete(container_id, force=True)
        return status
    raise typer.Exit(_guard(go))


def _wait_forwarding_signals(proc) -> int:
    """Wait for the stand-in; pass SIGINT/SIGTERM/SIGHUP/SIGQUIT on to it (it forwards them to the VM)."""
    code = proc.wait(forward_signals=True)
    return 128 - code if code < 0 else code


@app.command("list")
def list_containers(format: str = typer.Option("table", "--format", "-f", help="table or json"),
                    quiet: bool = typer.Option(False, "--quiet", "-q", help="ids only")) -> None:
    """List containers."""
    from hanabi_runtime.state import oci_state

    def show():
        entries = _runtime().list()
        if quiet:
            for recorded, _ in entries:
                typer.echo(recorded.id)
        elif format == "json":
            typer.echo(json.dumps([oci_state(r, s) for r, s in entries], indent=2))
        else:
            typer.echo(f"{'ID':<24} {'PID':<8} {'STATUS':<10} BUNDLE")
            for recorded, status in entries:
                typer.echo(f"{recorded.id:<24} {recorded.standin_pid or 0:<8} {status:<10} {recorded.bundle}")
    _guard(show)


@app.command()
def spec(bundle: str = typer.Option(".", "--bundle", "-b", help="where to write config.json")) -> None:
    """Write a default config.json (like `runc spec`)."""
    from hanabi_runtime.bundle import default_spec
    target = Path(bundle) / "config.json"
    if target.exists():
        typer.echo(f"hanabi-runtime: File {target} exists. Remove it first", err=True)
        raise typer.Exit(1)
    target.write_text(json.dumps(default_spec(), indent=2) + "\n")


@app.command("exec", context_settings={"allow_interspersed_args": False})
def exec_(container_id: str = typer.Argument(..., metavar="ID"),
          command: list[str] | None = typer.Argument(None, metavar="[COMMAND]..."),
          process: str | None = typer.Option(None, "--process", "-p", help="OCI process JSON file"),
          detach: bool = typer.Option(False, "--detach", "-d", help="do not wait for the process"),
          pid_file: str | None = typer.Option(None, help="write the process's host pid here"),
          console_socket: str | None = typer.Option(None, help="unix socket for the pty master"),
          tty: bool = typer.Option(False, "--tty", "-t", help="allocate a pty"),
          cwd: str | None = typer.Option(None, help="working directory in the container"),
          env: list[str] = typer.Option([], "--env", "-e", help="extra KEY=VALUE"),
          user: str | None = typer.Option(None, "--user", "-u", help="uid[:gid]"),
          preserve_fds: int = typer.Option(0, help="extra fds to pass (only 0: they cannot reach the VM)")) -> None:
    """Run one more process in a running container."""
    _refuse_preserve_fds(container_id, preserve_fds)

    def go() -> int:
        from hanabi_runtime.bundle import load_bundle
        from hanabi_runtime.execs import load_process, run_exec
        runtime = _runtime()
        base = {} if process else load_bundle(runtime.load(container_id).bundle).process
        spec = load_process(process, command or [], cwd=cwd, env=env, user=user, tty=tty, base=base)
        return run_exec(runtime, container_id, spec, pid_file, detach, console_socket)
    raise typer.Exit(_guard(go))


@app.command()
def ps(container_id: str = typer.Argument(..., metavar="ID"),
       format: str = typer.Option("table", "--format", "-f", help="table (the guest's view) or json (host pids)")) -> None:
    """List the container's processes."""
    from hanabi_runtime import observe

    def show():
        runtime = _runtime()
        if format == "json":
            typer.echo(json.dumps(observe.host_pids(runtime, container_id)))
        else:
            typer.echo(observe.guest_table(runtime, container_id))
    _guard(show)


@app.command()
def events(container_id: str = typer.Argument(..., metavar="ID"),
           stats: bool = typer.Option(False, "--stats", help="print one stats event and exit"),
           interval: float = typer.Option(5.0, "--interval", help="seconds between stats events")) -> None:
    """Print stats events of the container's VM (once with --stats, else until it stops,
    with an `oom` event whenever its memory cgroup runs out of memory, as runc does)."""
    from hanabi_runtime import observe

    def stream():
        runtime = _runtime()
        notifier = None if stats else observe.oom_notifier(runtime, container_id)
        try:
            while True:
                typer.echo(json.dumps(observe.stats(runtime, container_id)))
                if stats or runtime.status(runtime.load(container_id)) == "stopped":
                    return
                deadline = time.monotonic() + max(interval, 0.1)
                while (left := deadline - time.monotonic()) > 0:
                    if notifier is None:
                        time.sleep(left)  # the interval between stats events
                    elif notifier.wait(left):
                        typer.echo(json.dumps(observe.oom_event(container_id)))
        finally:
            if notifier is not None:
                notifier.close()
    _guard(stream)


@app.command()
def pause(container_id: str = typer.Argument(..., metavar="ID")) -> None:
    """Pause the container (its whole VM)."""
    _guard(lambda: _runtime().pause(container_id))


@app.command()
def resume(container_id: str = typer.Argument(..., metavar="ID")) -> None:
    """Resume a paused container."""
    _guard(lambda: _runtime().resume(container_id))


@app.command()
def update(container_id: str = typer.Argument(..., metavar="ID"),
           resources: str | None = typer.Option(None, "--resources", "-r", help="LinuxResources JSON file, or - for stdin")) -> None:
    """Change a container's resources (the VM's size is fixed at create for now)."""
    from hanabi_runtime.resources import apply_update

    def go():
        raw = sys.stdin.read() if resources in (None, "-") else Path(resources).read_text()
        apply_update(_runtime(), container_id, raw)
    _guard(go)


_ANY_ARGS = {"ignore_unknown_options": True, "allow_extra_args": True}


@app.command(context_settings=_ANY_ARGS)
def checkpoint(ctx: typer.Context) -> None:
    """Refused: a container's VM cannot be checkpointed with CRIU."""
    _refuse_criu("checkpoint", ctx.args)


@app.command(context_settings=_ANY_ARGS)
def restore(ctx: typer.Context) -> None:
    """Refused: a container's VM cannot be restored from a CRIU image."""
    _refuse_criu("restore", ctx.args)


def _refuse_criu(command: str, args: list[str]) -> None:
    from hanabi_common.errors import FailedPrecondition
    positional = [a for a in args if not a.startswith("-")]
    who = f"container {positional[-1]}" if positional else "a container"
    _fail(FailedPrecondition(f"{command} of {who} is not supported: hanabi runs it in a microVM, "
                             "which CRIU cannot checkpoint or restore"))


@app.command()
def features() -> None:
    """Print the OCI features document."""
    from hanabi_runtime.observe import features as document
    typer.echo(json.dumps(document(), indent=2))


@app.command()
def version() -> None:
    """Print the version."""
    typer.echo(_version_text())


@app.command()
def check(json_output: bool = typer.Option(False, "--json", help="print the report as JSON"),
          daemons: bool = typer.Option(True, "--daemons/--no-daemons", help="also ping the four daemons")) -> None:
    """Say which VMM backends can run on this host, why not, and what to install (exit 0 if one can)."""
    from hanabi_common.config import load_config
    from hanabi_runtime import check as host

    config = _guard(lambda: load_config(_globals.get("config")))
    facts = host.gather(config, daemons=daemons)
    reports = host.assess(facts)
    typer.echo(json.dumps(host.as_json(facts, reports), indent=2) if json_output else host.render(facts, reports))
    raise typer.Exit(host.exit_status(reports))


@app.command("install-docker")
def install_docker(daemon_json: Path = typer.Option(Path("/etc/docker/daemon.json"), help="the daemon.json to edit (created if missing)"),
                   runtime_path: str | None = typer.Option(None, help="hanabi-runtime for dockerd to run (default: this one)"),
                   config: Path | None = typer.Option(None, "--config", help="hanabi config the runtimes get as --config")) -> None:
    """Add the hanabi, hanabi-qemu and hanabi-fc runtimes to Docker's daemon.json."""
    from hanabi_runtime import docker_install
    config = config or _globals.get("config")  # `hanabi-runtime --config X install-docker` works too
    result = _guard(lambda: docker_install.install(daemon_json, runtime_path, str(config) if config else None))
    typer.echo(docker_install.describe(result, "installed"))


@app.command("uninstall-docker")
def uninstall_docker(daemon_json: Path = typer.Option(Path("/etc/docker/daemon.json"), help="the daemon.json to edit")) -> None:
    """Remove exactly the hanabi runtimes from Docker's daemon.json."""
    from hanabi_runtime import docker_install
    typer.echo(docker_install.describe(_guard(lambda: docker_install.uninstall(daemon_json)), "removed"))


def main() -> None:
    """Entry point of the console script."""
    app()
