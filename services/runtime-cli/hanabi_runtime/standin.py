"""The stand-in: the host process that stands for a container process running in the VM.

Docker's shim waits on the pid `create` wrote to the pid file. That pid is this process. It
holds the stdio the shim gave `create`, relays it to and from the container's process through
agentd's io stream, forwards the signals it receives, and exits with the container's status
(the exit code, or 128+N when the process was killed by signal N; 255 when unknown).
Kata 1.x called it kata-shim. When the guest's OOM killer ends a process of the container,
the init's stand-in makes its own host memory cgroup see an OOM (hostoom.py), which is how
the shim, and so Docker's `OOMKilled` and `oom` event, learn of it.

Run as `python -m hanabi_runtime.standin --sandbox S --container C --ready-fd N
[--start-fifo F] [--exec-id E] [--config PATH] [--console-socket P | --tty]`. It writes
"ok\\n" (or an error line) to the ready fd once attached, then, if a start fifo is given,
waits for `start` to write to it. For a process with `terminal: true`, `--console-socket`
sends a host pty master to P and relays the slave, `--tty` relays its own stdio as a
terminal (see `console`).

Light on purpose: a stand-in runs for each container process for as long as it runs, so
its memory is paid once per container (issue 14: host memory per idle container). It
imports the standard library, `hanabi_wire`, `hanabi_common.errors` and the lean CLI's
stdlib pieces (`hanabi_runtime.lean`: the config as plain values, the ZMTP client), never
pydantic or pyzmq; tests/unit/test_runtime_standin.py pins the set. What needs the typed
models is imported only when it happens: a config the lean reader cannot vouch for, a
state file it cannot read, a link change to apply (netfollow).
"""

from __future__ import annotations

import os
import signal
import sys
from typing import TYPE_CHECKING

from hanabi_wire.constants import INIT_EXEC_ID

if TYPE_CHECKING:
    from hanabi_agentd.iostream import IoStream
    from hanabi_common.config import Config
    from hanabi_runtime.console import ConsoleRelay
    from hanabi_runtime.lean.records import LeanConfig

SIGNAL_RETRY_S = 120.0
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT,
                     signal.SIGUSR1, signal.SIGUSR2)


