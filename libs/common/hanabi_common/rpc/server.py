"""The RPC server: one ROUTER socket, handlers run on a thread pool, replies sent by the loop.

Only the loop thread touches the ROUTER socket. Workers hand finished replies back through
a queue and wake the loop with a pipe. Anything a peer sends that is not a valid request
(garbage frames, an unknown method, an oversized message, a body that fails its model)
gets an error reply; the server never dies of it. Every call a worker runs is recorded in
`progress` (with the caller's deadline), and the loop keeps a no-op canary queued for the
pool: the daemon's watchdog is fed from that (`progress.Watchdog`), not from the loop turning.
A handler sees the call it serves (the caller's deadline included) through `current_call()`;
what it hands to `after_reply` the loop runs once it has sent the reply.
Methods are registered from the daemon's declared table (`rpc.contract`), which also names
each one's reply model: a handler's result is checked against it before it is sent.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from collections.abc import Callable

import zmq
from pydantic import BaseModel, ValidationError

from hanabi_common.errors import (DeadlineExceeded, HanabiError, Internal, InvalidArgument,
                                  NotFound)
from hanabi_common.rpc.context import CallContext, after_reply, current_call, serving, within_deadline
from hanabi_common.rpc.envelope import RequestHeader, decode_request, encode_reply
from hanabi_common.rpc.progress import Progress

log = logging.getLogger("hanabi.rpc")

Handler = Callable[[Any], Any]
__all__ = ["CallContext", "Method", "RpcServer", "after_reply", "current_call", "within_deadline"]
Reply = tuple[list[bytes], list[Callable[[], None]]]  # frames, what to run once they are sent


@dataclass(frozen=True)
class Method:
    """One registered RPC method."""

    name: str
    request: type[BaseModel]
    handler: Handler
    doc: str
    reply: type[BaseModel] | None = None
    idempotent: bool = False


class RpcServer:
    """A daemon's RPC endpoint: register methods, then `serve_forever` until `stop`."""

    def __init__(self, name: str, endpoint: str, *, max_message_bytes: int = 4 << 20,
                 workers: int = 8, on_tick: Callable[[], None] | None = None,
                 on_call: Callable[[str, str, float], None] | None = None,
                 stall_s: float = 30.0) -> None:
        self.name = name
        self._on_call = on_call  # (method, outcome, seconds) of every request served
        self.endpoint = endpoint
        self.max_message_bytes = max_message_bytes
        self._methods: dict[str, Method] = {}
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"{name}-rpc")
        self._replies: queue.Queue[Reply] = queue.Queue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._stopping = threading.Event()
        self._on_tick = on_tick
        self.progress = Progress(stall_s)
        self.started_at = time.time()
        self.register("ping", _Empty, self._ping, "Liveness: the daemon's name, pid and uptime.")
        self.register("describe", _Empty, self._describe, "The methods this daemon serves.")

    def register(self, name: str, request: type[BaseModel], handler: Handler, doc: str = "", *,
                 reply: type[BaseModel] | None = None, idempotent: bool = False) -> None:
        """Serve `name`: the body is validated as `request` and passed to `handler`; its
        result must fit `reply` when one is given (`Contract.register` gives it)."""
        self._methods[name] = Method(name, request, handler, doc or (handler.__doc__ or "").strip(),
                                     reply, idempotent)

    def _ping(self, _: BaseModel) -> dict:
        return {"daemon": self.name, "pid": os.getpid(), "uptime_s": round(time.time() - self.started_at, 3)}

    def _describe(self, _: BaseModel) -> dict:
        return {"methods": {m.name: m.doc for m in sorted(self._methods.values(), key=lambda m: m.name)}}

    def stop(self) -> None:
        """Ask the loop to finish (safe from signal handlers and other threads)."""
        self._stopping.set()
        try:
            os.write(self._wake_w, b"s")
        except OSError:
            pass

    def serve_forever(self, ready: Callable[[], None] | None = None) -> None:
        """Bind, call `ready`, and serve until `stop` is called."""
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        # Hard cap enforced by libzmq itself (the peer is disconnected above it); the
        # softer application limit below answers with an error instead.
        sock.setsockopt(zmq.MAXMSGSIZE, self.max_message_bytes * 4)
        if self.endpoint.startswith("ipc://"):
            path = Path(self.endpoint[len("ipc://"):])
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            path.unlink(missing_ok=True)
        sock.bind(self.endpoint)
        if self.endpoint.startswith("ipc://"):
            os.chmod(self.endpoint[len("ipc://"):], 0o600)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        log.info("serving", extra={"endpoint": self.endpoint})
        if ready:
            ready()
        try:
            while not self._stopping.is_set():
                events = dict(poller.poll(500))
                if sock in events:
                    self._receive(sock)
                if self._wake_r in events:
                    try:
                        os.read(self._wake_r, 4096)
                    except BlockingIOError:
                        pass
                self._flush_replies(sock)
                if self.progress.canary_due():
                    self._pool.submit(self.progress.canary_ran)
                if self._on_tick:
                    self._on_tick()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._flush_replies(sock)
            sock.close(0)
            if self.endpoint.startswith("ipc://"):
                Path(self.endpoint[len("ipc://"):]).unlink(missing_ok=True)
            log.info("stopped")

    def _flush_replies(self, sock: zmq.Socket) -> None:
        while True:
            try:
                frames, after = self._replies.get_nowait()
            except queue.Empty:
                return
            try:
                sock.send_multipart(frames, zmq.NOBLOCK)
            except zmq.ZMQError as exc:
                log.warning("could not send a reply", extra={"error": str(exc)})
            for fn in after:
                try:
                    fn()
                except Exception:  # a bug in one callback must not stop the loop
                    log.exception("after-reply callback failed")

    def _receive(self, sock: zmq.Socket) -> None:
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            identity, rest = frames[0], frames[1:]
            # A DEALER (or REQ) peer sends an empty delimiter first; keep it to answer in kind.
            routing = [identity, b""] if rest and rest[0] == b"" else [identity]
            if rest and rest[0] == b"":
                rest = rest[1:]
            try:
                header, body = decode_request(rest, self.max_message_bytes)
            except HanabiError as exc:
                log.warning("rejected a malformed request", extra={"error": exc.message})
                sock.send_multipart(routing + encode_reply("", error=exc))
                continue
            self._pool.submit(self._dispatch, routing, header, body)

    def _dispatch(self, routing: list[bytes], header: RequestHeader, body: dict) -> None:
        started = time.monotonic()
        token = self.progress.begin(header.method, header.deadline - time.time())
        error = ""
        after: list[Callable[[], None]] = []
        try:
            with serving(header) as ctx:
                after = ctx.after_reply
                result = self._call(header, body)
            frames = encode_reply(header.msg_id, result=result)
            outcome = "ok"
        except HanabiError as exc:
            frames = encode_reply(header.msg_id, error=exc)
            outcome, error = exc.code.value, exc.message[:300]
        except Exception as exc:  # a bug: report it, keep serving
            log.exception("handler failed", extra={"method": header.method})
            frames = encode_reply(header.msg_id, error=Internal(f"{type(exc).__name__}: {exc}"))
            outcome = "INTERNAL"
        finally:
            self.progress.end(token)
        elapsed = time.monotonic() - started
        self._replies.put((routing + frames, after))
        os.write(self._wake_w, b"r")  # the reply first: the log line and the metrics after it
        fields = {"method": header.method, "outcome": outcome, "ms": round(elapsed * 1000, 1)}
        log.debug("call", extra={**fields, "error": error} if error else fields)
        if self._on_call is not None:
            self._on_call(header.method if header.method in self._methods else "(unknown)", outcome, elapsed)

    def _call(self, header: RequestHeader, body: dict) -> dict:
        method = self._methods.get(header.method)
        if method is None:
            raise NotFound(f"{self.name} has no method {header.method!r}",
                           details={"known": sorted(self._methods)})
        if time.time() > header.deadline:
            raise DeadlineExceeded(f"request {header.method} arrived after its deadline")
        try:
            request = method.request.model_validate(body)
        except ValidationError as exc:
            raise InvalidArgument(f"invalid arguments for {header.method}: "
                                  f"{_summarize(exc)}") from None
        result = method.handler(request)
        if method.reply is not None and not isinstance(result, method.reply):
            result = method.reply.model_validate({} if result is None else result)
        if result is None:
            return {}
        if isinstance(result, BaseModel):
            return result.model_dump(mode="json")
        return dict(result)


def _summarize(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False)[:5]:
        where = ".".join(str(p) for p in err["loc"]) or "body"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


class _Empty(BaseModel):
    """No arguments."""
