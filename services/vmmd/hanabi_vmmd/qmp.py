"""A small synchronous QMP (QEMU Machine Protocol) client over a Unix socket.

QMP is line-delimited JSON: QEMU greets with `{"QMP": {...}}`, the client leaves
capabilities negotiation with `qmp_capabilities`, then sends `{"execute", "arguments",
"id"}` and gets `{"return"}` or `{"error": {"class", "desc"}}` back with the same id;
asynchronous `{"event", "data", "timestamp"}` messages may arrive at any point and are
collected in `events` for `wait_event`. Every read has a deadline and a size limit (QEMU
runs next to an untrusted guest). QMP errors become typed hanabi errors.
"""

from __future__ import annotations

import itertools
import json
import socket
import time
from pathlib import Path
from typing import Any
from collections.abc import Callable

from hanabi_common.errors import (DeadlineExceeded, FailedPrecondition, HanabiError, Internal,
                                  NotFound, Unavailable)

MAX_LINE = 1 << 20
_ids = itertools.count(1)


def qmp_error(command: str, error: object) -> HanabiError:
    """The hanabi error for a QMP error reply to `command`."""
    if not isinstance(error, dict):
        error = {"class": "GenericError", "desc": str(error)}
    cls = str(error.get("class", "GenericError"))
    desc = str(error.get("desc", "no description"))[:1000]
    details = {"qmp_class": cls, "command": command}
    message = f"QEMU refused {command}: {desc}"
    if cls == "DeviceNotFound":
        return NotFound(message, details=details)
    if cls in ("CommandNotFound", "MigrationExpected"):
        return Internal(message, details=details)
    if cls == "KVMMissingCap":
        return Unavailable(message, details=details)
    return FailedPrecondition(message, details=details)


class QmpClient:
    """One QMP session; use as a context manager (`with QmpClient(path) as qmp:`)."""

    def __init__(self, path: str | Path, timeout: float = 5.0, max_line: int = MAX_LINE) -> None:
        self.path = str(path)
        self.timeout = timeout
        self.max_line = max_line
        self.greeting: dict = {}
        self.events: list[dict] = []
        self._sock: socket.socket | None = None
        self._buf = bytearray()

    def __enter__(self) -> QmpClient:
        self.connect()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def connect(self, timeout: float | None = None) -> dict:
        """Connect, read the greeting and negotiate capabilities; return the greeting."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        try:
            sock.connect(self.path)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            raise Unavailable(f"QMP socket {self.path} is not accepting connections: {exc.strerror}") from None
        except TimeoutError:
            sock.close()
            raise DeadlineExceeded(f"QMP socket {self.path} did not accept within the timeout") from None
        except OSError as exc:
            sock.close()
            raise Unavailable(f"cannot connect to QMP socket {self.path}: {exc}") from None
        self._sock = sock
        try:
            message = self._read(deadline)
            if "QMP" not in message:
                raise Internal(f"QMP socket {self.path} sent no greeting: {str(message)[:200]}")
            self.greeting = message
            self._execute("qmp_capabilities", None, deadline)
        except BaseException:
            self.close()
            raise
        return self.greeting

    def close(self) -> None:
        """Close the session (QEMU keeps running)."""
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None

    def execute(self, command: str, arguments: dict | None = None, timeout: float | None = None) -> Any:
        """Run one command; return its `return` value or raise the mapped hanabi error."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        return self._execute(command, arguments, deadline)

    def execute_with_fd(self, command: str, arguments: dict, fd: int, timeout: float | None = None) -> Any:
        """Run one command with `fd` passed alongside (SCM_RIGHTS), as `getfd` needs."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        return self._execute(command, arguments, deadline, fd=fd)

    def wait_event(self, name: str, timeout: float,
                   match: Callable[[dict], bool] | None = None) -> dict:
        """Wait for (or find among those already received) an event; consume and return it."""
        deadline = time.monotonic() + timeout
        while True:
            for index, event in enumerate(self.events):
                if event.get("event") == name and (match is None or match(event.get("data") or {})):
                    return self.events.pop(index)
            self.events.append(self._read(deadline, expect="event " + name))

    def _execute(self, command: str, arguments: dict | None, deadline: float, fd: int | None = None) -> Any:
        request_id = f"hanabi-{next(_ids)}"
        message: dict[str, Any] = {"execute": command, "id": request_id}
        if arguments:
            message["arguments"] = arguments
        self._send(message, fd)
        while True:
            reply = self._read(deadline, expect=f"the reply to {command}")
            if "event" in reply:
                self.events.append(reply)
                continue
            if reply.get("id", request_id) != request_id:
                continue  # the answer to a command whose caller gave up
            if "error" in reply:
                raise qmp_error(command, reply["error"])
            if "return" in reply:
                return reply["return"]
            raise Internal(f"unexpected QMP message to {command}: {str(reply)[:200]}")

    def _send(self, message: dict, fd: int | None = None) -> None:
        if self._sock is None:
            raise Unavailable(f"QMP session to {self.path} is closed")
        data = json.dumps(message).encode() + b"\n"
        try:
            if fd is not None:  # the fd rides on the first byte; QEMU takes it with the command
                socket.send_fds(self._sock, [data[:1]], [fd])
                data = data[1:]
            self._sock.sendall(data)
        except OSError as exc:
            raise Unavailable(f"QMP socket {self.path} failed: {exc}") from None

    def _read(self, deadline: float, expect: str = "the QMP greeting") -> dict:
        if self._sock is None:
            raise Unavailable(f"QMP session to {self.path} is closed")
        while True:
            newline = self._buf.find(b"\n")
            if newline >= 0:
                line = bytes(self._buf[:newline])
                del self._buf[:newline + 1]
                if not line.strip():
                    continue
                try:
                    message = json.loads(line)
                except (ValueError, UnicodeDecodeError):
                    raise Internal(f"QMP socket {self.path} sent invalid JSON: {line[:200]!r}") from None
                if not isinstance(message, dict):
                    raise Internal(f"QMP socket {self.path} sent a non-object: {line[:200]!r}")
                return message
            if len(self._buf) > self.max_line:
                raise Internal(f"QMP socket {self.path} sent a line over {self.max_line} bytes")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DeadlineExceeded(f"QEMU did not send {expect} in time (QMP {self.path})")
            self._sock.settimeout(remaining)
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                raise DeadlineExceeded(f"QEMU did not send {expect} in time (QMP {self.path})") from None
            except OSError as exc:
                raise Unavailable(f"QMP socket {self.path} failed: {exc}") from None
            if not chunk:
                raise Unavailable(f"QEMU closed the QMP connection while waiting for {expect}")
            self._buf += chunk
