"""The pure parts of the RPC envelope, as plain dicts and bytes (standard library only).

Defined once here and used by both the pydantic envelope (`envelope.py`, the daemons and
the typed clients) and the runtime's lean client (each CLI call is a fresh process, so it
must not pay for pydantic or pyzmq). A request is `[PROTOCOL, header, body]` after the
DEALER's empty delimiter; a reply has the same shape with a reply header.
"""

from __future__ import annotations

import json
import os
import _socket
import sys
import time

from hanabi_common.errors import DeadlineExceeded, HanabiError, InvalidArgument, Unavailable, error_for_code

PROTOCOL = b"HANABI-RPC"
VERSION = 1
METHOD_PATTERN = r"^[a-z][a-z0-9_.]{0,63}$"
IDEMPOTENT_ATTEMPTS = 3  # Lazy Pirate: tries of an idempotent call within its deadline
MIN_ATTEMPT_S = 0.5  # an early try gets at least this long


def new_msg_id() -> str:
    """A fresh message id: 32 random hex digits."""
    return os.urandom(16).hex()


def default_sender() -> str:
    """Who is calling: the program's name and pid."""
    return f"{os.path.basename(sys.argv[0]) if sys.argv else 'client'}:{os.getpid()}"


def request_header(method: str, timeout: float, sender: str = "") -> dict:
    """The fields of a request header (RequestHeader validates the same)."""
    now = time.time()
    return {"version": VERSION, "msg_id": new_msg_id(), "method": method, "deadline": now + timeout,
            "sent_at": now, "sender": sender}


def request_frames(header_json: bytes, body: dict) -> list[bytes]:
    """The frames of a request (without the DEALER's empty delimiter)."""
    return [PROTOCOL, header_json, json.dumps(body).encode()]


def json_object(frame: bytes, what: str) -> dict:
    """A frame's JSON object; InvalidArgument if it is not one."""
    try:
        value = json.loads(frame)
    except (ValueError, UnicodeDecodeError):
        raise InvalidArgument(f"{what} frame is not valid JSON") from None
    if not isinstance(value, dict):
        raise InvalidArgument(f"{what} frame must be a JSON object")
    return value


def split_reply(frames: list[bytes]) -> tuple[dict, dict]:
    """A reply's header and body as dicts (the header not yet validated)."""
    if len(frames) != 3 or frames[0] != PROTOCOL:
        raise InvalidArgument("malformed reply from daemon")
    return json_object(frames[1], "reply header"), json_object(frames[2], "reply body")


def attempts_for(idempotent: bool) -> int:
    """How many tries a call gets."""
    return IDEMPOTENT_ATTEMPTS if idempotent else 1


def attempt_share(remaining: float, attempt: int, attempts: int) -> float:
    """Seconds for try `attempt` (from 0) of `attempts`, with `remaining` seconds left."""
    if attempt == attempts - 1:
        return remaining
    return max(remaining / (attempts - attempt), MIN_ATTEMPT_S)


def ipc_down(path: str) -> str | None:
    """Why nothing serves the Unix socket at `path` (no file, or nobody listening), or
    None when a connect succeeds (or fails for another reason, e.g. a full backlog: the
    daemon is busy, not gone)."""
    probe = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)  # no `socket`: lean paths
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except FileNotFoundError:
        return f"no socket at {path}"
    except ConnectionRefusedError:
        return f"nothing listens on {path}"
    except OSError:
        return None
    finally:
        probe.close()
    return None


def not_running(name: str, why: str, during: str = "") -> Unavailable:
    """The error for a daemon nothing answers for: `why` (no socket at PATH, nothing
    listens on PATH), `during` (e.g. " (it went away during the call)")."""
    return Unavailable(f"{name} is not running{during}: {why} "
                       f"(start it with `make up` or `systemctl start hanabi-{name}`)")


def no_answer(name: str, method: str, total: float) -> DeadlineExceeded:
    """The error for a call that got no answer before its deadline."""
    return DeadlineExceeded(f"{name} did not answer {method} within {total:.1f}s")


def reply_error(name: str, body: dict) -> HanabiError:
    """The typed error an error reply's body stands for."""
    return error_for_code(body.get("code", "INTERNAL"), f"{name}: {body.get('message', 'unknown error')}",
                          body.get("details") or {})
