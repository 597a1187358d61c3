"""The wire format of hanabi RPC, independent of sockets (pure, unit-tested).

A request is the multipart message `[b"", PROTOCOL, header, body]` sent by a DEALER;
the ROUTER sees the peer identity in front. `header` and `body` are JSON objects.
Replies have the same shape, with a reply header that names the request (`parent_id`) and
says `status: ok|error`; an error body is `{code, message, details}`.
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from hanabi_common.errors import ErrorCode, HanabiError, InvalidArgument
from hanabi_common.rpc.wire import (METHOD_PATTERN, PROTOCOL, VERSION, json_object, new_msg_id,  # noqa: F401
                                    request_frames, request_header, split_reply)


class RequestHeader(BaseModel):
    """Who asks what, and until when the answer is useful."""

    model_config = ConfigDict(extra="forbid")
    version: int = VERSION
    msg_id: str = Field(min_length=1, max_length=64)
    method: str = Field(pattern=METHOD_PATTERN)
    deadline: float
    sent_at: float
    sender: str = Field("", max_length=128)


class ReplyHeader(BaseModel):
    """The answer to one request."""

    model_config = ConfigDict(extra="forbid")
    version: int = VERSION
    msg_id: str
    parent_id: str
    status: Literal["ok", "error"]
    sent_at: float


class ErrorBody(BaseModel):
    """The body of an error reply."""

    code: ErrorCode
    message: str
    details: dict[str, Any] = {}


def encode_request(method: str, body: dict, timeout: float, sender: str = "") -> tuple[RequestHeader, list[bytes]]:
    """Build the frames of a request (without the DEALER's empty delimiter)."""
    header = RequestHeader(**request_header(method, timeout, sender))
    return header, request_frames(header.model_dump_json().encode(), body)


def decode_request(frames: list[bytes], max_bytes: int) -> tuple[RequestHeader, dict]:
    """Parse the frames after the ROUTER's identity and delimiter; InvalidArgument if bad."""
    size = sum(len(f) for f in frames)
    if size > max_bytes:
        raise InvalidArgument(f"request of {size} bytes exceeds the limit of {max_bytes} bytes")
    if len(frames) != 3:
        raise InvalidArgument(f"request must have 3 frames (protocol, header, body), got {len(frames)}")
    protocol, raw_header, raw_body = frames
    if protocol != PROTOCOL:
        raise InvalidArgument(f"unknown protocol frame {protocol[:32]!r}; expected {PROTOCOL!r}")
    header_data = json_object(raw_header, "header")
    if header_data.get("version") != VERSION:
        raise InvalidArgument(f"unsupported protocol version {header_data.get('version')!r}; this daemon speaks {VERSION}")
    try:
        header = RequestHeader.model_validate(header_data)
    except ValidationError as exc:
        raise InvalidArgument(f"malformed request header: {exc.errors(include_url=False)}") from None
    return header, json_object(raw_body, "body")


def encode_reply(parent_id: str, result: dict | None = None, error: HanabiError | None = None) -> list[bytes]:
    """Build the frames of a reply: a result, or an error."""
    status: Literal["ok", "error"] = "error" if error is not None else "ok"
    header = ReplyHeader(msg_id=new_msg_id(), parent_id=parent_id, status=status, sent_at=time.time())
    if error is not None:
        body = ErrorBody(code=error.code, message=error.message, details=error.details).model_dump(mode="json")
    else:
        body = result or {}
    return [PROTOCOL, header.model_dump_json().encode(), json.dumps(body).encode()]


def decode_reply(frames: list[bytes]) -> tuple[ReplyHeader, dict]:
    """Parse a reply (without the delimiter); InvalidArgument if it is not one."""
    raw_header, body = split_reply(frames)
    try:
        header = ReplyHeader.model_validate(raw_header)
    except ValidationError as exc:
        raise InvalidArgument(f"malformed reply header: {exc}") from None
    return header, body
