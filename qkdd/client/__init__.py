"""The light client of qkdd's key service: ETSI GS QKD 014 keys (`status`, `enc_keys`,
`dec_keys`), secure messages to SAEs at other sites (`send_message`, `receive_message`,
`acknowledge_message`, `messages()`), key events (`events()`), and the site's own status and
metrics, on the daemon's local Unix socket or over HTTPS with a client certificate.

    from qkdd.client import AsyncioKeyClient      # asyncio
    from qkdd.client import BlockingKeyClient     # plain blocking code
    from qkdd.client import KeyClient             # Trio (also named TrioKeyClient)

Each is made with `Client(socket_path, sae_id=None, timeout=10)` or
`Client.tls(host, port, cert_file=..., key_file=..., ca_file=...)`, and keeps one HTTP/1.1
connection alive between calls; errors are `ClientError`s (`KeyServiceClientError` carries the
service's ETSI Error object, `KeyServiceUnreachable` says why it could not be reached).

Why this shape. Applications install the client without the daemon's dependencies, so the
package needs the standard library only: nothing under `qkdd.client` imports Trio (the Trio
front end imports it when a `KeyClient` is made), cryptography, pyserial or h11, nor the
daemon's own modules (only `qkdd.http_server.paths`, which is constants). The HTTP/1.1 it
needs is a small subset (one request at a time on a kept-alive connection; Content-Length,
chunked and read-to-close bodies), written once as a sans-IO state machine in `http` and
tested on its own, rather than pulling in h11 for it.

Everything that is not moving bytes is written once, without I/O: `http` (bytes to events),
`roundtrip` (a request and its whole answer on a kept-alive connection, TLS failures in
words, the Key container), `api` (each call: its signature and docstring, its request, how
its answer decodes), `endpoint` (where the service is, TLS context, the operator's messages
for connection failures) and `front`. A blocking and an async method cannot share one body,
so the calls are not written as methods at all: `front.FrontEnd` lists them once as a table,
each entry binding a call of `api` to a front end as a plain method (blocking) or a coroutine
function (asyncio, Trio), with the call's own signature for type checkers. What a call does on a
connection (keep it alive, retry once when the service had closed it while idle, abandon it
after a failure or a cancellation, tell failures in words) is likewise one generator in
`roundtrip` that yields actions (connect, send, receive, close) instead of doing them. The
three front ends (`blocking`, `asyncio_client`, `trio_client`) carry those actions out and
bound them in time, and that is all they hold, so they behave alike.

The daemon's driver for a KME serving ETSI GS QKD 014 (`qkdd_drivers.kme`) speaks HTTPS
through `roundtrip` too, with its own words and errors (`roundtrip.Service`): this package
is the one part of qkdd the drivers import, which is why `roundtrip` and what it imports
stay free of anything but the standard library and `qkdd.client.http`.
"""

from __future__ import annotations

from qkdd.client.api import DeliveredKey, Message
from qkdd.client.asyncio_client import AsyncioKeyClient
from qkdd.client.blocking import BlockingKeyClient
from qkdd.client.client_errors import (
    BadResponse,
    ClientError,
    KeyServiceClientError,
    KeyServiceUnreachable,
)
from qkdd.client.endpoint import DEFAULT_TIMEOUT, client_ssl_context
from qkdd.client.trio_client import KeyClient, TrioKeyClient

__all__ = [
    "DEFAULT_TIMEOUT",
    "AsyncioKeyClient",
    "BadResponse",
    "BlockingKeyClient",
    "ClientError",
    "DeliveredKey",
    "KeyClient",
    "KeyServiceClientError",
    "KeyServiceUnreachable",
    "Message",
    "TrioKeyClient",
    "client_ssl_context",
]