class StandIn:
    """Relays one container process's stdio and signals; knows its final status."""

    def __init__(self, args: Args) -> None:
        self.args = args
        self.config = load_config(args.config)
        self.started = args.start_fifo is None
        # Held open read-write from the start, so `start` can never find the fifo unopened
        # and a read never sees end-of-file.
        self.fifo_fd = os.open(args.start_fifo, os.O_RDWR | os.O_CLOEXEC) if args.start_fifo else None
        self.stream: IoStream | None = None
        self.console: ConsoleRelay | None = None
        self.oom_warned = False

    def attach(self) -> None:
        """Attach to agentd's io stream for this process (before it starts: nothing is lost);
        for a terminal, set up the host end (the master goes to the console socket now)."""
        from hanabi_agentd.iostream import IoStream

        self.stream = IoStream.attach(self.config.run_dir, self.args.sandbox, self.args.container,
                                      self.args.exec_id, timeout=10.0)
        if self.args.exec_id == INIT_EXEC_ID:  # the pid the shim watches the cgroup of
            self.stream.on_oom = self.on_oom
        if self.args.console_socket or self.args.tty:
            from hanabi_runtime.console import setup_console

            self.console = setup_console(self.args.console_socket, _stdin_fd())

    def on_signal(self, signum: int, _frame: object) -> None:
        """Forward a signal to the process in the VM (Python runs this between bytecodes)."""
        if not self.started:
            # Nothing runs in the guest yet: the signal ends the stand-in, as it would the process.
            os._exit(128 + signum)
        import threading
        threading.Thread(target=self.forward, args=(signum,), daemon=True, name=f"sig{signum}").start()

    def forward(self, signum: int) -> None:
        """Send the signal through agentd; while agentd is down (restarting) try again with
        backoff for up to SIGNAL_RETRY_S, so a `docker stop` then is not lost."""
        import time

        from hanabi_common.errors import Unavailable
        from hanabi_runtime.lean.commands import Daemons

        deadline = time.monotonic() + SIGNAL_RETRY_S
        delay = 0.1
        body = {"sandbox_id": self.args.sandbox, "container_id": self.args.container,
                "exec_id": self.args.exec_id, "signal": signum, "all": False}
        while True:
            try:
                Daemons(self.config).agentd.call("container.signal", body)
                return
            except Unavailable as exc:
                if time.monotonic() + delay > deadline:
                    _warn(f"could not forward signal {signum}: {exc}")
                    return
            except Exception as exc:  # the process may be gone already
                _warn(f"could not forward signal {signum}: {exc}")
                return
            time.sleep(delay)  # backoff while agentd is away
            delay = min(delay * 2, 2.0)

    def on_oom(self, oom_kills: int) -> None:
        """The guest's OOM killer ended a process of the container: make this process's
        host memory cgroup see an OOM (hostoom.py), before the exit that follows."""
        from hanabi_runtime.hostoom import HostOomError, raise_oom

        try:
            raise_oom(allowed=self.cgroups())
        except (HostOomError, OSError) as exc:
            if not self.oom_warned:
                self.oom_warned = True
                _warn(f"the container ran out of memory, but the host cannot report it: {exc}")

    def cgroups(self) -> list[str]:
        """The host cgroups `create` put the container in (state.json), [] when none is recorded."""
        from hanabi_runtime.lean.records import Fallback, read_state

        try:
            state = read_state(self.config, self.args.container)
            return state["cgroups"] if state is not None else []
        except Fallback:  # a state file the hand checks cannot vouch for: the models read it
            from hanabi_common.state import StateStore
            from hanabi_runtime.state import STATE_NAME, RuntimeState

            full = StateStore(self.full_config().sandboxes_dir).read(self.args.container, STATE_NAME, RuntimeState)
            return full.cgroups if full is not None else []

    def full_config(self) -> Config:
        """The validated Config, for what needs the typed clients (imports pydantic)."""
        from hanabi_common.config import load_config as load_full

        return load_full(self.args.config)

    def wait_for_start(self) -> None:
        """Block until `start` writes to the fifo."""
        assert self.fifo_fd is not None  # not started: it was given a start fifo
        while not os.read(self.fifo_fd, 1):
            pass
        os.close(self.fifo_fd)
        self.started = True

    def follow_network(self) -> None:
        """The init process of a sandbox's own container follows the links of its namespace
        (netfollow: a NIC plugged or unplugged when `docker network connect` changes it)."""
        if self.args.exec_id != INIT_EXEC_ID or self.args.sandbox != self.args.container:
            return
        import threading

        # Imported by this thread, not the follower: what an import allocates then stays out of
        # the follower's own glibc malloc arena (about 0.5 MiB less per stand-in, measured).
        import hanabi_runtime.lean.commands  # noqa: F401
        from hanabi_runtime.netfollow import follow

        threading.Thread(target=follow, args=(self.config, self.full_config, self.args.sandbox, threading.Event(), _warn),
                         daemon=True, name="netfollow").start()

    def relay(self) -> int:
        """Relay stdio until the process exits; return its status."""
        assert self.stream is not None  # attach() came first
        if self.console is not None:
            return self.console.relay(self.stream)
        return self.stream.relay(_stdin_fd(), 1, 2)


def _wait_go(fd: int) -> bool:
    """Launched early by `create` (lifecycle.launch_standin): do the imports attaching
    needs, then wait for its go byte; False if the pipe ended without one."""
    import hanabi_agentd.iostream  # noqa: F401  # imported now, while the VM is made
    import hanabi_runtime.proctitle  # noqa: F401  # likewise

    try:
        go = os.read(fd, 1)
    except OSError:
        go = b""
    os.close(fd)
    return bool(go)


def load_config(path: str | None) -> LeanConfig:
    """The settings a stand-in reads, as plain values (`hanabi_runtime.lean.records`): the
    file `create` validated (and so recorded) is read by hand; one the lean reader cannot
    vouch for is validated by the models (pydantic, imported only then)."""
    from hanabi_runtime.lean.records import Fallback, LeanConfig, load_config as load_lean

    try:
        return load_lean(path)
    except Fallback:
        from hanabi_common.config import load_config as load_full

        return LeanConfig.of(load_full(path))


