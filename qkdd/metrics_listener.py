"""Prometheus metrics on a listener of their own, off by default (``[metrics]`` in the config).

The API socket serves the metrics too (``GET /qkdd/v1/metrics``), but a TCP proxy in front of
it, so that Prometheus can scrape, would expose ``enc_keys`` on TCP as well. This listener
serves one resource: ``GET`` (or ``HEAD``) ``/metrics``, on a TCP address (e.g.
127.0.0.1:9447) or on a Unix socket of its own. Every other path is answered 404, every other
method 405. The body is the daemon's exposition (``SiteMetrics.exposition``: the Prometheus
text format, or OpenMetrics when the Accept header asks for it). Nothing here authenticates
the caller: the listener belongs where only the scraper reaches it (loopback, or a socket's
mode and group). Metrics never carry key material or key IDs.

Connections are handled by the API's code (`qkdd.http_server.serving.serve_stream`: deadlines,
keep-alive, reason phrases) and capped like the API's (`qkdd.http_server.limits`), with a small
table of their own so that scrapers and the API never take each other's room: over a cap the
oldest idle connection gives way, and with none idle the newcomer is answered 503 and closed.

`MetricsHandler` is sans-IO; `serve_metrics` is the Trio wiring. The listener is set up at
start; a changed ``[metrics]`` table takes effect at the next restart (SIGHUP says so).
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
from collections.abc import Callable
from typing import Final
from urllib.parse import urlsplit

import trio

from qkdd.config import MetricsConfig
from qkdd.constants import (
    DEFAULT_REQUEST_TIMEOUT,
    LISTEN_BACKLOG,
    MAX_METRICS_CONNECTIONS,
    METRICS_PRIVILEGED_RESERVE,
)
from qkdd.etsi014.key_pool import KeyServiceError
from qkdd.http_server.accept import ConnectionGate, ConnectionSlot, accept_forever, refuse_now
from qkdd.http_server.exchange import ApiRequest, ApiResponse, Caller
from qkdd.http_server.limits import ConnectionLimits, ConnectionTable
from qkdd.http_server.serving import serve_stream
from qkdd.http_server.unix_socket import bind_unix, peer_caller, remove_if_ours

__all__ = [
    "METRICS_ROUTE",
    "MetricsHandler",
    "MetricsListenerError",
    "metrics_connection_table",
    "serve_metrics",
]

log = logging.getLogger("qkdd.metrics")

METRICS_ROUTE: Final = "/metrics"
_METHODS: Final = ("GET", "HEAD")
# A scrape is a GET without a body; anything larger is not a scrape.
MAX_BODY: Final = 1024
_TEXT: Final = (("content-type", "text/plain; charset=utf-8"),)

# The exposition for an Accept header: body and content type (`SiteMetrics.exposition`).
Exposition = Callable[[str], tuple[bytes, str]]


class MetricsListenerError(KeyServiceError):
    """The metrics listener cannot be set up from its configuration."""


class MetricsHandler:
    """Answers ``GET``/``HEAD /metrics`` with the exposition; 404 and 405 otherwise."""

    def __init__(self, exposition: Exposition) -> None:
        self._exposition = exposition

    def handle(self, request: ApiRequest, caller: Caller) -> ApiResponse:
        if _path(request.target) != METRICS_ROUTE:
            return _text(404, f"not found; this listener serves only GET {METRICS_ROUTE}")
        if request.method not in _METHODS:
            return _text(
                405,
                f"method not allowed; use {' or '.join(_METHODS)}",
                (("allow", ", ".join(_METHODS)),),
            )
        body, content_type = self._exposition(", ".join(request.header_values("accept")))
        return ApiResponse(200, (("content-type", content_type),), body, note="metrics")

    def body_limit(self, target: str) -> int:
        return MAX_BODY

    def body_too_large(self, target: str, limit: int) -> ApiResponse:
        return _text(413, f"request body over {limit} bytes; a scrape sends none")


def _path(target: str) -> str | None:
    """The path of an origin-form or absolute-form request target (None if malformed)."""
    if target.startswith("/"):
        return target.partition("?")[0]
    try:
        return urlsplit(target).path
    except ValueError:
        return None


def _text(status: int, message: str, headers: tuple[tuple[str, str], ...] = ()) -> ApiResponse:
    return ApiResponse(
        status, _TEXT + headers, message.encode() + b"\n", note=f"message={message!r}"
    )


def metrics_connection_table(*, unix: bool) -> ConnectionTable:
    """The metrics listener's own connection caps (by uid on a Unix socket, by address on
    TCP, where scrapers on this host all share 127.0.0.1)."""
    limits = ConnectionLimits(
        max_total=MAX_METRICS_CONNECTIONS,
        max_per_owner=MAX_METRICS_CONNECTIONS,
        privileged_reserve=METRICS_PRIVILEGED_RESERVE if unix else 0,
    )
    return ConnectionTable(limits, privileged={0, os.getuid()} if unix else ())


async def serve_metrics(
    config: MetricsConfig,
    exposition: Exposition,
    *,
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
    connections: ConnectionTable | None = None,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the metrics on ``config.listen`` (TCP; port 0 picks a free one) or on the Unix
    socket ``config.socket`` (created with ``config.socket_mode``, removed on the way out)
    until cancelled. ``task_status.started(listeners)`` once connections are accepted.
    Raises `MetricsListenerError` when the address or socket cannot be had."""
    handler = MetricsHandler(exposition)
    unix = config.socket is not None
    gate = ConnectionGate(connections or metrics_connection_table(unix=unix), "metrics")
    listeners, bound_inode = await _listen(config)
    counter = itertools.count(1)

    async def serve_one(
        stream: trio.SocketStream, caller: Caller, who: str, slot: ConnectionSlot
    ) -> None:
        try:
            await serve_stream(
                stream,
                handler,
                caller,
                who=who,
                request_timeout=request_timeout,
                slot=slot,
                conn_id=next(counter),
                # A scrape every few seconds is routine, not news.
                request_log_level=logging.DEBUG,
            )
        finally:
            await trio.aclose_forcefully(stream)
            slot.release()

    try:
        async with trio.open_nursery() as nursery:

            def on_accept(stream: trio.SocketStream) -> None:
                caller, owner, who = _identify(stream, unix)
                slot = gate.admit(owner, who)
                if slot is None:
                    refuse_now(stream)
                    return
                nursery.start_soon(serve_one, stream, caller, who, slot)

            for listener in listeners:
                await nursery.start(
                    functools.partial(accept_forever, listener, on_accept, transport="metrics")
                )
            log.info(
                "event=metrics_listening address=%s path=%s max_connections=%d",
                config.describe(),
                METRICS_ROUTE,
                gate.table.limits.max_total,
            )
            task_status.started(listeners)
    finally:
        gate.log_totals()
        if config.socket is not None and bound_inode is not None:
            remove_if_ours(str(config.socket), bound_inode)
        for listener in listeners:
            await listener.aclose()


