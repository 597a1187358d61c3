"""The zygote's messages, defined once: JSON objects over a SOCK_SEQPACKET unix socket, one
datagram each, file descriptors passed alongside (SCM_RIGHTS). Stdlib only: the lean CLI
imports it.

A conversation, client (the `hanabi-runtime` process) and worker (forked per connection):

    client: run {argv, cwd, env, umask, rlimits, namespaces, stdio} + its open stdio fds
    worker: refuse {reason}          nothing was done: the client runs the command itself
      or    started {pid}            the worker runs it; signals for the CLI go to `pid`
    worker: spawn {argv, targets, setsid} + fds   -> client: spawned {pid} | failed {error}
    worker: wait {pid, forward_signals}           -> client: waited {status}
    worker: exit {status, imported}  the command ended: the client exits with `status`

`ping` is answered `pong {pid}`. A worker that ends without `exit` (killed) leaves the
client to report it; one that ends before `started` is a refusal.
"""

from __future__ import annotations

import array
import json
import os
import socket
from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")

SOCKET_NAME = "zygote.sock"  # in the config's run_dir
MAX_MESSAGE_BYTES = 1 << 20  # an environment and a command line; more is refused
MAX_FDS = 16

RUN, PING, PONG, REFUSE, STARTED = "run", "ping", "pong", "refuse", "started"
SPAWN, SPAWNED, FAILED, WAIT, WAITED, EXIT = "spawn", "spawned", "failed", "wait", "waited", "exit"
OPS = frozenset({RUN, PING, PONG, REFUSE, STARTED, SPAWN, SPAWNED, FAILED, WAIT, WAITED, EXIT})
NAMESPACES = ("mnt", "pid")  # a worker serves only a client that shares them


class ProtocolError(Exception):
    """A datagram that is not one of the messages above (or too big, or with too many fds)."""


class Closed(ProtocolError):
    """The other end closed the connection."""


def close_fds(fds: Sequence[int]) -> None:
    """Close fds that came with a message."""
    for fd in fds:
        os.close(fd)


def socket_path(run_dir: str | os.PathLike) -> str:
    """The zygote's socket for a run directory."""
    return os.path.join(os.fspath(run_dir), SOCKET_NAME)


def send(sock: socket.socket, op: str, fds: Sequence[int] = (), **fields: object) -> None:
    """Send one message (and `fds`)."""
    assert op in OPS, op
    data = json.dumps({"op": op, **fields}, separators=(",", ":")).encode()
    if len(data) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"a {op} message of {len(data)} bytes is over the {MAX_MESSAGE_BYTES} limit")
    if fds:
        socket.send_fds(sock, [data], list(fds))
    else:
        sock.sendall(data)


def recv(sock: socket.socket) -> tuple[dict, list[int]]:
    """Receive one message and the fds that came with it (close-on-exec); ProtocolError for
    anything malformed (its fds closed), Closed at the end of the stream."""
    data, fds, flags = _recv_fds(sock)
    try:
        if not data and not fds:
            raise Closed("the connection was closed")
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC) or len(data) > MAX_MESSAGE_BYTES:
            raise ProtocolError(f"a message over {MAX_MESSAGE_BYTES} bytes or {MAX_FDS} fds")
        try:
            message = json.loads(data)
        except (UnicodeDecodeError, ValueError):
            raise ProtocolError("a message that is not JSON") from None
        if not isinstance(message, dict) or message.get("op") not in OPS:
            raise ProtocolError("a message without a known op")
    except BaseException:
        close_fds(fds)
        raise
    return message, fds


def _recv_fds(sock: socket.socket) -> tuple[bytes, list[int], int]:
    """recvmsg with the fds close-on-exec from the start (socket.recv_fds drops its flags)."""
    fds = array.array("i")
    data, ancillary, flags, _ = sock.recvmsg(MAX_MESSAGE_BYTES + 1, socket.CMSG_SPACE(MAX_FDS * fds.itemsize),
                                             socket.MSG_CMSG_CLOEXEC)
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
    return data, list(fds), flags


def field(message: dict, name: str, kind: type[T]) -> T:
    """`message[name]`, which must be a `kind` (ProtocolError naming it otherwise)."""
    value = message.get(name)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise ProtocolError(f"{message.get('op')}: field {name!r} is missing or not a {kind}")
    return value


def rlimits() -> dict[str, list[int]]:
    """This process's resource limits, by name (RLIMIT_NOFILE: [soft, hard], ...)."""
    import resource

    return {name: list(resource.getrlimit(getattr(resource, name)))
            for name in dir(resource) if name.startswith("RLIMIT_")}


def namespaces() -> dict[str, int]:
    """This process's namespaces that the client and the worker must share (inode numbers)."""
    return {name: os.stat(f"/proc/self/ns/{name}").st_ino for name in NAMESPACES}
