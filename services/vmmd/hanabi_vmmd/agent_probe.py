"""Is a VM's guest up? Ask its agent: one ping over the agent socket, then let go.

The warm pool hands out VMs whose guest has finished booting: a pooled VM counts as ready
once its agent answers a ping (docs/agent-protocol.md: SYNC first, read with
`wait_sync`, a reply with the same id, stating this host's protocol version). The session is closed right after; agentd's own
connection later starts with SYNC again, which the agent is built for.

`port` None: `path` is the agent's stream socket (QEMU's virtio-serial chardev); a port:
`path` is Firecracker's hybrid vsock socket, each connection opened with its `CONNECT port`
handshake (`hanabi_common.hybrid_vsock`).
"""

from __future__ import annotations

import logging
import select
import socket
import time
from pathlib import Path

from hanabi_common.errors import DeadlineExceeded, FailedPrecondition
from hanabi_common.hybrid_vsock import connect_hybrid
from hanabi_wire import (PROTOCOL_VERSION, SYNC, T_PING, T_REPLY, UNVERSIONED, FrameDecoder, ProtocolError,
                         encode_frame, ping_fields, version_mismatch)
from hanabi_wire.messages import request as wire_request

log = logging.getLogger("hanabi.vmmd")
PROBE_ID = 1
ATTEMPT_S = 1.0


def _same_version(result: object) -> bool:
    """Whether a ping result states this host's protocol version (a mismatch is logged:
    agentd will refuse the agent, naming both versions)."""
    theirs = result.get("protocol", UNVERSIONED) if isinstance(result, dict) else UNVERSIONED
    mismatch = version_mismatch(PROTOCOL_VERSION, theirs)
    if mismatch is not None:
        log.warning("warm-pool probe: %s", mismatch)
    return mismatch is None


def _attempt(path: Path, deadline: float, port: int | None = None) -> bool:
    """One connect + SYNC + ping; True when the agent answered it (same protocol version)."""
    reply = _exchange(path, SYNC + encode_frame({"type": T_PING, "id": PROBE_ID, **ping_fields()}), deadline, port)
    return reply is not None and bool(reply.get("ok")) and _same_version(reply.get("result"))


def wait_agent_ready(path: Path, timeout: float, port: int | None = None) -> float:
    """Seconds until the agent behind the Unix socket `path` (vsock `port` through it, if
    given) answered a ping; DeadlineExceeded after `timeout`."""
    began = time.monotonic()
    deadline = began + timeout
    while time.monotonic() < deadline:
        if _attempt(path, deadline, port):
            return time.monotonic() - began
        time.sleep(0.05)
    raise DeadlineExceeded(f"the guest agent behind {path} did not answer within {timeout:.0f}s")


def agent_request(path: Path, mtype: str, fields: dict, timeout: float, port: int | None = None) -> dict:
    """One request to the agent behind `path` (SYNC, the request, its reply, close), retried
    while the agent is not there yet; its result. FailedPrecondition if the agent refused it,
    DeadlineExceeded after `timeout`."""
    frame = SYNC + encode_frame({**wire_request(mtype, **fields), "id": PROBE_ID})
    deadline = time.monotonic() + timeout
    while True:
        reply = _exchange(path, frame, deadline, port)
        if reply is not None:
            if not reply.get("ok"):
                error = reply.get("error") or {}
                raise FailedPrecondition(f"the guest agent refused {mtype}: {error.get('message', error)}")
            result = reply.get("result")
            return result if isinstance(result, dict) else {}
        if time.monotonic() >= deadline:
            raise DeadlineExceeded(f"the guest agent behind {path} did not answer {mtype} within {timeout:.1f}s")
        time.sleep(0.005)


def _connect(path: Path, port: int | None, timeout: float) -> socket.socket:
    """A stream to the agent: the Unix socket itself, or vsock `port` through it."""
    if port is not None:
        return connect_hybrid(str(path), port, timeout)[0]
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(timeout)
        sock.connect(str(path))
    except BaseException:
        sock.close()
        raise
    return sock


def _exchange(path: Path, frame: bytes, deadline: float, port: int | None = None) -> dict | None:
    """Send `frame` on a fresh connection and return the reply with PROBE_ID (None: no answer)."""
    try:
        sock = _connect(path, port, max(min(ATTEMPT_S, deadline - time.monotonic()), 0.01))
    except OSError:
        return None
    try:
        sock.sendall(frame)
        decoder = FrameDecoder(wait_sync=True)
        until = min(deadline, time.monotonic() + ATTEMPT_S)
        while time.monotonic() < until:
            ready, _, _ = select.select([sock], [], [], max(until - time.monotonic(), 0))
            if not ready:
                break
            data = sock.recv(65536)
            if not data:
                return None
            for msg in decoder.feed(data):
                if msg.get("type") == T_REPLY and msg.get("id") == PROBE_ID:
                    return msg
        return None
    except (OSError, ProtocolError):
        return None
    finally:
        sock.close()