async def _listen(config: MetricsConfig) -> tuple[list[trio.SocketListener], int | None]:
    if config.socket is not None:
        try:
            listener, inode = await bind_unix(str(config.socket), config.socket_mode, "metrics")
        except KeyServiceError as exc:
            raise MetricsListenerError(f"{exc}; check [metrics] socket") from exc
        return [listener], inode
    assert config.listen is not None
    host, port = config.listen
    try:
        return await trio.open_tcp_listeners(port, host=host, backlog=LISTEN_BACKLOG), None
    except OSError as exc:
        raise MetricsListenerError(
            f"cannot listen on {config.describe()} for metrics: {exc.strerror or exc}; "
            "check [metrics] listen"
        ) from exc


def _identify(stream: trio.SocketStream, unix: bool) -> tuple[Caller, object, str]:
    """The caller, its owner in the connection table, and how log events name it."""
    if unix:
        caller = peer_caller(stream.socket, lambda uid, gid: frozenset())
        return caller, caller.uid, f"uid={caller.uid}"
    try:
        address = stream.socket.getpeername()
    except OSError:
        address = None
    host = address[0] if isinstance(address, tuple) else "unknown"
    caller = Caller(None, None, frozenset(), description=f"metrics client at {host}")
    return caller, host, f"peer={host}"
