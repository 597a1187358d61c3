"""`AgentSession`: agentd's connection to one sandbox's guest agent.

The session owns the channel and a reader thread. Requests get increasing integer ids and
a pending future each; the reader validates every frame (`guest_messages`) and resolves
the future, or routes `output` and `exit` events to the container's `ProcessRecord`.
A request not answered in time raises DeadlineExceeded; a guest error reply becomes the
matching hanabi error. A frame that breaks the framing drops the connection; a frame that
is well framed but invalid is logged and dropped. When the connection is lost (not closed
by agentd) every process still running is marked stopped, killed by SIGKILL (status 137, as
Docker shows a killed container): the guest is gone (QEMU closed the chardev, the VMM
crashed) or misbehaved and was cut off, and its processes with it.
"""

from __future__ import annotations

import collections
import itertools
import logging
import secrets
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures import wait
from typing import Any
from collections.abc import Callable

from hanabi_common.config import Config
from hanabi_common.errors import (DeadlineExceeded, Internal, InvalidArgument, NotFound,
                                  Unavailable, error_for_code)
from hanabi_wire import INIT_EXEC_ID, SYNC, T_PING, T_SYNC_MARKER, FrameDecoder, ProtocolError, encode_frame, ping_fields

from hanabi_agentd.channel import Channel
from hanabi_agentd.guest_messages import (GuestDnsQuery, GuestExit, GuestMisbehaved, GuestOom, GuestOutput,
                                          GuestProtocolError, GuestReady, GuestReply,
                                          PingResult, check_version, parse_guest_message,
                                          parse_result, reply_id)
from hanabi_agentd.process import ContainerRecord, ProcessRecord

log = logging.getLogger("hanabi.agentd")
PING_INTERVAL_S = 0.5
CONNECT_ATTEMPT_S = 2.0
COMPLAINTS_LOGGED = 20
ABANDONED_KEPT = 1024
# The signal recorded for the processes of a guest that is gone (the VM died): SIGKILL.
LOST_SIGNAL = 9


