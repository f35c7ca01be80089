"""The message routes, beside the ETSI API on the local Unix socket (``qkdd.messaging.messenger``
does the work; this module only speaks HTTP and JSON):

    POST   /qkdd/v1/messages/{recipient_SAE_ID}   send; body {"body": base64, "message_ID":
                                                  optional UUID, "protection": "hybrid"
                                                  (default) or "otp"}; 200 once the
                                                  recipient's site has stored it
    GET    /qkdd/v1/inbox?timeout=S&after=SEQ     the caller's oldest unacknowledged message
                                                  (after SEQ), waiting up to S seconds:
                                                  {"messages": [message]} or {"messages": []}
    GET    /qkdd/v1/inbox?stream=1&after=SEQ      every unacknowledged message, then each new
                                                  one as it arrives: one JSON message per line
    DELETE /qkdd/v1/inbox/{message_ID}            acknowledge (erase) a message

A message object: message_ID, seq, sender_SAE_ID, sender_site_ID, protection ("hybrid" or "otp"),
received_at (Unix time) and body (base64). The caller acts as an SAE exactly as on the
ETSI routes (SO_PEERCRED mapping, X-SAE-ID to pick one); only the addressed SAE can read
or acknowledge a message. Errors are the ETSI Error object: 400 for a bad request, 401 for
a caller that may not act as the SAE, 503 when the message could not be stored at the
recipient's site (with the reason; retrying with the same message_ID is safe).
"""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from qkdd.constants import MAX_WAIT_SECONDS
from qkdd.etsi014.handler import caller_sae
from qkdd.http_server.exchange import (
    JSON_HEADERS,
    NDJSON_HEADERS,
    Answer,
    ApiRequest,
    ApiResponse,
    Caller,
    Deferred,
    Extension,
    Streamed,
    error_response,
    json_object,
    reject,
)
from qkdd.http_server.paths import INBOX_PATH, INBOX_PREFIX, SEND_PREFIX
from qkdd.messaging.inbox import ReceivedMessage
from qkdd.messaging.messenger import BadMessage, Messenger, NotDelivered


def send_body_limit(max_message: int) -> int:
    """Request body size that carries a message of ``max_message`` bytes in base64 JSON."""
    return (max_message + 2) // 3 * 4 + 1024


def message_object(message: ReceivedMessage) -> dict[str, Any]:
    return {
        "message_ID": message.message_id,
        "seq": message.seq,
        "sender_SAE_ID": message.sender_sae,
        "sender_site_ID": message.sender_site,
        "protection": message.protection,
        "received_at": message.received_at,
        "body": base64.b64encode(message.body).decode("ascii"),
    }


