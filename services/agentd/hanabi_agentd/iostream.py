"""Client side of agentd's io socket, for the per-container host stand-in process.

Import-light on purpose (stdlib and `hanabi_wire` only): it runs in a fresh
Python process per container. Typical use by the stand-in::

    stream = IoStream.attach(run_dir, sandbox_id, container_id, "init", timeout=10)
    status = stream.relay(0, 1, 2)        # stdin -> guest, guest stdout/stderr -> fds
    os._exit(status)                       # exit code, or 128+signal, 255 if unknown

or by hand: `send_stdin`, `close_stdin`, `resize`, select on `fileno()`, `read_events()`.
Events are validated dicts: `{"type":"output","stream":"stdout"|"stderr","data":bytes,"seq":int|None}`
(chunks whose `seq` is not above the last one seen, replays after an agentd restart, are left out)
and `{"type":"exit","exit_code":int|None,"signal":int|None}`; after the exit the server
closes the connection. `read_events()` raises EOFError when the connection ended without
an exit (agentd went away: attach again, buffered output and the exit are kept for you).
The container's OOM kills (`{"type":"oom","oom_kills":N}` from agentd, N growing) are not
returned: `on_oom(N)` is called for each growth, in order with the other events.
"""

from __future__ import annotations

import collections
import os
import select
import socket
import threading
import time
from pathlib import Path
from collections.abc import Callable

from hanabi_wire import (HEADER, INIT_EXEC_ID, MAX_DATA_CHUNK, MAX_FRAME, MAX_SIGNAL, MAX_TTY_DIM,
                         STDIN_REPLAY_BYTES, FrameDecoder, ProtocolError, b64d, b64e, encode_frame)

IO_SOCKET_NAME = "agentd-io.sock"
UNKNOWN_STATUS = 255
# How long a stand-in keeps trying to re-attach after agentd went away: a stand-in that
# gives up ends the container for Docker, so this outlasts any restart systemd makes.
REATTACH_TIMEOUT_S = 600.0
REATTACH_FIRST_DELAY_S = 0.05
REATTACH_MAX_DELAY_S = 1.0
ATTACH_ATTEMPT_S = 30.0
RETRYABLE = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED"})


