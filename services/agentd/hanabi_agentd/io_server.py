"""The io socket: where each container's host stand-in process gets its stdio relayed.

`<run_dir>/agentd-io.sock` (mode 0600) speaks the agent framing (`hanabi_wire`).
A client first sends `{"type":"attach","sandbox_id","container_id","exec_id"}` and gets
`{"type":"attached"}` or `{"type":"error","code","message"}`. Then it may send
`{"type":"stdin","data":b64[,"offset":N]}`, `{"type":"close_stdin"}` and, for a process on a terminal,
`{"type":"resize","height":H,"width":W}` (strict integers 1..65535, passed on to the
guest's `resize`); the server sends
`{"type":"output","stream","data"[,"seq"]}` for every chunk (`seq`: the guest's counter,
increasing; a client that attaches again drops what it had by it), to the init's client
`{"type":"oom","oom_kills":N}` when the guest's OOM killer ended a process of the container
(N: the container's count so far; before the exit of the process it killed), and finally
`{"type":"exit","exit_code","signal"}`, after which it closes the connection.
One client per process at a time; a client that comes back (say after an agentd restart)
attaches again and gets whatever is buffered. Each client gets two threads: a reader
(stdin towards the guest) and a writer (output and exit towards the client).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from pathlib import Path
from typing import Annotated, Any, Literal
from collections.abc import Callable

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from hanabi_common.errors import HanabiError, InvalidArgument
from hanabi_wire import (INIT_EXEC_ID, T_CLOSE_STDIN, T_RESIZE, T_STDIN, FrameDecoder, ProtocolError, b64e,
                         encode_frame)

from hanabi_agentd.guest_messages import ID_REGEX, Data
from hanabi_agentd.models import TtyDim
from hanabi_agentd.process import ExitEvent, OomEvent, OutputEvent, ProcessRecord

log = logging.getLogger("hanabi.agentd.io")
IO_SOCKET_NAME = "agentd-io.sock"
HANDSHAKE_TIMEOUT_S = 10.0
# How long an io client's writer waits on its process record between looks at whether it is
# still attached. Everything it waits for (output, OOM, the exit, a detach, close) notifies
# the record, so this is only a safety net: long, so an idle container's writer does not
# wake agentd every second (issue 14: idle host CPU).
WAIT_SLICE_S = 30.0
# Stdin that came before the start waits in slices of this for the process to run (a close
# does not wake that wait; it lasts only until the start).
START_WAIT_SLICE_S = 1.0

# (session, record) for an attach request; raises HanabiError when there is no such process.
Resolver = Callable[[str, str, str], tuple[Any, ProcessRecord]]


class _ClientMsg(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class Attach(_ClientMsg):
    """The first message of a client."""

    type: Literal["attach"]
    sandbox_id: Annotated[str, Field(pattern=ID_REGEX)]
    container_id: Annotated[str, Field(pattern=ID_REGEX)]
    exec_id: Annotated[str, Field(pattern=ID_REGEX)] = INIT_EXEC_ID


class Stdin(_ClientMsg):
    """Bytes for the process's stdin."""

    type: Literal["stdin"]
    data: Data
    offset: Annotated[int, Field(ge=0, le=1 << 62)] | None = None  # where data starts in the stream


class CloseStdin(_ClientMsg):
    """End of the process's stdin."""

    type: Literal["close_stdin"]


class Resize(_ClientMsg):
    """New window size of the process's terminal (rows, columns)."""

    type: Literal["resize"]
    height: TtyDim
    width: TtyDim


_CLIENT: TypeAdapter[Stdin | CloseStdin | Resize] = TypeAdapter(Annotated[Stdin | CloseStdin | Resize, Field(discriminator="type")])


def io_socket_path(run_dir: Path) -> Path:
    """Where the io socket lives."""
    return Path(run_dir) / IO_SOCKET_NAME


