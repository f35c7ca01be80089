"""The key-event route, beside the ETSI API on the local Unix socket:

    GET /qkdd/v1/events?kinds=K1,K2   a stream of JSON lines, one event each (``qkdd.events``),
                                      for the SAE the caller acts as, from now on

The caller acts as an SAE exactly as on the ETSI routes. Without ``kinds`` every kind is
sent. The stream ends when the client closes it (or the daemon stops).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Final
from urllib.parse import parse_qs, urlsplit

from qkdd.api_paths import EVENTS_PATH
from qkdd.etsi014.handler import (
    Answer,
    ApiRequest,
    Caller,
    Extension,
    Streamed,
    caller_sae,
    error_response,
    reject,
)
from qkdd.events import KINDS, EventBus, Subscription

NDJSON_HEADERS: Final = (("content-type", "application/x-ndjson"),)


def event_routes(bus: EventBus, is_local_sae: Callable[[str], bool]) -> dict[str, Extension]:
    def events_route(request: ApiRequest, caller: Caller) -> Answer:
        if request.method != "GET":
            return error_response(
                405, "method not allowed here; use GET", headers=(("allow", "GET"),)
            )
        sae = caller_sae(request, caller, is_local_sae)
        query = parse_qs(urlsplit(request.target).query, keep_blank_values=True)
        unknown = set(query) - {"kinds"}
        if unknown:
            reject(400, f"unknown query parameters {', '.join(sorted(unknown))}")
        kinds = set(KINDS)
        if "kinds" in query:
            kinds = {k for value in query["kinds"] for k in value.split(",") if k}
            bad = kinds - KINDS
            if bad or not kinds:
                reject(
                    400,
                    f"kinds must be a comma-separated list of {', '.join(sorted(KINDS))}",
                    {"kinds": ",".join(query["kinds"])},
                )
        # Subscribe now, not when the stream starts: nothing between the two is missed.
        subscription = bus.subscribe(sae, kinds)
        return Streamed(
            200,
            NDJSON_HEADERS,
            lambda: _stream(subscription),
            note=f"sae={sae} events={','.join(sorted(kinds))}",
        )

    return {EVENTS_PATH: events_route}


async def _stream(subscription: Subscription) -> AsyncIterator[bytes]:
    try:
        while True:
            events = await subscription.next()
            yield b"".join(
                json.dumps(e.to_json(), separators=(",", ":")).encode() + b"\n" for e in events
            )
    finally:
        subscription.close()
