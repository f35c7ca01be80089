"""The key service's calls without I/O: each call is a `Call` (method, target, JSON body and
how to decode the answer) or a `Stream` (a streamed answer and how each of its objects
decodes), made by a function with the signature and docstring the front ends' method of
the same name has; and the value types they return (`DeliveredKey`, `Message`).

`LineStream` collects the JSON objects of a streamed answer (messages, key events) from the
bytes of a connection, on `qkdd.client.http`; a whole answer is `qkdd.client.roundtrip`'s
`Exchange`. How a call runs on a connection is `qkdd.client.front`'s; the front ends
(blocking, asyncio, Trio) only move bytes.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar
from urllib.parse import quote

from qkdd.client.client_errors import BadResponse, KeyServiceClientError
from qkdd.client.endpoint import KEY_SERVICE
from qkdd.client.http import ClientConnection, ConnectionClosed, Data, EndOfMessage, Response
from qkdd.client.roundtrip import json_headers, key_entries, receive_events
from qkdd.http_server.paths import (
    EVENTS_PATH,
    INBOX_PATH,
    INBOX_PREFIX,
    METRICS_PATH,
    SEND_PREFIX,
    STATUS_PATH,
)

__all__ = ["Call", "DeliveredKey", "LineStream", "Message", "Stream"]

KEYS_PREFIX = "/api/v1/keys/"

T = TypeVar("T")


@dataclass(frozen=True, eq=False)
class DeliveredKey:
    """One key handed to an SAE: its ID (a UUID string) and its material. Two are equal when
    both are (the material compared in constant time); the material is never in a repr."""

    key_id: str
    material: bytes = field(repr=False)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DeliveredKey):
            return NotImplemented
        same_material = hmac.compare_digest(self.material, other.material)
        return same_material and self.key_id == other.key_id

    def __hash__(self) -> int:
        return hash(self.key_id)


@dataclass(frozen=True)
class Message:
    """A message received from an SAE at another site; acknowledge it once handled."""

    message_id: str
    seq: int
    sender_sae_id: str
    sender_site_id: str
    protection: str
    received_at: float
    body: bytes = field(repr=False)


@dataclass(frozen=True)
class Call(Generic[T]):
    """One request and how its answer becomes a value (or a `ClientError`)."""

    method: str
    target: str
    body: bytes | None
    decode: Callable[[int, bytes], T] = field(repr=False)
    # Seconds the service may take beyond the client's timeout (a long-poll's wait).
    extra_time: float = 0.0


@dataclass(frozen=True)
class Stream(Generic[T]):
    """A streamed answer (one JSON object per line) on a connection of its own, and how
    each object becomes a value."""

    target: str
    decode: Callable[[dict[str, Any]], T] = field(repr=False)


# -- the calls ------------------------------------------------------------------------------
# Each front end offers these as its methods, with these signatures and docstrings
# (`qkdd.client.front`): a call returns its answer's value, a stream iterates over values.


def status(slave_sae_id: str) -> Call[dict[str, Any]]:
    """The standard's Status object for this SAE as master and `slave_sae_id`."""
    return Call("GET", f"{KEYS_PREFIX}{_segment(slave_sae_id)}/status", None, decode_json)


def enc_keys(
    slave_sae_id: str,
    number: int = 1,
    size: int | None = None,
    additional_slave_sae_ids: Sequence[str] = (),
) -> Call[list[DeliveredKey]]:
    """New keys for this SAE as master; `size` in bits (default: the KME's key size);
    each additional slave SAE may also collect each key once."""
    body: dict[str, Any] = {"number": number}
    if size is not None:
        body["size"] = size
    if additional_slave_sae_ids:
        body["additional_slave_SAE_IDs"] = list(additional_slave_sae_ids)
    target = f"{KEYS_PREFIX}{_segment(slave_sae_id)}/enc_keys"
    return Call("POST", target, json.dumps(body).encode(), _decode_keys)


