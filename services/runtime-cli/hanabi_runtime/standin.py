"""The stand-in: the host process that stands for a container process running in the VM.

Docker's shim waits on the pid `create` wrote to the pid file. That pid is this process. It
holds the stdio the shim gave `create`, relays it to and from the container's process through
agentd, forwards the signals it receives, and exits with the container's status (the exit
code, or 128+N when the process was killed by signal N). Kata 1.x called it kata-shim.

Run as `python -m hanabi_runtime.standin --sandbox S --container C --ready-fd N
[--start-fifo F] [--exec-id E] [--config PATH]`. It writes "ok\\n" (or an error line) to the
ready fd once attached, then, if a start fifo is given, waits for `start` to write to it.
"""

from __future__ import annotations

import argparse
import errno
import os
import select
import signal
import sys

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT,
                     signal.SIGUSR1, signal.SIGUSR2)
READ_CHUNK = 64 * 1024
REATTACH_TIMEOUT_S = 30.0


class StandIn:
    """Relays one container process's stdio and signals; knows its final status."""

    def __init__(self, args: argparse.Namespace) -> None:
        from hanabi_common.config import load_config

        self.args = args
        self.config = load_config(args.config)
        self.started = args.start_fifo is None
        self.pending_signals: list[int] = []
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_w, False)
        self.stream = None
        # Held open read-write from the start, so `start` can never find the fifo unopened
        # and a read never sees end-of-file.
        self.fifo_fd = os.open(args.start_fifo, os.O_RDWR | os.O_CLOEXEC) if args.start_fifo else None

    def attach(self, timeout: float = 10.0) -> None:
        """Attach to agentd's io stream for this process."""
        from hanabi_agentd.iostream import IoStream

        self.stream = IoStream.attach(self.config.run_dir, self.args.sandbox, self.args.container,
                                      self.args.exec_id, timeout=timeout)

    def on_signal(self, signum: int, _frame: object) -> None:
        """Queue a signal for the main loop to forward."""
        if not self.started:
            # Nothing runs in the guest yet: the signal ends the stand-in, as it would the process.
            os._exit(128 + signum)
        self.pending_signals.append(signum)
        try:
            os.write(self.wake_w, b"s")
        except OSError:
            pass

    def forward_signals(self) -> None:
        """Send queued signals to the process in the VM."""
        while self.pending_signals:
            signum = self.pending_signals.pop(0)
            try:
                from hanabi_agentd.client import AgentdClient
                AgentdClient(self.config).signal(self.args.sandbox, self.args.container, signum,
                                                 exec_id=self.args.exec_id)
            except Exception as exc:  # the process may be gone already
                _warn(f"could not forward signal {signum}: {exc}")

    def wait_for_start(self) -> None:
        """Block until `start` writes to the fifo."""
        while not os.read(self.fifo_fd, 1):
            pass
        os.close(self.fifo_fd)
        self.started = True

    def relay(self) -> int:
        """Relay until the process exits; return its status."""
        stdin_open = True
        try:
            os.fstat(0)
        except OSError:
            stdin_open = False
        while True:
            watched = [self.stream.fileno(), self.wake_r] + ([0] if stdin_open else [])
            try:
                readable, _, _ = select.select(watched, [], [])
            except InterruptedError:
                continue
            if self.wake_r in readable:
                os.read(self.wake_r, 4096)
                self.forward_signals()
            if 0 in readable:
                stdin_open = self._pump_stdin()
            if self.stream.fileno() in readable:
                status = self._pump_events()
                if status is not None:
                    return status

    def _pump_stdin(self) -> bool:
        try:
            data = os.read(0, READ_CHUNK)
        except OSError:
            data = b""
        if data:
            self.stream.send_stdin(data)
            return True
        self.stream.close_stdin()
        return False

    def _pump_events(self) -> int | None:
        try:
            events = self.stream.read_events()
        except (ConnectionError, OSError, EOFError) as exc:
            return self._reattach(exc)
        for event in events:
            kind = event.get("type")
            if kind == "output":
                _write_all(1 if event.get("stream") == "stdout" else 2, event["data"])
            elif kind == "exit":
                if event.get("signal"):
                    return 128 + int(event["signal"])
                return int(event.get("exit_code") or 0)
        return None

    def _reattach(self, exc: Exception) -> int | None:
        """agentd went away (a restart): attach again, or give up with status 255."""
        try:
            self.stream.close()
        except OSError:
            pass
        try:
            self.attach(timeout=REATTACH_TIMEOUT_S)
        except Exception as again:
            _warn(f"lost the container's io stream ({exc}) and could not attach again: {again}")
            return 255
        return None


def _write_all(fd: int, data: bytes) -> None:
    """Write container output to our stdio; a closed reader is not our problem."""
    if isinstance(data, str):
        from hanabi_guest.protocol import b64d
        data = b64d(data)
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except BlockingIOError:
            select.select([], [fd], [])
            continue
        except OSError as exc:
            if exc.errno in (errno.EPIPE, errno.EBADF):
                return
            raise
        view = view[written:]


def _warn(message: str) -> None:
    try:
        os.write(2, f"hanabi stand-in: {message}\n".encode())
    except OSError:
        pass


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="hanabi-standin")
    parser.add_argument("--sandbox", required=True)
    parser.add_argument("--container", required=True)
    parser.add_argument("--exec-id", default="init")
    parser.add_argument("--ready-fd", type=int, required=True)
    parser.add_argument("--start-fifo")
    parser.add_argument("--config")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point: attach, report readiness, wait for start, relay, exit with the status."""
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    args = _parse(sys.argv[1:] if argv is None else argv)
    try:
        standin = StandIn(args)
        for signum in FORWARDED_SIGNALS:
            signal.signal(signum, standin.on_signal)
        standin.attach()
    except Exception as exc:
        os.write(args.ready_fd, f"error: {exc}\n".encode())
        return 1
    os.write(args.ready_fd, b"ok\n")
    os.close(args.ready_fd)
    if not standin.started:
        standin.wait_for_start()
    return standin.relay()


if __name__ == "__main__":
    sys.exit(main())