def _dump(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _query_number(query: dict[str, list[str]], name: str, low: float, high: float) -> float:
    values = query.get(name, [])
    if not values:
        return low
    if len(values) > 1:
        reject(400, f"query parameter {name} given more than once")
    try:
        value = float(values[0])
    except ValueError:
        reject(400, f"{name} must be a number", {name: values[0]})
    if not low <= value <= high:
        reject(400, f"{name} must be between {low:g} and {high:g}", {name: values[0]})
    return value


def message_routes(
    messenger: Messenger, is_local_sae: Callable[[str], bool]
) -> dict[str, Extension]:
    """The routes; a caller must act as one of this site's SAEs (``is_local_sae``)."""

    def sae_of(request: ApiRequest, caller: Caller) -> str:
        return caller_sae(request, caller, is_local_sae)

    def send_route(request: ApiRequest, caller: Caller) -> Answer:
        if request.method != "POST":
            return _not_allowed("POST")
        recipient = unquote(urlsplit(request.target).path[len(SEND_PREFIX) :])
        if not recipient or "/" in recipient:
            reject(404, f"no such resource {request.target!r}")
        sender = sae_of(request, caller)
        obj = json_object(request.body, "message")
        unknown = set(obj) - {"body", "message_ID", "protection"}
        if unknown:
            reject(400, f"unknown fields {', '.join(sorted(unknown))}")
        raw = obj.get("body")
        if not isinstance(raw, str):
            reject(400, "body must be a base64 string")
        try:
            body = base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError):
            reject(400, "body is not valid base64")
        protection = obj.get("protection", "hybrid")
        if protection not in ("hybrid", "otp"):
            reject(400, 'protection must be "hybrid" or "otp"', {"protection": protection})
        message_id = obj.get("message_ID")
        if message_id is not None:
            try:
                message_id = str(uuid.UUID(message_id))
            except (ValueError, AttributeError, TypeError):
                reject(400, "message_ID must be a UUID string", {"message_ID": message_id})

        async def deliver() -> ApiResponse:
            try:
                receipt = await messenger.send(sender, recipient, body, message_id, protection)
            except BadMessage as exc:
                return error_response(400, str(exc))
            except NotDelivered as exc:
                return error_response(503, str(exc))
            return ApiResponse(
                200,
                JSON_HEADERS,
                _dump(
                    {
                        "message_ID": receipt.message_id,
                        "recipient_SAE_ID": receipt.recipient_sae,
                        "protection": receipt.protection,
                    }
                ),
                note=f"sender={sender} recipient={recipient} message_ID={receipt.message_id} "
                f"bytes={len(body)} protection={protection}",
            )

        return Deferred(deliver)

    def inbox_route(request: ApiRequest, caller: Caller) -> Answer:
        if request.method != "GET":
            return _not_allowed("GET")
        recipient = sae_of(request, caller)
        query = parse_qs(urlsplit(request.target).query, keep_blank_values=True)
        unknown = set(query) - {"timeout", "after", "stream"}
        if unknown:
            reject(400, f"unknown query parameters {', '.join(sorted(unknown))}")
        after = int(_query_number(query, "after", 0, 2**62))
        if query.get("stream", ["0"]) == ["1"]:
            return Streamed(
                200,
                NDJSON_HEADERS,
                lambda: _stream(messenger, recipient, after),
                note=f"recipient={recipient} stream after={after}",
            )
        if "stream" in query and query["stream"] != ["0"]:
            reject(400, "stream must be 0 or 1")
        timeout = _query_number(query, "timeout", 0, MAX_WAIT_SECONDS)

        async def wait() -> ApiResponse:
            message = await messenger.next_message(recipient, after, timeout)
            found = [message_object(message)] if message else []
            return ApiResponse(
                200,
                JSON_HEADERS,
                _dump({"messages": found}),
                note=f"recipient={recipient} "
                + (f"message_ID={message.message_id}" if message else "none"),
            )

        # Waiting hands nothing out: on shutdown it is simply abandoned.
        return Deferred(wait, shielded=False)

    def ack_route(request: ApiRequest, caller: Caller) -> Answer:
        if request.method != "DELETE":
            return _not_allowed("DELETE")
        recipient = sae_of(request, caller)
        raw = unquote(urlsplit(request.target).path[len(INBOX_PREFIX) :])
        try:
            message_id = str(uuid.UUID(raw))
        except ValueError:
            reject(400, f"{raw!r} is not a message ID")
        if not messenger.inbox.acknowledge(recipient, message_id):
            reject(400, f"{recipient} holds no message {message_id}", {"message_ID": message_id})
        return ApiResponse(
            200,
            JSON_HEADERS,
            _dump({"acknowledged": message_id}),
            note=f"recipient={recipient} acknowledged={message_id}",
        )

    return {SEND_PREFIX: send_route, INBOX_PATH: inbox_route, INBOX_PREFIX: ack_route}


async def _stream(messenger: Messenger, recipient: str, after: int) -> AsyncIterator[bytes]:
    while True:
        message = await messenger.next_message(recipient, after, MAX_WAIT_SECONDS)
        if message is not None:
            after = message.seq
            yield _dump(message_object(message)) + b"\n"


def _not_allowed(method: str) -> ApiResponse:
    return error_response(
        405, f"method not allowed here; use {method}", headers=(("allow", method),)
    )
