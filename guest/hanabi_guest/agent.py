"""The hanabi in-guest agent: PID 1 of the microVM, serving docs/agent-protocol.md.

One thread, one epoll loop (``poller.Poller``) over: the host channel, the stdout/stderr pipes of every
process (relayed as ``output`` events), their stdin pipes (fed from ``stdin`` events) and a
SIGCHLD wake-up pipe (``signal.set_wakeup_fd``) that makes it reap every child and orphan
with ``waitpid(-1, WNOHANG)``. A process's ``exit`` event is sent once it is reaped *and*
both its output pipes reached EOF, so it always follows all of its output.

Channel behaviour: a peer that goes away (virtio-serial POLLHUP/EOF while no host is
connected) makes the agent reset its frame decoder, drop the unsent rest of a partially
written frame and look again after ``channel.retry_delay`` (0.5 s), without spinning; meanwhile
the channel stays registered edge-triggered, so the next host's connection or first bytes end
the wait at once (a clone's agentd connects right after vmmd's ``restored`` left).
Replies and events produced meanwhile stay queued and go to the next host. A host that
(re)connects writes ``hanabi_wire.SYNC``: the agent then discards any half-received frame,
drops the unsent rest of a half-written one and writes SYNC before its next frame, so both
directions restart at a frame boundary even if the agent never saw the disconnect. A
corrupt frame makes it send a ``protocol_error`` event and ignore input until SYNC or EOF.
Every ``output``, ``exit`` and ``oom`` event carries ``seq``, one counter for the agent's lifetime;
the last REPLAY_BYTES (8 MiB) of such frames already written (or cut off half-way) are kept, and a
host's SYNC makes the agent write them again after its own SYNC: whatever a host that died
(or a channel that dropped them unseen) lost is sent again, and the host side drops what
it already had by ``seq`` (docs/agent-protocol.md, "Replay").
Output relaying pauses while more than OUT_HIGH bytes wait for the host (back-pressure);
channel reading pauses while more than STDIN_HIGH bytes of stdin wait for processes.

Run in the guest by /init (``main()`` with no arguments: channel from ``hanabi.channel=``,
real mounts). Host-side tests run ``python -m hanabi_guest.agent --fd N --rootfs-dir D``:
a socketpair end as channel, ``DirSandbox`` (no mounts, no chroot; ``--chroot 1`` and
``--pidns 1`` turn on chroot and PID/mount namespaces, both need root).

STDLIB ONLY: runs inside the guest.
"""

from __future__ import annotations

import collections
import heapq
import os
import signal
import sys
import time
import hanabi_wire as P

from .channel import Channel, FdChannel, kernel_cmdline_option, open_guest_channel
from .core import AGENT_VERSION, Container, Proc, log, log_exc
from .dnsrelay import DnsRelay
from .handlers import Handlers, error_reply
from .poller import EVENT_EDGE, EVENT_READ as R, EVENT_WRITE as W, Poller
from .procio import ProcIO
from .sandbox import DirSandbox, GuestSandbox, Sandbox

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any
    from collections.abc import Callable

OUT_HIGH = 2 << 20
REPLAY_BYTES = P.REPLAY_BYTES
OUT_LOW = 256 << 10
STDIN_HIGH = 8 << 20