class IoServer:
    """Accepts io clients and wires each to one process record."""

    def __init__(self, path: Path, resolve: Resolver) -> None:
        self.path = Path(path)
        self._resolve = resolve
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._clients: set[_IoClient] = set()
        self._lock = threading.Lock()
        self._stopping = threading.Event()

    def start(self) -> None:
        """Bind (mode 0600) and accept in a background thread."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)
        try:
            sock.bind(str(self.path))
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        sock.listen(64)
        self._sock = sock
        self._thread = threading.Thread(target=self._accept_loop, name="agentd-io", daemon=True)
        self._thread.start()
        log.info("io socket ready", extra={"path": str(self.path)})

    def stop(self) -> None:
        """Stop accepting, disconnect every client, remove the socket file."""
        self._stopping.set()
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        with self._lock:
            clients = list(self._clients)
        for client in clients:
            client.close()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
        self.path.unlink(missing_ok=True)

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            sock = self._sock
            if sock is None:
                return
            try:
                conn, _ = sock.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                continue
            client = _IoClient(conn, self)
            with self._lock:
                self._clients.add(client)
            threading.Thread(target=client.serve, name="agentd-io-client", daemon=True).start()

    def _forget(self, client: _IoClient) -> None:
        with self._lock:
            self._clients.discard(client)


class _IoClient:
    """One connected stand-in."""

    def __init__(self, conn: socket.socket, server: IoServer) -> None:
        self.conn = conn
        self.server = server
        self.decoder = FrameDecoder(sync=False)
        self.record: ProcessRecord | None = None
        self.session: Any = None
        self._send_lock = threading.Lock()
        self._closed = threading.Event()

    def close(self) -> None:
        """Drop the connection; both threads end."""
        if self._closed.is_set():
            return
        self._closed.set()
        try:
            self.conn.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        if self.record is not None:
            self.record.detach(self)

    def _send(self, msg: dict[str, Any]) -> bool:
        try:
            with self._send_lock:
                self.conn.sendall(encode_frame(msg))
            return True
        except OSError:
            return False

    def _error(self, code: str, message: str) -> None:
        self._send({"type": "error", "code": code, "message": message[:1000]})

    def _next_messages(self) -> list[dict[str, Any]] | None:
        """Block for the next batch of frames; None at EOF."""
        while True:
            data = self.conn.recv(65536)
            if not data:
                return None
            messages = self.decoder.feed(data)
            if messages:
                return messages

    def serve(self) -> None:
        """Handshake, then relay stdin until the client goes away."""
        try:
            self.conn.settimeout(HANDSHAKE_TIMEOUT_S)
            first = self._next_messages()
            if first is None:
                return
            self.conn.settimeout(None)
            if not self._handshake(first[0]):
                return
            writer = threading.Thread(target=self._write_loop, name="agentd-io-writer", daemon=True)
            writer.start()
            for msg in first[1:]:
                self._handle(msg)
            while not self._closed.is_set():
                batch = self._next_messages()
                if batch is None:
                    break
                for msg in batch:
                    self._handle(msg)
        except ProtocolError as exc:
            log.warning("io client broke the framing", extra={"reason": str(exc)[:200]})
            self._error("INVALID_ARGUMENT", f"protocol error: {exc}")
        except InvalidArgument as exc:
            log.warning("io client sent an invalid message", extra={"reason": exc.message[:200]})
            self._error("INVALID_ARGUMENT", exc.message)
        except (TimeoutError, OSError):
            pass
        finally:
            self.close()
            self.conn.close()
            self.server._forget(self)

    def _handshake(self, msg: dict[str, Any]) -> bool:
        try:
            attach = Attach.model_validate(msg)
        except ValidationError as exc:
            raise InvalidArgument(f"expected an attach message: {_short(exc)}") from None
        try:
            session, record = self.server._resolve(attach.sandbox_id, attach.container_id, attach.exec_id)
        except HanabiError as exc:
            self._error(exc.code.value, exc.message)
            return False
        if not record.attach(self):
            self._error("ALREADY_EXISTS", f"process {attach.container_id}/{attach.exec_id} "
                                          "already has an io client")
            return False
        self.session, self.record = session, record
        if not self._send({"type": "attached"}):
            record.detach(self)
            return False
        log.debug("io client attached", extra={"sandbox": attach.sandbox_id,
                                               "container": attach.container_id, "exec": attach.exec_id})
        return True

    def _handle(self, raw: dict[str, Any]) -> None:
        try:
            msg = _CLIENT.validate_python(raw)
        except ValidationError as exc:
            raise InvalidArgument(f"invalid io message: {_short(exc)}") from None
        record = self.record
        assert record is not None
        # stdin is held back until the process runs: the guest has no pipe for it before.
        while not record.wait_started(START_WAIT_SLICE_S):
            if self._closed.is_set():
                return
        if record.status == "stopped":
            return
        fields = {"container_id": record.container_id, "exec_id": record.exec_id}
        try:
            if isinstance(msg, Stdin):
                if msg.data:
                    offset = {} if msg.offset is None else {"offset": msg.offset}
                    self.session.send_event(T_STDIN, {**fields, "data": msg.data, **offset})  # a data frame
            elif isinstance(msg, Resize):
                self.session.request(T_RESIZE, {**fields, "height": msg.height, "width": msg.width})
            else:
                self.session.request(T_CLOSE_STDIN, fields)
        except HanabiError as exc:
            log.debug(f"{msg.type} not delivered", extra={"container": record.container_id,
                                                          "exec": record.exec_id, "error": exc.message})

    def _write_loop(self) -> None:
        record = self.record
        assert record is not None
        while not self._closed.is_set():
            event = record.next_event(self, WAIT_SLICE_S)
            if event is None:
                if not record.is_attached(self):
                    return
                continue
            if isinstance(event, OutputEvent):
                out: dict[str, Any] = {"type": "output", "stream": event.stream, "data": b64e(event.data)}
                if event.seq is not None:
                    out["seq"] = event.seq
                if not self._send(out):
                    record.unread(event)
                    self.close()
                    return
            elif isinstance(event, OomEvent):
                if not self._send({"type": "oom", "oom_kills": event.oom_kills}):
                    self.close()
                    return
            elif isinstance(event, ExitEvent):
                self._send({"type": "exit", "exit_code": event.exit_code, "signal": event.signal})
                self.close()
                return


def _short(exc: ValidationError) -> str:
    err = exc.errors(include_url=False, include_input=False)[0]
    where = ".".join(str(p) for p in err["loc"]) or "message"
    return f"{where}: {err['msg']}"
