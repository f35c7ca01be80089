"""The daemon's own HTTP routes, beside the ETSI API on the local Unix socket:

    GET /qkdd/v1/status    the site status (``qkdd.status.site_status``), JSON
    GET /qkdd/v1/metrics   Prometheus metrics (``qkdd.metrics``), text exposition format

They are handler extensions (``RequestHandler(extensions=...)``). Who may call them: any
process the API socket admits, whether or not it may act as an SAE; the socket's mode and
group are the gate. They are not offered on the TLS listener, whose callers are remote SAEs.
Neither route returns key material.

Prometheus does not scrape Unix sockets itself: give it the metrics listener of its own
(``[metrics]``, ``qkdd.metrics_listener``), which serves the same exposition and nothing
else, or run ``qkdctl metrics`` for a textfile collector. A proxy in front of this socket
would expose the key API too. The metrics route honours the Accept header (OpenMetrics when
asked for, the Prometheus text format otherwise).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Final

from qkdd.http_server.exchange import (
    JSON_HEADERS,
    ApiRequest,
    ApiResponse,
    Caller,
    Extension,
    error_response,
)
from qkdd.http_server.paths import METRICS_PATH, STATUS_PATH

_READ_METHODS: Final = ("GET", "HEAD")


def admin_routes(
    status: Callable[[], dict[str, Any]],
    metrics: Callable[[str], tuple[bytes, str]],
) -> dict[str, Extension]:
    """The routes, given the status snapshot and the metrics exposition: ``metrics(accept)``
    returns the body and its content type for the request's Accept header."""

    def status_route(request: ApiRequest, caller: Caller) -> ApiResponse:
        if request.method not in _READ_METHODS:
            return _not_allowed()
        body = json.dumps(status(), separators=(",", ":")).encode()
        return ApiResponse(200, JSON_HEADERS, body, note="site status")

    def metrics_route(request: ApiRequest, caller: Caller) -> ApiResponse:
        if request.method not in _READ_METHODS:
            return _not_allowed()
        body, content_type = metrics(", ".join(request.header_values("accept")))
        return ApiResponse(200, (("content-type", content_type),), body, note="metrics")

    return {STATUS_PATH: status_route, METRICS_PATH: metrics_route}


def _not_allowed() -> ApiResponse:
    return error_response(
        405,
        f"method not allowed here; use {' or '.join(_READ_METHODS)}",
        headers=(("allow", ", ".join(_READ_METHODS)),),
    )
