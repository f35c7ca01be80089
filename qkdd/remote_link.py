"""A link to a remote site (a ``[[remote]]``): no QKD device and no TCP connection of its
own, yet the same link as a direct one (``qkdd.peering.PeerLink``) in everything else.

- Its QKD keys are material relayed hop by hop through trusted sites (``RelayedDevice``;
  ``qkdd.relay_node`` stores them).
- Its sessions run over routed streams (``qkdd.routed_stream``): the same handshake,
  ML-DSA bootstrap then PSKs, end to end, so relays can neither read nor forge it; the
  same key agreement, whose ML-KEM exchange is therefore end to end too. Keys handed out
  are hybrid as on a direct link: a relay that reads the relayed QKD material still lacks
  the ML-KEM half.
- ``answer_routed_stream`` is its listener: the responder handshake of a stream a remote
  site opened here.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import trio
from qkdd_drivers.base import FetchByIdDevice, KeySink

from qkdd.config import PeerConfig, SiteConfig
from qkdd.constants import FETCH_RETRY_DELAY, HANDSHAKE_TIMEOUT
from qkdd.crypto import PqcBackend, SigningKey
from qkdd.durability import Durable, already_durable
from qkdd.peer.arbiter import Origin
from qkdd.peer.connection import HandshakeComplete, MessageReceived, PeerConnection, Role
from qkdd.peer_sessions import SESSION_ERRORS, first_error
from qkdd.peering import (
    HandshakeObserver,
    PeerLink,
    complete_handshake,
    handshake_outcome,
    mode_name,
    no_observer,
)
from qkdd.relay_node import RelayNode
from qkdd.routed_stream import RoutedStream

log = logging.getLogger("qkdd.peer")


class RelayedDevice(FetchByIdDevice):
    """The QKD "device" of a remote link: up while a path to the remote site exists. Keys
    are not pulled from it; the relay node stores relayed material into the link's sink.

    It is a fetch-by-ID device so that the link's master lists the QKD key IDs of every
    batch: the two ends store transfers in the order they complete, which may differ.
    The destination (the slave) stores material before it confirms it, so the keys a
    batch names are already there; ``fetch_keys`` only waits a moment for the rare key
    that is not (a batch then fails and the next one is made)."""

    def __init__(self, node: RelayNode, remote: str) -> None:
        super().__init__()
        self._node = node
        self._remote = remote
        self._update(state="connecting", detail="no path to the site yet")

    def path_changed(self, path: tuple[str, ...] | None) -> None:
        if path is None:
            self._update(state="down", detail=f"no path to {self._remote} over the links up now")
        else:
            self._update(state="up", detail="relayed over " + " -> ".join(path))

    async def run(
        self, sink: KeySink, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        task_status.started()
        await trio.sleep_forever()

    async def fetch_keys(self, key_ids: Sequence[str]) -> None:
        await trio.sleep(FETCH_RETRY_DELAY)


class RemoteLink(PeerLink):
    """A ``PeerLink`` whose sessions are routed streams and whose QKD keys are relayed."""

    def __init__(
        self,
        config: SiteConfig,
        peer: PeerConfig,
        node: RelayNode,
        **kwargs: object,
    ) -> None:
        self._node = node
        self.relayed_device = RelayedDevice(node, peer.site_id)
        super().__init__(config, peer, device=self.relayed_device, **kwargs)  # type: ignore[arg-type]
        node.add_remote(self, self.relayed_device.path_changed)

    async def connect(self) -> trio.abc.Stream:
        return await self._node.open_stream(self.peer.site_id)

    def address_text(self) -> str:
        path = self._node.routes.path(self.peer.site_id)
        return "a path (none now)" if path is None else "path " + "-".join(path)


class _RemoteTrust:
    """PeerTrust for routed streams: only the site the stream came from, if a remote."""

    def __init__(self, link: PeerLink) -> None:
        self._link = link

    def pinned_key(self, site_id: str) -> bytes | None:
        return self._link.pinned_key(site_id)

    def bootstrap_allowed(self, site_id: str) -> bool:
        return self._link.bootstrap_allowed(site_id)

    def auth_key(self, site_id: str, key_id: str) -> bytes | None:
        return self._link.auth_key(site_id, key_id)


async def answer_routed_stream(
    stream: RoutedStream,
    links: dict[str, PeerLink],
    config: SiteConfig,
    backend: PqcBackend,
    signing_key: SigningKey,
    *,
    on_handshake: HandshakeObserver = no_observer,
    handshake_timeout: float = HANDSHAKE_TIMEOUT,
    durable: Durable = already_durable,
) -> None:
    """Run the responder's handshake on a stream a remote site opened, then serve the
    session on that site's link. The stream's source was checked to be a ``[[remote]]``
    (``RelayNode``); the handshake must name the same site."""
    link = links[stream.remote]
    conn = PeerConnection(
        Role.RESPONDER,
        backend=backend,
        local_site_id=config.site_id,
        signing_key=signing_key,
        trust=_RemoteTrust(link),
    )
    hello_mark = 0

    def hello_answered() -> None:
        nonlocal hello_mark
        hello_mark = link.hello_answered()

    async with stream:
        handshake: tuple[HandshakeComplete, list[MessageReceived]] | None = None
        try:
            with trio.fail_after(handshake_timeout):
                handshake = await complete_handshake(
                    stream, conn, on_hello=hello_answered, durable=durable
                )
        except* SESSION_ERRORS as group:
            exc = first_error(group)
            on_handshake(stream.remote, mode_name(conn), handshake_outcome(exc))
            link.handshake_failed(exc, f"routed stream from {stream.remote}")
        if handshake is None:
            return
        done, leftover = handshake
        stream.authenticated = done.peer_site_id == stream.remote
        if done.peer_site_id != stream.remote:  # trust above answers for no other site
            log.error(
                "event=routed_handshake_mismatch stream_from=%s claimed=%s",
                stream.remote,
                done.peer_site_id,
            )
            return
        await link.serve_session(
            stream, conn, done, leftover, origin=Origin.PEERS, hello_mark=hello_mark
        )
