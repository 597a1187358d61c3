"""The call a handler serves, visible to it (and to what it calls) without an argument.

The server sets a `CallContext` for each call a worker runs; `current_call()` returns it
(None outside a handler). Its deadline is the caller's: a handler that waits (for a lock, a
guest, a device) waits `within_deadline(seconds)` at most, since nobody takes the answer
after that. `after_reply(fn)` has the server run `fn` once the call's reply is sent (work a
handler starts that would otherwise race its own reply for the GIL). No ZeroMQ or pydantic
here, so the lock helpers can use it.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from hanabi_common.errors import DeadlineExceeded

if TYPE_CHECKING:
    from hanabi_common.rpc.envelope import RequestHeader


@dataclass
class CallContext:
    """What a handler may want to know about the call it serves."""

    header: RequestHeader
    after_reply: list[Callable[[], None]] = field(default_factory=list)  # run once the reply is sent

    @property
    def remaining(self) -> float:
        """Seconds left before the caller's deadline."""
        return self.header.deadline - time.time()

    def within(self, seconds: float) -> float:
        """`seconds`, or less when the caller gives up sooner (at least 0): how long a
        handler may wait for something on this call's behalf."""
        return max(0.0, min(seconds, self.remaining))

    def check(self, what: str = "") -> None:
        """DeadlineExceeded when the caller has given up: nobody waits for the answer."""
        if self.remaining <= 0:
            raise DeadlineExceeded(f"{self.header.method}: the caller's deadline passed{what and ' ' + what}")


_CALL: contextvars.ContextVar[CallContext | None] = contextvars.ContextVar("hanabi_rpc_call", default=None)


def current_call() -> CallContext | None:
    """The call the current worker thread serves (None outside a handler)."""
    return _CALL.get()


def after_reply(fn: Callable[[], None]) -> None:
    """Run `fn` once the reply of the call being served is sent (on the server's loop
    thread: it must be quick, e.g. wake a worker); at once outside a handler."""
    ctx = _CALL.get()
    if ctx is None:
        fn()
    else:
        ctx.after_reply.append(fn)


def within_deadline(seconds: float) -> float:
    """`seconds`, capped by the current call's deadline when a handler asks."""
    ctx = _CALL.get()
    return seconds if ctx is None else ctx.within(seconds)


@contextmanager
def serving(header: RequestHeader) -> Iterator[CallContext]:
    """Make the call of `header` the current one while the block runs (the server's part)."""
    ctx = CallContext(header)
    token = _CALL.set(ctx)
    try:
        yield ctx
    finally:
        _CALL.reset(token)