def dec_keys(master_sae_id: str, key_ids: Sequence[str]) -> Call[list[DeliveredKey]]:
    """The keys with these IDs, which `master_sae_id` got for this SAE as slave."""
    if isinstance(key_ids, str):
        raise TypeError("key_ids must be a sequence of key IDs, not one string")
    body = {"key_IDs": [{"key_ID": key_id} for key_id in key_ids]}
    target = f"{KEYS_PREFIX}{_segment(master_sae_id)}/dec_keys"
    return Call("POST", target, json.dumps(body).encode(), _decode_keys)


def site_status() -> Call[dict[str, Any]]:
    """The daemon's site status (links, devices, pools, recent errors); local socket only."""
    return Call("GET", STATUS_PATH, None, decode_json)


def metrics() -> Call[str]:
    """The daemon's Prometheus metrics, in the text format; local socket only."""
    return Call("GET", METRICS_PATH, None, _decode_text)


def request(method: str, target: str, body: bytes | None) -> Call[tuple[int, bytes]]:
    """A raw exchange with the service: (status, body)."""
    return Call(method, target, body, lambda status, answer: (status, answer))


def send_message(
    recipient_sae_id: str,
    body: bytes,
    *,
    message_id: str | None = None,
    protection: str = "hybrid",
) -> Call[str]:
    """Send `body` to an SAE at another site; returns the message ID once the recipient's
    site has stored it. After a failure, sending again with the same `message_id` is
    safe: the message is kept once. `protection` "otp" asks for a one-time pad."""
    obj: dict[str, Any] = {"body": base64.b64encode(body).decode("ascii")}
    if protection != "hybrid":
        obj["protection"] = protection
    if message_id is not None:
        obj["message_ID"] = message_id
    target = f"{SEND_PREFIX}{_segment(recipient_sae_id)}"
    return Call("POST", target, json.dumps(obj).encode(), _decode_message_id)


def receive_message(wait: float = 0.0, *, after: int = 0) -> Call[Message | None]:
    """The oldest unacknowledged message for this SAE (after sequence number `after`),
    waiting up to `wait` seconds; None if none came."""
    target = f"{INBOX_PATH}?timeout={wait:g}&after={after}"
    return Call("GET", target, None, _decode_first_message, extra_time=wait)


def acknowledge_message(message_id: str) -> Call[None]:
    """Erase a handled message at the daemon; it is not delivered again."""
    try:
        canonical = uuid.UUID(message_id)
    except (ValueError, TypeError, AttributeError) as exc:
        raise ValueError(f"{message_id!r} is not a message ID (a UUID)") from exc
    return Call("DELETE", f"{INBOX_PREFIX}{canonical}", None, _decode_nothing)


def messages(*, after: int = 0) -> Stream[Message]:
    """Every unacknowledged message (after sequence number `after`), then each new one as it
    arrives, on a connection of its own. Messages not acknowledged come again on the next
    stream."""
    return Stream(f"{INBOX_PATH}?stream=1&after={after}", message_from)


def events(kinds: Sequence[str] = ()) -> Stream[dict[str, Any]]:
    """Key events for this SAE from now on, each a dict with at least "event", "seq" and
    "at"; `kinds` limits them. On a connection of its own."""
    if isinstance(kinds, str):
        kinds = [kinds]
    target = f"{EVENTS_PATH}?kinds={','.join(kinds)}" if kinds else EVENTS_PATH
    return Stream(target, _as_is)


def sae_header(sae_id: str | None) -> list[tuple[str, str]]:
    """The header naming the SAE to act as (`X-SAE-ID`; none when not chosen)."""
    return [] if sae_id is None else [("X-SAE-ID", sae_id)]


def _segment(sae_id: str) -> str:
    return quote(sae_id, safe="")


def _as_is(obj: dict[str, Any]) -> dict[str, Any]:
    return obj


# -- answers --------------------------------------------------------------------------------