class AgentSession:
    """One sandbox's agent: transport, request/reply correlation, process records."""

    def __init__(self, sandbox_id: str, channel_factory: Callable[[], Channel], config: Config,
                 *, on_change: Callable[[], None] | None = None,
                 containers: dict[str, ContainerRecord] | None = None) -> None:
        self.sandbox_id = sandbox_id
        self.config = config
        self._factory = channel_factory
        self._on_change = on_change or (lambda: None)
        self.containers: dict[str, ContainerRecord] = containers or {}
        self._lock = threading.RLock()
        self._pending: dict[int, Future] = {}
        self._abandoned: collections.deque[int] = collections.deque(maxlen=ABANDONED_KEPT)
        # A random base: replies the guest still holds for an earlier connection (another
        # agentd, before a restart) can never match a request of this one.
        self._ids = itertools.count(secrets.randbits(40) << 8)
        self._channel: Channel | None = None
        self._reader: threading.Thread | None = None
        self._generation = 0
        self._closing = False
        self._complaints = 0
        self.connected = False
        self.info: PingResult | None = None
        self.ready_s: float | None = None
        self.lost_reason: str | None = None
        # The guest's DNS relay: where its queries may go, and who relays them (agentd's DnsRelay).
        self.dns_target: Any = None
        self.dns_handler: Callable[[AgentSession, GuestDnsQuery], bool] | None = None

    # --- connection ---------------------------------------------------------------------
    @property
    def channel(self) -> Channel | None:
        """The current channel (None when never connected)."""
        return self._channel

    def connect(self, timeout: float | None = None) -> PingResult:
        """Connect and ping until the agent answers; DeadlineExceeded after `timeout`
        (default config.agent.ready_timeout_s), Unavailable if the guest breaks framing."""
        total = timeout or self.config.agent.ready_timeout_s
        started = time.monotonic()
        deadline = started + total
        self._closing = False
        last_error = "no attempt made"
        while (left := deadline - time.monotonic()) > 0:
            channel = self._factory()
            try:
                channel.connect(min(left, CONNECT_ATTEMPT_S))
            except OSError as exc:
                last_error = f"{type(exc).__name__}: {exc}"
                time.sleep(min(0.1, max(deadline - time.monotonic(), 0)))
                continue
            try:
                # Start at a frame boundary whatever an earlier client left half-sent; the
                # agent answers with SYNC, and the reader skips everything before it.
                channel.send(SYNC)
            except OSError as exc:
                channel.close()
                last_error = f"{type(exc).__name__}: {exc}"
                continue
            generation = self._install(channel)
            try:
                result = self._ping_until(generation, deadline)
            except BaseException:
                self._drop(generation)
                raise
            if result is not None:
                with self._lock:
                    alive = self._generation == generation and self.lost_reason is None
                    if alive:
                        self.connected = True
                        self.info = result
                if not alive:
                    last_error = self.lost_reason or "connection lost"
                    continue
                self.ready_s = round(time.monotonic() - started, 3)
                log.info("agent connected", extra={"sandbox": self.sandbox_id,
                                                   "address": channel.address,
                                                   "agent_version": result.agent_version,
                                                   "ready_s": self.ready_s})
                return result
            reason = self.lost_reason or "no answer to ping"
            self._drop(generation)
            if reason.startswith("protocol error"):
                raise Unavailable(f"guest agent of sandbox {self.sandbox_id} broke the protocol: {reason}")
            last_error = reason
        raise DeadlineExceeded(f"guest agent of sandbox {self.sandbox_id} did not answer within "
                               f"{total:.1f}s ({last_error})")

    def _install(self, channel: Channel) -> int:
        with self._lock:
            self._generation += 1
            generation = self._generation
            self._channel = channel
            self.lost_reason = None
        reader = threading.Thread(target=self._read_loop, args=(channel, generation),
                                  name=f"agent-{self.sandbox_id}", daemon=True)
        self._reader = reader
        reader.start()
        return generation

    def _ping_until(self, generation: int, deadline: float) -> PingResult | None:
        futures: dict[Future, int] = {}
        try:
            while (left := deadline - time.monotonic()) > 0 and self._generation == generation:
                try:
                    rid, future = self._submit(T_PING, ping_fields(), require_ready=False)
                except Unavailable:
                    return None
                futures[future] = rid
                done, _ = wait(list(futures), timeout=min(PING_INTERVAL_S, left),
                               return_when=FIRST_COMPLETED)
                for fut in done:
                    futures.pop(fut)
                    if fut.exception() is not None:
                        if isinstance(fut.exception(), Unavailable):
                            return None  # the connection went away: retry
                        raise fut.exception()  # type: ignore[misc]  # not None: checked above
                    try:
                        return check_version(parse_result(PingResult, fut.result(), "ping"))
                    except GuestMisbehaved as exc:
                        raise Unavailable(f"guest agent of sandbox {self.sandbox_id}: {exc}") from None
            return None
        finally:
            for rid in futures.values():
                self._abandon(rid)

    def close(self) -> None:
        """Close the connection (agentd's choice: process statuses are left as they are)."""
        self._closing = True
        with self._lock:
            self.connected = False
            channel = self._channel
        if channel is not None:
            channel.close()
        self._fail_pending(Unavailable(f"connection to the agent of sandbox {self.sandbox_id} closed"))
        reader = self._reader
        if reader is not None and reader is not threading.current_thread():
            reader.join(timeout=2.0)

    def _drop(self, generation: int) -> None:
        with self._lock:
            if generation != self._generation or self._channel is None:
                return
            channel = self._channel
        channel.close()

    # --- requests -----------------------------------------------------------------------
    def _submit(self, kind: str, fields: dict[str, Any], *, require_ready: bool = True) -> tuple[int, Future]:
        future: Future = Future()
        with self._lock:
            channel = self._channel
            if channel is None or (require_ready and not self.connected):
                why = f": {self.lost_reason}" if self.lost_reason else ""
                raise Unavailable(f"the agent of sandbox {self.sandbox_id} is not connected{why}")
            rid = next(self._ids)
            self._pending[rid] = future
        try:
            frame = encode_frame({**fields, "type": kind, "id": rid})
        except ProtocolError as exc:
            self._abandon(rid)
            raise InvalidArgument(f"cannot send {kind} to the guest: {exc}") from None
        try:
            channel.send(frame)
        except OSError as exc:
            self._abandon(rid)
            raise Unavailable(f"cannot reach the agent of sandbox {self.sandbox_id}: {exc}") from None
        return rid, future

    def request(self, kind: str, fields: dict[str, Any] | None = None,
                timeout: float | None = None) -> dict[str, Any]:
        """Send request `kind` and wait for its reply's result (raises typed errors)."""
        limit = timeout or self.config.agent.request_timeout_s
        rid, future = self._submit(kind, fields or {})
        try:
            return future.result(timeout=limit)
        except FutureTimeout:
            self._abandon(rid)
            raise DeadlineExceeded(f"the agent of sandbox {self.sandbox_id} did not answer "
                                   f"{kind} within {limit:.1f}s") from None

    def send_event(self, kind: str, fields: dict[str, Any]) -> None:
        """Send a one-way event (stdin); Unavailable when not connected."""
        with self._lock:
            channel = self._channel if self.connected else None
        if channel is None:
            raise Unavailable(f"the agent of sandbox {self.sandbox_id} is not connected")
        try:
            channel.send(encode_frame({**fields, "type": kind}))
        except ProtocolError as exc:
            raise InvalidArgument(f"cannot send {kind} to the guest: {exc}") from None
        except OSError as exc:
            raise Unavailable(f"cannot reach the agent of sandbox {self.sandbox_id}: {exc}") from None

    def _abandon(self, rid: int) -> None:
        with self._lock:
            if self._pending.pop(rid, None) is not None:
                self._abandoned.append(rid)

    def _fail_pending(self, error: Exception) -> None:
        with self._lock:
            pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(error)

    # --- the reader ---------------------------------------------------------------------
    def _read_loop(self, channel: Channel, generation: int) -> None:
        decoder = FrameDecoder(wait_sync=True)
        reason = "the guest closed the connection"
        try:
            while True:
                data = channel.recv()
                if not data:
                    break
                for msg in decoder.feed(data):
                    self._dispatch(msg)
        except ProtocolError as exc:
            reason = f"protocol error: {exc}"
            log.warning("guest broke the framing, dropping the connection",
                        extra={"sandbox": self.sandbox_id, "reason": str(exc)[:200]})
        except OSError as exc:
            reason = f"connection error: {exc}"
        except Exception:  # a bug in dispatch must not leave the session half alive
            reason = "internal error in the reader"
            log.exception("agent reader failed", extra={"sandbox": self.sandbox_id})
        finally:
            channel.close()
            self._lost(generation, reason)

    def _lost(self, generation: int, reason: str) -> None:
        with self._lock:
            if generation != self._generation:
                return
            was_connected = self.connected
            self.connected = False
            self.lost_reason = reason
        if was_connected and not self._closing:
            # Record the loss before waking the callers, so they see a consistent state.
            log.warning("lost the connection to the guest agent",
                        extra={"sandbox": self.sandbox_id, "reason": reason})
            changed = False
            for record in self.all_processes():
                changed |= record.mark_exited(None, LOST_SIGNAL)
            if changed:
                self._notify_change()
        self._fail_pending(Unavailable(f"lost the agent of sandbox {self.sandbox_id}: {reason}"))

    def _complain(self, reason: str, level: int = logging.WARNING, **extra: Any) -> None:
        self._complaints += 1
        if self._complaints <= COMPLAINTS_LOGGED or self._complaints % 1000 == 0:
            log.log(level, "dropped a message from the guest",
                    extra={"sandbox": self.sandbox_id, "reason": reason[:300],
                           "count": self._complaints, **extra})

    def _dispatch(self, raw: dict[str, Any]) -> None:
        if raw.get("type") == T_SYNC_MARKER:
            return  # the decoder's mark of where the agent's SYNC stood
        try:
            msg = parse_guest_message(raw)
        except GuestMisbehaved as exc:
            self._complain(str(exc))
            rid = reply_id(raw)
            if rid is not None:
                self._resolve(rid, error=Internal(f"the agent of sandbox {self.sandbox_id} "
                                                  f"sent an invalid reply: {exc}"))
            return
        if isinstance(msg, GuestReply):
            if msg.ok:
                self._resolve(msg.id, result=msg.result or {})
            else:
                assert msg.error is not None
                self._resolve(msg.id, error=error_for_code(msg.error.code,
                                                           f"guest agent: {msg.error.message}"))
        elif isinstance(msg, GuestOutput):
            record = self.find_process(msg.container_id, msg.exec_id)
            if record is None or record.status == "stopped":
                # After a reconnect the guest replays recent events (seq): expected, quiet.
                self._complain("output for an unknown or stopped process",
                               logging.WARNING if msg.seq is None else logging.DEBUG,
                               container=msg.container_id, exec=msg.exec_id)
                return
            record.push_output(msg.stream, msg.data, msg.seq)
        elif isinstance(msg, GuestExit):
            self._on_exit(msg)
        elif isinstance(msg, GuestOom):
            self._on_oom(msg)
        elif isinstance(msg, GuestReady):
            log.info("agent says ready", extra={"sandbox": self.sandbox_id,
                                                "agent_version": msg.agent_version})
        elif isinstance(msg, GuestDnsQuery):
            if self.dns_handler is None or not self.dns_handler(self, msg):
                self._complain("dns query dropped (no relay configured, or too many in flight)",
                               level=logging.DEBUG)
        elif isinstance(msg, GuestProtocolError):
            log.warning("the guest agent reports a protocol error",
                        extra={"sandbox": self.sandbox_id, "reason": msg.message[:300]})
            if not self.connected:
                # It saw a torn frame (bytes sent before it opened its port) and now ignores
                # input until the host reconnects: reconnect (connect() retries).
                self._drop(self._generation)

    def _resolve(self, rid: int, *, result: dict | None = None, error: Exception | None = None) -> None:
        with self._lock:
            future = self._pending.pop(rid, None)
            late = future is None and rid in self._abandoned
        if future is None:
            if not late:  # usually a reply meant for an earlier connection
                self._complain("reply to an unknown request", level=logging.INFO, id=rid)
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def _on_exit(self, msg: GuestExit) -> None:
        record = self.find_process(msg.container_id, msg.exec_id)
        replayed = logging.WARNING if msg.seq is None else logging.DEBUG  # replays are expected
        if record is None:
            self._complain("exit of an unknown process", replayed, container=msg.container_id, exec=msg.exec_id)
            return
        if not record.mark_exited(msg.exit_code, msg.signal, publish=False):
            self._complain("second exit of a process", replayed, container=msg.container_id, exec=msg.exec_id)
            return
        log.info("process exited", extra={"sandbox": self.sandbox_id, "container": msg.container_id,
                                          "exec": msg.exec_id, "exit_code": msg.exit_code,
                                          "signal": msg.signal})
        try:
            self._notify_change()  # agent.json first: whoever hears the exit finds it there
        finally:
            record.publish_exit()

    def _on_oom(self, msg: GuestOom) -> None:
        """The container's OOM kill count grew: its init's io client (the stand-in the
        shim watches) hears of it before the exit that follows."""
        record = self.find_process(msg.container_id, INIT_EXEC_ID)
        if record is None:
            self._complain("oom of an unknown container", logging.WARNING if msg.seq is None else logging.DEBUG,
                           container=msg.container_id)
            return
        if record.push_oom(msg.oom_kills):
            log.info("the guest's OOM killer ended a process", extra={
                "sandbox": self.sandbox_id, "container": msg.container_id, "oom_kills": msg.oom_kills})

    def _notify_change(self) -> None:
        try:
            self._on_change()
        except Exception:
            log.exception("could not record a process change", extra={"sandbox": self.sandbox_id})

    # --- records ------------------------------------------------------------------------
    def find_process(self, container_id: str, exec_id: str) -> ProcessRecord | None:
        """The record of a process, or None."""
        with self._lock:
            container = self.containers.get(container_id)
            return None if container is None else container.processes.get(exec_id)

    def container(self, container_id: str) -> ContainerRecord:
        """The record of a container; NotFound if agentd never created it."""
        with self._lock:
            container = self.containers.get(container_id)
        if container is None:
            raise NotFound(f"sandbox {self.sandbox_id} has no container {container_id}")
        return container

    def process(self, container_id: str, exec_id: str) -> ProcessRecord:
        """The record of a process; NotFound if unknown."""
        record = self.container(container_id).processes.get(exec_id)
        if record is None:
            raise NotFound(f"container {container_id} has no process {exec_id}")
        return record

    def new_process(self, container_id: str, exec_id: str) -> ProcessRecord:
        """A fresh record ("created"), registered before its request goes to the guest."""
        return ProcessRecord(container_id, exec_id, self.config.agent.output_buffer_bytes)

    def all_processes(self) -> list[ProcessRecord]:
        """Every process of every container."""
        with self._lock:
            return [p for c in self.containers.values() for p in c.processes.values()]

    def changed(self) -> None:
        """Tell the owner to persist the records (after agentd changed them)."""
        self._notify_change()
