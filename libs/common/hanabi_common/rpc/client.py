"""The RPC client: a fresh DEALER per call, a deadline on every call, typed errors back.

Following the ZeroMQ guide's Lazy Pirate pattern, a call that times out closes its socket
(linger 0) and, only when the method is idempotent, tries again within the same deadline.

A daemon that is down is told fast, not by a deadline: for an `ipc://` endpoint the client
first connects a plain Unix socket to the path (a daemon killed with SIGKILL leaves the
file behind, and ZeroMQ would queue the request for it forever), and while it waits for a
reply it looks again every `PROBE_INTERVAL_S`: nothing listening raises `Unavailable`
naming the daemon.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, TypeVar, overload

import zmq
from pydantic import BaseModel, ValidationError

from hanabi_common.errors import HanabiError, Internal
from hanabi_common.rpc.envelope import decode_reply, encode_request
from hanabi_common.rpc.wire import (attempt_share, attempts_for, default_sender, ipc_down, no_answer, not_running,
                                   reply_error)

R = TypeVar("R", bound=BaseModel)
PROBE_INTERVAL_S = 0.5


class RpcClient:
    """Calls one daemon's methods."""

    def __init__(self, name: str, endpoint: str, *, timeout: float = 30.0) -> None:
        self.name = name
        self.endpoint = endpoint
        self.timeout = timeout
        self.sender = default_sender()

    def _check_socket(self, during: str = "") -> None:
        """Unavailable (naming the daemon) unless something listens at an ipc endpoint."""
        if not self.endpoint.startswith("ipc://"):
            return
        path = self.endpoint[len("ipc://"):]
        why = f"no socket at {path}" if not Path(path).exists() else ipc_down(path)
        if why is not None:
            raise not_running(self.name, why, during)

    @overload
    def call(self, method: str, request: BaseModel | dict | None, reply: type[R], *,
             timeout: float | None = None, idempotent: bool = False) -> R: ...
    @overload
    def call(self, method: str, request: BaseModel | dict | None = None, reply: None = None, *,
             timeout: float | None = None, idempotent: bool = False) -> dict[str, Any]: ...

    def call(self, method: str, request: BaseModel | dict | None = None,
             reply: type[R] | None = None, *, timeout: float | None = None,
             idempotent: bool = False) -> R | dict:
        """Call `method`; return the reply as `reply` (a model) or a dict; raise typed errors."""
        self._check_socket()
        if isinstance(request, BaseModel):
            body = request.model_dump(mode="json")
        else:
            body = dict(request or {})
        total = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + total
        attempts = attempts_for(idempotent)
        for attempt in range(attempts):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            share = attempt_share(remaining, attempt, attempts)
            result = self._attempt(method, body, share)
            if result is not None:
                return self._parse(method, result, reply)
        raise no_answer(self.name, method, total)

    def _attempt(self, method: str, body: dict, timeout: float) -> dict | None:
        header, frames = encode_request(method, body, timeout, self.sender)
        sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.connect(self.endpoint)
            sock.send_multipart([b""] + frames)
            end = time.monotonic() + timeout
            while (left := end - time.monotonic()) > 0:
                if not sock.poll(int(min(left, PROBE_INTERVAL_S) * 1000) + 1, zmq.POLLIN):
                    self._check_socket(f" (it went away during {method})")
                    continue
                answer = sock.recv_multipart()
                if answer and answer[0] == b"":
                    answer = answer[1:]
                reply_header, reply_body = decode_reply(answer)
                if reply_header.parent_id not in (header.msg_id, ""):
                    continue  # a late answer to an earlier attempt
                if reply_header.status == "error":
                    raise reply_error(self.name, reply_body)
                return reply_body
            return None
        finally:
            sock.close(0)

    def _parse(self, method: str, body: dict, reply: type[R] | None) -> R | dict:
        if reply is None:
            return body
        try:
            return reply.model_validate(body)
        except ValidationError as exc:
            raise Internal(f"{self.name} sent a malformed reply to {method}: {exc}") from None

    def ping(self, timeout: float = 2.0) -> dict:
        """Liveness check."""
        return self.call("ping", timeout=timeout, idempotent=True)


__all__ = ["RpcClient", "HanabiError"]