class IoError(Exception):
    """agentd refused the attach, or the io stream broke its protocol."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def exit_status(event: dict) -> int:
    """Shell-style status of an exit event: code, 128+signal, or 255 when unknown."""
    if event.get("signal") is not None:
        return 128 + int(event["signal"])
    if event.get("exit_code") is not None:
        return int(event["exit_code"])
    return UNKNOWN_STATUS


def _int_or_none(value: object, low: int, high: int) -> int | None:
    if value is None:
        return None
    if type(value) is not int or not low <= value <= high:
        raise IoError("INVALID_ARGUMENT", f"bad exit field {value!r}")
    return value


def _validate(msg: dict) -> dict:
    kind = msg.get("type")
    if kind == "output":
        stream = msg.get("stream")
        if stream not in ("stdout", "stderr"):
            raise IoError("INVALID_ARGUMENT", f"bad output stream {stream!r}")
        try:
            data = b64d(msg.get("data"))  # type: ignore[arg-type]  # a non-str raises ProtocolError, handled below
        except ProtocolError as exc:
            raise IoError("INVALID_ARGUMENT", str(exc)) from None
        seq = msg.get("seq")
        if seq is not None and (type(seq) is not int or seq < 1):
            raise IoError("INVALID_ARGUMENT", f"bad output seq {seq!r}")
        return {"type": "output", "stream": stream, "data": data, "seq": seq}
    if kind == "exit":
        return {"type": "exit", "exit_code": _int_or_none(msg.get("exit_code"), 0, 255),
                "signal": _int_or_none(msg.get("signal"), 1, MAX_SIGNAL)}
    if kind == "oom":
        count = msg.get("oom_kills")
        if type(count) is not int or not 1 <= count < 1 << 63:
            raise IoError("INVALID_ARGUMENT", f"bad oom count {count!r}")
        return {"type": "oom", "oom_kills": count}
    if kind == "error":
        raise IoError(str(msg.get("code", "INTERNAL"))[:64], str(msg.get("message", ""))[:1000])
    raise IoError("INVALID_ARGUMENT", f"unexpected io message type {str(kind)[:32]!r}")


class IoStream:
    """One attached io connection to a container process."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._decoder = FrameDecoder(sync=False)
        self._send_lock = threading.Lock()
        self._attached = threading.Condition()
        self._attachments = 0  # how many times reattach() replaced the connection
        self.exited: dict | None = None
        self.last_seq = 0  # of the last output chunk handed out (kept across re-attaches)
        self._stdin_next = 0  # offset of the next stdin byte sent
        self._stdin_kept: collections.deque[tuple[int, bytes]] = collections.deque()  # (offset, chunk)
        self._stdin_kept_bytes = 0
        self._stdin_closed = False
        self._target: tuple[str, str, str, str] | None = None
        self.oom_kills = 0  # the container's OOM kill count last handed out
        # Called (in the reading thread, before any later event is handed out) when the
        # container's OOM kill count grew: the stand-in makes the host see the OOM.
        self.on_oom: Callable[[int], None] | None = None

    @classmethod
    def attach(cls, run_dir: str | os.PathLike, sandbox_id: str, container_id: str,
               exec_id: str = INIT_EXEC_ID, timeout: float = 10.0) -> IoStream:
        """Connect to agentd's io socket (retrying while it is not there) and attach."""
        path = str(Path(run_dir) / IO_SOCKET_NAME)
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                sock.settimeout(max(deadline - time.monotonic(), 0.01))
                sock.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                sock.close()
                if time.monotonic() >= deadline:
                    raise IoError("UNAVAILABLE", f"agentd io socket {path}: {exc}") from None
                time.sleep(0.1)
            except OSError:
                sock.close()
                raise
        try:
            sock.sendall(encode_frame({"type": "attach", "sandbox_id": sandbox_id,
                                       "container_id": container_id, "exec_id": exec_id}))
            # Read exactly the answer frame: what follows stays in the socket, so a caller
            # that selects on fileno() sees it as readable.
            sock.settimeout(max(deadline - time.monotonic(), 0.01))
            header = _recv_exact(sock, HEADER.size)
            (length,) = HEADER.unpack(header)
            if not 0 < length <= MAX_FRAME:
                raise ProtocolError(f"bad frame length {length}")
            first = FrameDecoder(sync=False).feed(header + _recv_exact(sock, length))[0]
            if first.get("type") != "attached":
                _validate(first)  # raises IoError for {"type":"error"} and garbage alike
                raise IoError("INVALID_ARGUMENT", "agentd did not confirm the attach")
            sock.settimeout(None)
        except TimeoutError:
            sock.close()
            raise IoError("DEADLINE_EXCEEDED", f"agentd did not answer the attach within {timeout}s") from None
        except ProtocolError as exc:
            sock.close()
            raise IoError("INVALID_ARGUMENT", f"agentd broke the io protocol: {exc}") from None
        except BaseException:
            sock.close()
            raise
        stream = cls(sock)
        stream._target = (str(run_dir), sandbox_id, container_id, exec_id)
        return stream

    def fileno(self) -> int:
        """The socket, for select/poll: readable means read_events() will not block."""
        return self._sock.fileno()

    def send_stdin(self, data: bytes) -> None:
        """Send bytes to the process's stdin (split into protocol-sized chunks), each with
        its offset in the stream, and keep the last STDIN_REPLAY_BYTES of them: `reattach`
        sends those again (the guest drops what it had), so an OSError here needs no retry."""
        view = memoryview(data)
        with self._send_lock:
            for start in range(0, len(view), MAX_DATA_CHUNK):
                chunk = bytes(view[start:start + MAX_DATA_CHUNK])
                self._keep_stdin(chunk)
                self._sock.sendall(_stdin_frame(self._stdin_kept[-1]))

    def _keep_stdin(self, chunk: bytes) -> None:
        self._stdin_kept.append((self._stdin_next, chunk))
        self._stdin_next += len(chunk)
        self._stdin_kept_bytes += len(chunk)
        while self._stdin_kept_bytes > STDIN_REPLAY_BYTES and len(self._stdin_kept) > 1:
            self._stdin_kept_bytes -= len(self._stdin_kept.popleft()[1])

    def close_stdin(self) -> None:
        """Signal end of input to the process (said again by `reattach`, like the stdin)."""
        with self._send_lock:
            self._stdin_closed = True
            self._sock.sendall(encode_frame({"type": "close_stdin"}))

    def resize(self, height: int, width: int) -> None:
        """Set the window size (rows, columns) of the process's terminal (terminal: true).
        ValueError unless both are integers in 1..65535."""
        for name, value in (("height", height), ("width", width)):
            if type(value) is not int or not 1 <= value <= MAX_TTY_DIM:
                raise ValueError(f"terminal {name} must be an integer in 1..{MAX_TTY_DIM}, not {value!r}")
        with self._send_lock:
            self._sock.sendall(encode_frame({"type": "resize", "height": height, "width": width}))

    def read_events(self) -> list[dict]:
        """Read once (blocking) and return the validated events completed by it;
        EOFError when agentd closed the connection without an exit event."""
        data = self._sock.recv(65536)
        if not data:
            raise EOFError("agentd closed the io connection")
        try:
            events = [_validate(m) for m in self._decoder.feed(data)]
        except ProtocolError as exc:
            raise IoError("INVALID_ARGUMENT", f"agentd broke the io protocol: {exc}") from None
        fresh = []
        for event in events:
            if event["type"] == "oom":
                if event["oom_kills"] > self.oom_kills:  # a repeat after a re-attach: had it
                    self.oom_kills = event["oom_kills"]
                    if self.on_oom is not None:
                        self.on_oom(event["oom_kills"])
                continue
            if event["type"] == "exit":
                self.exited = event
            elif event["seq"] is not None:
                if event["seq"] <= self.last_seq:
                    continue  # replayed after agentd restarted: had it already
                self.last_seq = event["seq"]
            fresh.append(event)
        return fresh

    def reattach(self, timeout: float) -> None:
        """Attach again on a fresh connection (after agentd restarted), with backoff:
        while agentd is away or busy restoring (UNAVAILABLE, DEADLINE_EXCEEDED, a reset
        connection) try again until `timeout`; any other refusal (NOT_FOUND: agentd came
        back without this process) is final. Raises IoError when it gives up."""
        if self._target is None:
            raise IoError("FAILED_PRECONDITION", "this stream was not made by attach()")
        deadline = time.monotonic() + timeout
        delay = REATTACH_FIRST_DELAY_S
        while True:
            left = deadline - time.monotonic()
            try:
                fresh = IoStream.attach(*self._target, timeout=max(min(left, ATTACH_ATTEMPT_S), 0.05))
                break
            except IoError as exc:
                if exc.code not in RETRYABLE or time.monotonic() + delay >= deadline:
                    raise
            except OSError as exc:
                if time.monotonic() + delay >= deadline:
                    raise IoError("UNAVAILABLE", f"agentd io socket: {exc}") from None
            time.sleep(delay)  # backoff between attempts, not a wait for an event
            delay = min(delay * 2, REATTACH_MAX_DELAY_S)
        with self._send_lock:
            old, self._sock = self._sock, fresh._sock
            self._decoder = fresh._decoder
            self._resend_stdin()
        old.close()
        with self._attached:
            self._attachments += 1
            self._attached.notify_all()

    def _resend_stdin(self) -> None:
        """What the last agentd may have lost of the stdin: the kept chunks, and the close
        (the next read_events finds a connection that broke again)."""
        try:
            for kept in self._stdin_kept:
                self._sock.sendall(_stdin_frame(kept))
            if self._stdin_closed:
                self._sock.sendall(encode_frame({"type": "close_stdin"}))
        except OSError:
            pass

    def relay(self, stdin_fd: int | None, stdout_fd: int, stderr_fd: int,
              reattach_timeout: float = REATTACH_TIMEOUT_S) -> int:
        """Relay stdio until the process exits; returns its shell-style exit status.
        stdin is pumped by a helper thread (None: close the process's stdin at once).
        If agentd goes away, attach again for up to `reattach_timeout` seconds; when that
        fails, return 255 (status unknown)."""
        if stdin_fd is None:
            self.close_stdin()
        else:
            threading.Thread(target=self._pump_stdin, args=(stdin_fd,), daemon=True).start()
        targets = {"stdout": stdout_fd, "stderr": stderr_fd}
        while True:
            try:
                events = self.read_events()
            except (EOFError, OSError, IoError):  # agentd went away (or broke the stream)
                try:
                    self.reattach(reattach_timeout)
                except IoError as exc:
                    _warn(f"lost agentd and could not attach again ({exc}); exit status unknown")
                    return UNKNOWN_STATUS
                continue
            for event in events:
                if event["type"] == "output":
                    _write_all(targets[event["stream"]], event["data"])
                else:
                    return exit_status(event)

    def _pump_stdin(self, fd: int) -> None:
        try:
            while chunk := os.read(fd, MAX_DATA_CHUNK):
                self._send_or_await_reattach(self.send_stdin, chunk)
            self._send_or_await_reattach(self.close_stdin)
        except OSError:
            pass

    def _send_or_await_reattach(self, send, *args) -> None:
        """Send; while agentd is away, wait until relay() attached again, which sends it
        again itself (stdin and its close are kept for that), or the process exited."""
        seen = self._attachments
        try:
            return send(*args)
        except OSError:
            deadline = time.monotonic() + REATTACH_TIMEOUT_S
            with self._attached:
                while self._attachments == seen and self.exited is None:
                    if time.monotonic() > deadline:
                        raise
                    self._attached.wait(timeout=max(min(deadline - time.monotonic(), 5.0), 0))

    def close(self) -> None:
        """Drop the connection (the process keeps running; attach again later)."""
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()

    def __enter__(self) -> IoStream:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def _stdin_frame(kept: tuple[int, bytes]) -> bytes:
    offset, chunk = kept
    return encode_frame({"type": "stdin", "data": b64e(chunk), "offset": offset})


def _warn(message: str) -> None:
    try:
        os.write(2, f"hanabi stand-in: {message}\n".encode())
    except OSError:
        pass


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    buf = bytearray()
    while len(buf) < size:
        chunk = sock.recv(size - len(buf))
        if not chunk:
            raise IoError("UNAVAILABLE", "agentd closed the io connection during attach")
        buf += chunk
    return bytes(buf)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except BlockingIOError:  # a non-blocking fd from our caller: wait until it drains
            select.select([], [fd], [])
            continue
        except OSError:
            # EPIPE, or EIO from a pty whose master side was closed: nobody reads that
            # stream any more; keep relaying the rest (the exit status still matters).
            return
        view = view[written:]
