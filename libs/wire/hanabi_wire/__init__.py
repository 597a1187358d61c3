"""hanabi_wire: the host <-> guest agent protocol, defined once (docs/agent-protocol.md).

``constants`` (ports, channel names, protocol version, id rules, kernel command-line
pieces, limits, message type names), ``framing`` (length-prefixed JSON and data frames,
SYNC, ``FrameDecoder``), ``schema`` (fields as data, the validator) and ``messages`` (every
message and its fields). The in-guest agent and agentd import it; ``doc`` renders the
protocol document's tables from ``messages`` (host only).

STDLIB ONLY: this package runs inside the guest under a bare, trimmed python3.11.
"""

from __future__ import annotations

from .constants import *  # noqa: F401,F403 - the package's face: constants, framing, messages
from .framing import (HEADER, SYNC, FrameDecoder, ProtocolError, b64d, b64e, decode_body,  # noqa: F401
                      encode_frame)
from .messages import (GUEST, GUEST_MESSAGES, HOST, HOST_EVENTS, MESSAGES, REQUESTS,  # noqa: F401
                       check_message, check_result, ping_fields, request, version_mismatch)
from .schema import WireError  # noqa: F401

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


def reply_ok(req_id: int, result: dict[str, Any] | None = None) -> dict[str, Any]:
    """Build a successful reply to request ``req_id``."""
    return {"type": T_REPLY, "id": req_id, "ok": True, "result": result or {}}  # noqa: F405


def reply_error(req_id: int, code: str, message: str) -> dict[str, Any]:
    """Build a failed reply to request ``req_id`` (an unknown code becomes INTERNAL)."""
    if code not in ERROR_CODES:  # noqa: F405
        code = E_INTERNAL  # noqa: F405
    return {"type": T_REPLY, "id": req_id, "ok": False,  # noqa: F405
            "error": {"code": code, "message": message}}