def decode_json(status: int, body: bytes) -> dict[str, Any]:
    """The JSON object of a 200 answer; KeyServiceClientError (from the standard's Error
    object when there is one) for any other status."""
    try:
        obj = json.loads(body)
    except ValueError:
        obj = None
    if status != 200:
        if isinstance(obj, dict) and isinstance(obj.get("message"), str):
            details = obj.get("details")
            raise KeyServiceClientError(
                status, obj["message"], details if isinstance(details, list) else []
            )
        raise KeyServiceClientError(status, body[:200].decode("utf-8", "replace") or "no message")
    if not isinstance(obj, dict):
        raise BadResponse("the key service answered 200 without a JSON object")
    return obj


def _decode_text(status: int, body: bytes) -> str:
    if status != 200:
        decode_json(status, body)  # raises with the service's Error object
    return body.decode("utf-8", "replace")


def _decode_nothing(status: int, body: bytes) -> None:
    decode_json(status, body)


def _decode_keys(status: int, body: bytes) -> list[DeliveredKey]:
    entries = key_entries(decode_json(status, body), KEY_SERVICE)
    return [DeliveredKey(str(key_id), material) for key_id, material in entries]


def _decode_message_id(status: int, body: bytes) -> str:
    found = decode_json(status, body).get("message_ID")
    if not isinstance(found, str):
        raise BadResponse("the service's answer to a sent message has no message_ID")
    return found


def message_from(obj: Any) -> Message:
    """A `Message` from the service's message object."""
    try:
        return Message(
            str(obj["message_ID"]),
            int(obj["seq"]),
            str(obj["sender_SAE_ID"]),
            str(obj["sender_site_ID"]),
            str(obj["protection"]),
            float(obj["received_at"]),
            base64.b64decode(obj["body"], validate=True),
        )
    except (KeyError, TypeError, ValueError, binascii.Error) as exc:
        raise BadResponse(
            f"the service sent a malformed message object ({type(exc).__name__}: {exc})"
        ) from None


def _decode_first_message(status: int, body: bytes) -> Message | None:
    found = decode_json(status, body).get("messages")
    if not isinstance(found, list):
        raise BadResponse("the service's inbox answer has no messages array")
    return message_from(found[0]) if found else None


# -- streamed answers ----------------------------------------------------------------------


class LineStream:
    """The bytes of a streamed answer (one JSON object per line) in, objects out (sans-IO).

    `ended` turns true when the stream is over; the front ends then raise
    `KeyServiceUnreachable` (the service went away or closed the stream)."""

    def __init__(self, host: str, max_line: int = KEY_SERVICE.max_answer_bytes) -> None:
        self.http = ClientConnection(host)
        self.max_line = max_line
        self.ended = False
        self._status = 0
        self._pending = bytearray()
        self._error = bytearray()

    def request(self, target: str, sae_id: str | None) -> bytes:
        return self.http.send_request("GET", target, json_headers(None, sae_header(sae_id)))

    def receive(self, data: bytes) -> list[dict[str, Any]]:
        """The objects complete so far; a non-200 answer raises its KeyServiceClientError."""
        out: list[dict[str, Any]] = []
        for event in receive_events(self.http, data, KEY_SERVICE):
            if isinstance(event, Response):
                self._status = event.status
            elif isinstance(event, Data):
                if self._status != 200:
                    if len(self._error) < 64 * 1024:
                        self._error += event.data
                    continue
                self._pending += event.data
                out += self._lines()
            elif isinstance(event, EndOfMessage | ConnectionClosed):
                if self._status not in (0, 200):
                    decode_json(self._status, bytes(self._error))
                self.ended = True
        return out

    def _lines(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        start = 0
        while (end := self._pending.find(b"\n", start)) >= 0:
            line = bytes(self._pending[start:end])
            start = end + 1
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as exc:
                raise BadResponse(f"malformed line in the stream: {exc}") from None
            if not isinstance(obj, dict):
                raise BadResponse("a line of the stream is not a JSON object")
            out.append(obj)
        del self._pending[:start]
        if len(self._pending) > self.max_line:
            raise BadResponse(f"a streamed line is over {self.max_line} bytes")
        return out