def set_title(title: str) -> None:
    """What host ps shows for this process: setproctitle's C function, without the package's
    `logging` import where it can (hanabi_runtime.proctitle)."""
    from hanabi_runtime.proctitle import set_title as set_lean

    if not set_lean(title):
        from setproctitle import setproctitle

        setproctitle(title)


def _stdin_fd() -> int | None:
    """0 if this process has a stdin, else None (the process's stdin is closed at once)."""
    try:
        os.fstat(0)
        return 0
    except OSError:
        return None


def _warn(message: str) -> None:
    try:
        os.write(2, f"hanabi stand-in: {message}\n".encode())
    except OSError:
        pass


# --go-fd: attach only after a byte arrives there (end of file: exit);
# --title: the process's command, shown by ps and docker top.
OPTIONS = {"--sandbox": None, "--container": None, "--exec-id": INIT_EXEC_ID, "--ready-fd": None,
           "--go-fd": None, "--start-fifo": None, "--config": None, "--console-socket": None,
           "--title": ""}
REQUIRED = ("--sandbox", "--container", "--ready-fd")
FLAGS = ("--tty",)


def _parse(argv: list[str]) -> Args:
    """The stand-in's command line (`lifecycle.spawn_standin` writes it): `--name value`
    or `--name=value` options and the `--tty` flag; ValueError names what is wrong.
    (Not argparse: it costs every stand-in its import, and nobody types this line.)"""
    values: dict[str, object] = dict(OPTIONS)
    values.update(dict.fromkeys(FLAGS, False))
    rest = list(argv)
    while rest:
        word = rest.pop(0)
        name, eq, value = word.partition("=")
        if name in FLAGS and not eq:
            values[name] = True
        elif name in OPTIONS:
            if not eq:
                if not rest:
                    raise ValueError(f"hanabi-standin: {name} needs a value")
                value = rest.pop(0)
            values[name] = value
        else:
            raise ValueError(f"hanabi-standin: unknown argument {word!r}")
    missing = [name for name in REQUIRED if values[name] is None]
    if missing:
        raise ValueError(f"hanabi-standin: {', '.join(missing)} required")
    for name in ("--ready-fd", "--go-fd"):
        if values[name] is None:
            continue
        try:
            values[name] = int(str(values[name]))
        except ValueError:
            raise ValueError(f"hanabi-standin: {name} must be a number, not {values[name]!r}") from None
    return Args(**{name[2:].replace("-", "_"): value for name, value in values.items()})


class Args:
    """The parsed command line: sandbox, container, exec_id, ready_fd, go_fd, start_fifo,
    config, console_socket, title, tty."""

    def __init__(self, **values: object) -> None:
        self.__dict__.update(values)

    sandbox: str
    container: str
    exec_id: str
    ready_fd: int
    go_fd: int | None
    start_fifo: str | None
    config: str | None
    console_socket: str | None
    title: str
    tty: bool


def process_title(command: str, container: str) -> str:
    """What host `ps` (and so `docker top`) shows for a stand-in: the command it stands for."""
    return f"{command} [hanabi {container[:12]}]" if command else f"[hanabi {container[:12]}]"


def main(argv: list[str] | None = None) -> int:
    """Entry point: attach, report readiness, wait for start, relay, exit with the status."""
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    try:
        args = _parse(sys.argv[1:] if argv is None else argv)
    except ValueError as exc:
        _warn(str(exc))
        return 2
    try:
        standin = StandIn(args)
        for signum in FORWARDED_SIGNALS:
            signal.signal(signum, standin.on_signal)
        if args.go_fd is not None and not _wait_go(args.go_fd):
            return 0  # its creator gave up (create failed): nothing to stand for
        standin.attach()
    except Exception as exc:
        os.write(args.ready_fd, f"error: {exc}\n".encode())
        return 1
    set_title(process_title(args.title, args.container))
    os.write(args.ready_fd, b"ok\n")
    os.close(args.ready_fd)
    if not standin.started:
        standin.wait_for_start()
    standin.follow_network()
    return standin.relay()


if __name__ == "__main__":
    from hanabi_runtime.lean import exit_now

    exit_now(main())  # no interpreter teardown: the container's exit reaches the shim sooner