class Agent(Handlers, ProcIO):
    """The agent loop (see the module docstring)."""

    def __init__(self, channel: Channel, sandbox: Sandbox) -> None:
        self.chan = channel
        self.sandbox = sandbox
        self.sel = Poller()
        self.decoder = P.FrameDecoder()
        self.out: collections.deque[bytes] = collections.deque()
        self.out_off = 0
        self.out_bytes = 0
        self.seq = 0  # of the last output/exit event
        self.replayable: set[int] = set()  # id() of the queued frames that are output/exit
        self.replay: collections.deque[bytes] = collections.deque()  # written ones, oldest first
        self.replay_bytes = 0
        self.stdin_bytes = 0
        self.paused = False
        self.containers: dict[str, Container] = {}
        self.procs: dict[int, Proc] = {}
        self.out_fds: dict[int, Proc] = {}
        self.timers: list[tuple[float, int, Callable[[], None]]] = []
        self.timer_order = 0  # ties of equal deadlines run in the order they were set
        self.chan_reg: tuple[int, int] | None = None  # (fd, events) registered now
        self.chan_backoff = False
        self.running = True
        self.table = self.handlers()
        self.trace: dict[int, tuple[str, float]] | None = None  # id -> (type, arrival): hanabi.trace=1
        self.dns = DnsRelay(self.send, self.sel)

    # ---------------------------------------------------------------- loop primitives
    def call_later(self, delay: float, fn: Callable[[], None]) -> None:
        self.timer_order += 1
        heapq.heappush(self.timers, (time.monotonic() + delay, self.timer_order, fn))

    def _run_timers(self) -> None:
        now = time.monotonic()
        while self.timers and self.timers[0][0] <= now:
            _, _, fn = heapq.heappop(self.timers)
            try:
                fn()
            except Exception:  # noqa: BLE001
                log_exc("timer failed")

    def run(self) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        self.sel.register(wake_r, R, lambda mask: self._on_wake(wake_r))
        self.send({"type": P.T_READY, "agent_version": AGENT_VERSION, "kernel": os.uname().release})
        self._reap()
        while self.running:
            try:
                self._iteration()
            except Exception:  # noqa: BLE001 - the agent must never crash
                log_exc("agent loop")
                time.sleep(0.05)  # no hot loop if the error repeats
        signal.set_wakeup_fd(-1)

    def _iteration(self) -> None:
        self._update_channel()
        timeout = max(0.0, self.timers[0][0] - time.monotonic()) if self.timers else None
        try:
            events = self.sel.select(timeout)
        except InterruptedError:
            return
        for key, mask in events:
            if self.sel.get_map().get(key.fd) is not key:
                continue  # unregistered (and maybe reused) by an earlier callback of this round
            try:
                key.data(mask)
            except Exception:  # noqa: BLE001 - the agent must never crash
                log_exc("handler failed")
        self._run_timers()

    # ---------------------------------------------------------------- channel
    def _update_channel(self) -> None:
        want = 0
        if not self.chan_backoff:
            if self.stdin_bytes < STDIN_HIGH:
                want |= R
            if self.out and self.chan.connected:
                want |= W
        elif self.chan.retry_delay > 0:
            want = R | EVENT_EDGE  # woken by the next host (see the module docstring)
        fd = self.chan.fileno() if want else -1
        new = (fd, want) if want else None
        if new == self.chan_reg:
            return
        if self.chan_reg is not None:
            self.sel.unregister(self.chan_reg[0])
        if new is not None:
            self.sel.register(fd, want, self._on_backoff_wake if want & EVENT_EDGE else self._on_channel)
        self.chan_reg = new

    def _on_channel(self, mask: int) -> None:
        if mask & R:
            data = self.chan.read()
            if data == b"":
                self._peer_gone()
                return
            if data:
                self._on_bytes(data)
        if mask & W:
            self._flush()

    def _peer_gone(self) -> None:
        self.decoder.reset()
        if self.out_off and self.out:
            self._written(self.out.popleft())
            self.out_off = 0
        self.chan.peer_gone()
        delay = self.chan.retry_delay
        if delay < 0:
            self.running = False
        elif delay > 0:
            self.chan_backoff = True
            self.call_later(delay, self._end_backoff)

    def _end_backoff(self) -> None:
        self.chan_backoff = False

    def _on_backoff_wake(self, mask: int) -> None:
        """Something happened on the channel while it was left alone: still no host (EOF,
        as the registration's first report always is) keeps waiting, without a new
        registration (edge-triggered: no new report until the port changes again); a host's
        connection or bytes end the wait."""
        data = self.chan.read()
        if data == b"":
            return
        self.chan_backoff = False
        if data:
            self._on_bytes(data)
    def _on_bytes(self, data: bytes) -> None:
        try:
            msgs = self.decoder.feed(data)
        except P.ProtocolError as exc:
            for msg in exc.messages:
                self._on_message(msg)
            log(f"corrupt frame from host, ignoring input until SYNC or reconnect: {exc}")
            self.send({"type": P.T_PROTOCOL_ERROR, "message": str(exc)})
            return
        for msg in msgs:
            self._on_message(msg)

    def _on_sync(self) -> None:
        """The host (re)started the stream: drop a half-sent frame, answer with SYNC, then
        write again the output and exit frames it may have missed (kept in ``replay``)."""
        if self.out_off and self.out:
            self._written(self.out.popleft())
            self.out_off = 0
        while self.replay:
            frame = self.replay.pop()
            self.replay_bytes -= len(frame)
            self.replayable.add(id(frame))
            self.out.appendleft(frame)
            self.out_bytes += len(frame)
        self.out.appendleft(P.SYNC)
        self.out_bytes += len(P.SYNC)
        self._flush()

    def _written(self, frame: bytes) -> None:
        """`frame` left the queue (written, or cut off half-way): keep it for a replay if
        it is an output or exit frame; the oldest kept ones go beyond REPLAY_BYTES."""
        self.out_bytes -= len(frame)
        if id(frame) not in self.replayable:
            return
        self.replayable.discard(id(frame))
        self.replay.append(frame)
        self.replay_bytes += len(frame)
        while self.replay_bytes > REPLAY_BYTES and len(self.replay) > 1:
            self.replay_bytes -= len(self.replay.popleft())

    def _on_message(self, msg: dict[str, Any]) -> None:
        mtype = msg.get("type")
        if mtype == P.T_SYNC_MARKER:
            self._on_sync()
            return
        if mtype in P.HOST_EVENTS:
            try:
                event = P.check_message(msg, P.HOST)
                if mtype == P.T_STDIN:
                    self._on_stdin_event(event)
                else:
                    self.dns.on_answer(event)
            except Exception as exc:  # noqa: BLE001 - events have no reply
                log(f"{mtype} event dropped: {exc}")
            return
        req_id = msg.get("id")
        if not isinstance(req_id, int) or isinstance(req_id, bool):
            self.send({"type": P.T_PROTOCOL_ERROR, "message": f"message of type {str(mtype)[:64]!r} has no integer id"})
            return
        if self.trace is not None:
            self.trace[req_id] = (str(mtype), time.monotonic())
        handler = self.table.get(mtype) if isinstance(mtype, str) else None
        if handler is None:
            self.send(P.reply_error(req_id, P.E_INVALID_ARGUMENT, f"unknown request type {str(mtype)[:64]!r}"))
            return
        try:
            result = handler(req_id, P.check_message(msg, P.HOST))
        except Exception as exc:  # noqa: BLE001 - every failure becomes an error reply
            if not hasattr(exc, "code"):
                log_exc(f"{mtype} failed")
            self.send(error_reply(req_id, exc))
            return
        if isinstance(result, dict):
            self.send(P.reply_ok(req_id, result))

    def send(self, msg: dict[str, Any]) -> None:
        replayable = msg.get("type") in (P.T_OUTPUT, P.T_EXIT, P.T_OOM)
        if replayable:
            self.seq += 1
            msg = {**msg, "seq": self.seq}
        try:
            frame = P.encode_frame(msg)
        except P.ProtocolError as exc:
            log(f"cannot encode {msg.get('type')}: {exc}")
            if msg.get("type") == P.T_REPLY:
                self.send(P.reply_error(msg["id"], P.E_INTERNAL, f"reply not encodable: {exc}"))
            return
        self.out.append(frame)
        self.out_bytes += len(frame)
        if replayable:
            self.replayable.add(id(frame))
        self._flush()
        if self.trace is not None and msg.get("type") == P.T_REPLY:
            self._trace_reply(msg)
        if not self.paused and self.out_bytes > OUT_HIGH:
            self.paused = True
            for fd in self.out_fds:
                self.sel.unregister(fd)

    def _trace_reply(self, msg: dict[str, Any]) -> None:
        """hanabi.trace=1: one console line per reply, the time since its request arrived."""
        began = self.trace.pop(msg.get("id", -1), None) if self.trace is not None else None
        if began is not None:
            log(f"trace: {began[0]} {(time.monotonic() - began[1]) * 1000:.1f} ms, at {began[1]:.3f} s")

    def _flush(self) -> None:
        while self.out and self.chan.connected:
            head = self.out[0]
            n = self.chan.write(memoryview(head)[self.out_off:])
            if n <= 0:
                break
            self.out_off += n
            if self.out_off >= len(head):
                self._written(self.out.popleft())
                self.out_off = 0
        if self.paused and self.out_bytes < OUT_LOW:
            self.paused = False
            for fd, proc in self.out_fds.items():
                self.sel.register(fd, R, self._output_cb(proc, fd))

    def flush_blocking(self, timeout: float) -> None:
        """Write queued frames, waiting up to ``timeout`` s (used before power-off)."""
        deadline = time.monotonic() + timeout
        while self.out and time.monotonic() < deadline:
            before = self.out_bytes
            self._flush()
            if self.out and self.out_bytes == before:
                time.sleep(0.005)


def main(argv: list[str] | None = None) -> None:
    """Entry point: the guest (no arguments) or ``--fd N --rootfs-dir D [--chroot 1] [--pidns 1]``
    (host tests)."""
    args = sys.argv[1:] if argv is None else argv
    opts = dict(zip(args[::2], args[1::2], strict=False))
    if "--fd" in opts:
        sandbox = DirSandbox(opts.get("--rootfs-dir", "/"))
        sandbox.use_chroot = opts.get("--chroot") == "1"
        sandbox.use_pid_namespace = opts.get("--pidns") == "1"  # needs root
        agent = Agent(FdChannel(int(opts["--fd"])), sandbox)
        agent.run()
        return
    os.umask(0o022)
    from .hardening import start_warm_up

    start_warm_up()
    try:
        agent = Agent(open_guest_channel(), GuestSandbox())
        if kernel_cmdline_option(P.CMDLINE_TRACE, "") == "1":
            agent.trace = {}
        agent.run()
        log("agent loop ended")
    except BaseException:  # noqa: BLE001 - PID 1 must not just die
        log_exc("fatal")
    try:
        from .sandbox import poweroff

        poweroff()
    finally:
        while True:
            time.sleep(3600)


if __name__ == "__main__":
    main()
