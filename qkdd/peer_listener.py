"""The site's peer listener: accepts TCP connections from the peers that dial us (every
configured peer does, whichever end of the link it is), runs the responder handshake
under the pre-authentication rules (``qkdd.peer.admission``), and hands each
authenticated session to its ``PeerLink``, which decides whether it runs
(``qkdd.peer.arbiter``). Before a connection has authenticated, nothing it sends touches
a link.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import trio

from qkdd.config import SiteConfig
from qkdd.constants import HANDSHAKE_TIMEOUT, HELLO_TIMEOUT
from qkdd.crypto import PqcBackend, SigningKey
from qkdd.durability import Durable, already_durable
from qkdd.peer.admission import HandshakeLimiter, HandshakeSlot, normalise_address
from qkdd.peer.arbiter import Origin
from qkdd.peer.connection import HandshakeComplete, MessageReceived, PeerConnection, Role
from qkdd.peer.peer_errors import PeerAuthenticationError, VersionMismatch
from qkdd.peering import (
    SESSION_ERRORS,
    HandshakeEvicted,
    HandshakeObserver,
    PeerLink,
    complete_handshake,
    first_error,
    handshake_outcome,
    mode_name,
    no_observer,
)

log = logging.getLogger("qkdd.peer")


def _source_address(stream: trio.SocketStream) -> str:
    try:
        return normalise_address(str(stream.socket.getpeername()[0]))
    except OSError:
        return "unknown"


class _LinkRouter:
    """PeerTrust for the listener: asks the link of whichever site the peer claims to be.
    A HELLO naming a site that is not a configured peer is refused before any crypto."""

    def __init__(self, links: dict[str, PeerLink]) -> None:
        self._links = links

    def pinned_key(self, site_id: str) -> bytes | None:
        link = self._links.get(site_id)
        return link.pinned_key(site_id) if link else None

    def bootstrap_allowed(self, site_id: str) -> bool:
        link = self._links.get(site_id)
        return link.bootstrap_allowed(site_id) if link else False

    def auth_key(self, site_id: str, key_id: str) -> bytes | None:
        link = self._links.get(site_id)
        return link.auth_key(site_id, key_id) if link else None


async def _dialling_addresses(links: dict[str, PeerLink]) -> set[str]:
    """The IP addresses of the peers (every one dials us), from their configured
    ``address`` (host names resolved once, now): connections from them use the reserved
    handshake slots."""
    addresses: set[str] = set()
    for link in links.values():
        host = link.peer.address[0]
        try:
            found = await trio.socket.getaddrinfo(host, None, type=trio.socket.SOCK_STREAM)
        except OSError as exc:
            log.warning(
                "event=peer_address_unresolved peer=%s host=%s reason=%r: its connections "
                "compete with strangers for handshake slots",
                link.peer.site_id,
                host,
                str(exc),
            )
            continue
        addresses |= {normalise_address(str(info[4][0])) for info in found}
    return addresses


async def _respond(
    stream: trio.SocketStream,
    conn: PeerConnection,
    limiter: HandshakeLimiter,
    slot: HandshakeSlot,
    waiting: trio.CancelScope,
    *,
    on_hello: Callable[[], None],
    hello_timeout: float,
    handshake_timeout: float,
    durable: Durable = already_durable,
) -> tuple[HandshakeComplete, list[MessageReceived]]:
    """Run the responder's handshake under the pre-authentication rules: a HELLO within
    ``hello_timeout``, the whole handshake within ``handshake_timeout``; until the HELLO is
    accepted, ``waiting`` may be cancelled to evict the connection."""
    accepted = trio.current_time()

    def hello_arrived() -> None:
        limiter.hello_accepted(slot)
        waiting.deadline = math.inf  # only the handshake timeout is left
        on_hello()

    result = None
    with trio.fail_at(accepted + handshake_timeout):
        waiting.deadline = accepted + hello_timeout
        with waiting:
            result = await complete_handshake(stream, conn, on_hello=hello_arrived, durable=durable)
    if result is None:
        if slot.evicted:
            raise HandshakeEvicted("evicted before sending HELLO: a newcomer needed the slot")
        raise trio.TooSlowError(f"no HELLO within {hello_timeout:g} s of connecting")
    return result


async def serve_peers(
    config: SiteConfig,
    links: dict[str, PeerLink],
    backend: PqcBackend,
    signing_key: SigningKey,
    *,
    on_handshake: HandshakeObserver = no_observer,
    hello_timeout: float = HELLO_TIMEOUT,
    handshake_timeout: float = HANDSHAKE_TIMEOUT,
    durable: Durable = already_durable,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept peer connections on the site's listen address and route them to their link.

    Before a connection has authenticated, nothing it sends touches a link's session or
    state: a failure is logged, counted, and (with no session up) shown as the link's last
    error. ``on_handshake`` is told of the handshakes that fail or are refused here; a link
    tells its own of those that succeed. ``durable`` is awaited before handshake bytes are
    sent (the session's own sends use its link's)."""
    host, port = config.listen
    listeners = await trio.open_tcp_listeners(port, host=host)

    dialling = dict(links)  # both ends of every link dial
    trust = _LinkRouter(dialling)
    limiter = HandshakeLimiter(peer_addresses=await _dialling_addresses(dialling))

    def preauth_failed(conn: PeerConnection, address: str, exc: BaseException) -> None:
        """Log and count a handshake that failed; the claimed link keeps its session."""
        on_handshake(conn.peer_site_id or "unknown", mode_name(conn), handshake_outcome(exc))
        claimed = dialling.get(conn.peer_site_id or "")
        if claimed is not None:
            claimed.handshake_failed(exc, address)
        elif isinstance(exc, PeerAuthenticationError):
            log.error(
                "event=peer_authentication_failed peer=%s address=%s reason=%r",
                conn.peer_site_id or "unknown",
                address,
                str(exc),
            )
        elif isinstance(exc, VersionMismatch):
            log.error("event=peer_version_mismatch address=%s reason=%r", address, str(exc))
        else:
            log.info(
                "event=peer_connection_dropped address=%s reason=%r",
                address,
                str(exc) or type(exc).__name__,
            )

    async def on_connection(stream: trio.SocketStream) -> None:
        conn = PeerConnection(
            Role.RESPONDER,
            backend=backend,
            local_site_id=config.site_id,
            signing_key=signing_key,
            trust=trust,
        )
        address = _source_address(stream)
        waiting = trio.CancelScope()
        slot = limiter.admit(address, evict=waiting.cancel)
        if slot is None:
            log.warning(
                "event=handshake_refused address=%s reason='too many pending handshakes'", address
            )
            on_handshake("unknown", "unknown", "refused")
            await stream.aclose()
            return
        hello_mark = 0

        def hello_answered() -> None:
            # The claimed link orders this HELLO against its running session's messages.
            nonlocal hello_mark
            hello_mark = dialling[conn.peer_site_id or ""].hello_answered()

        async with stream:
            handshake: tuple[HandshakeComplete, list[MessageReceived]] | None = None
            try:
                try:
                    handshake = await _respond(
                        stream,
                        conn,
                        limiter,
                        slot,
                        waiting,
                        on_hello=hello_answered,
                        hello_timeout=hello_timeout,
                        handshake_timeout=handshake_timeout,
                        durable=durable,
                    )
                finally:
                    limiter.release(slot)
            except* SESSION_ERRORS as group:
                preauth_failed(conn, address, first_error(group))
            if handshake is None:
                return
            done, leftover = handshake
            await dialling[done.peer_site_id].serve_session(
                stream, conn, done, leftover, origin=Origin.PEERS, hello_mark=hello_mark
            )

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, on_connection, listeners)
        log.info("event=peer_listener_ready address=%s:%d", host, port)
        task_status.started(listeners)
