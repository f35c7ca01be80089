"""The QKD network at one site (I/O): link state flooded over the direct links' sessions,
the routes computed from it, routed streams that carry end-to-end sessions with remote
sites, and relayed QKD material as source, relay or destination.

The cores are sans-IO (``qkdd.relay``: link_state, relay_routes, routed, relay_state,
hop_seal); this module moves their bytes and actions between the direct links' sessions
(``PeerLink.send_network``, ``PeerLink.network_handler``), the key store (relay pads in,
relayed QKD keys out) and the remote links (``qkdd.remote_link``). docs/protocol.md
§10–§12.

Relayed QKD material, one transfer (source = the end site that is its pair's link master):

    source       takes relay pads of hop 0: their material is the relayed material (the
                 first relay holds the same pads, so the frame's ciphertext is all zeros,
                 as in the classic trusted-node relay), one more for the MAC keys;
                 RELAY_KEYS to path[1]
    relay        takes the pads the frame names (its incoming hop), opens it, RELAY_ACK
                 back; takes pads of its next hop, RELAY_KEYS on; erases the material at
                 the next hop's RELAY_ACK
    destination  opens it, RELAY_ACK back, stores the material as QKD keys of the remote
                 link (IDs bound to the path: ``qkdd.hybrid.relayed_key_ids``), then
                 RELAY_CONFIRM to the source end to end, over the authenticated session
    source       at RELAY_CONFIRM stores the same QKD keys: from here the remote link's
                 key agreement (ML-KEM end to end, ``qkdd.peering``) consumes them

A few transfers per remote site are open at once (``SOURCE_WINDOW``); the two ends may
store them in different orders, so the remote link's slave (the destination) looks the
QKD keys of each batch up by the IDs the master lists (as with a fetch-by-ID device). A
transfer that fails anywhere is abandoned by the relay core's deadlines; its pads stay
consumed, and material the destination stored but the source never did is never agreed
(the agreement's horizon skips it, §5.2). A RELAY_CONFIRM the session did not carry is
sent again on the next end-to-end session.
"""

from __future__ import annotations

import collections
import functools
import logging
import math
import os
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Final

import trio
from qkdd_drivers.base import QkdKey

from qkdd.constants import RELAY_CONFIRM_TIMEOUT
from qkdd.crypto import HASH_SIZE, constant_time_equal
from qkdd.durability import Durable
from qkdd.hybrid import relayed_key_ids, relayed_material_check
from qkdd.keystore import KeyStore
from qkdd.link_params import is_link_master, relay_sae
from qkdd.peer.batching import PAD_BITS_MAX
from qkdd.peer.calls import CallKind, CallRefused
from qkdd.peer.network_messages import (
    LinkStateMessage,
    NetworkMessage,
    RelayAckMessage,
    RelayKeysMessage,
    RoutedMessage,
)
from qkdd.peering import PeerLink, PeerUnavailable
from qkdd.relay.hop_seal import (
    MAC_MATERIAL_SIZE,
    MAX_PATH_SITES,
    TRANSFER_ID_SIZE,
    HopKey,
    HopKeys,
    HopTagInvalid,
    RelayFrameError,
    RelayUsageError,
    decode_relay_ack,
    decode_relay_keys,
)
from qkdd.relay.link_state import LinkStateDatabase, Outgoing
from qkdd.relay.relay_routes import RouteTable, compute_routes
from qkdd.relay.relay_state import (
    HopAcked,
    MaterialDelivered,
    NextHopNeeded,
    RelayAction,
    RelayRejected,
    RelayRole,
    RelaySite,
    SendRelayAck,
    SendRelayKeys,
    TransferAbandoned,
)
from qkdd.relay.routed import (
    RouteAction,
    RoutedEnvelope,
    decode_routed,
    route_envelope,
)
from qkdd.routed_stream import RoutedEnds, RoutedStream
from qkdd.wakeup import Wakeup

log = logging.getLogger("qkdd.relay")

# Keys of a relayed transfer and their size: 8 KiB of material, 8 relay pads of each hop
# for its one-time pad and one for its two MAC keys (on hop 0 the pads are the material).
TRANSFER_KEYS: Final = 256
RELAYED_KEY_BITS: Final = 256
PAD_BYTES: Final = PAD_BITS_MAX // 8
# How often a site looks again for what it lacked: relay pads for a transfer or a forward
# (made by the link's agreement once its pools are full), a route.
RETRY_SECONDS: Final = 0.5
# Transfers a source keeps open per remote site (each awaits its RELAY_CONFIRM).
SOURCE_WINDOW: Final = 4
# Network messages queued per direct link (beyond it they are dropped: a routed stream's
# session then fails and is dialled again, a transfer is abandoned), and how many go out
# in one session write.
SEND_QUEUE: Final = 1024
SEND_BATCH: Final = 64
# RELAY_CONFIRM: transfer ID, status, the material check (qkdd.hybrid).
CONFIRM_STORED: Final = 0  # the destination stored every key of the transfer
CONFIRM_NOT_STORED: Final = 1  # it stored none (its buffer was full) or not all (IDs held)
CONFIRM_STATUSES: Final = (CONFIRM_STORED, CONFIRM_NOT_STORED)
CONFIRM_SIZE: Final = TRANSFER_ID_SIZE + 1 + HASH_SIZE
# RELAY_CONFIRMs a destination keeps to send again when the end-to-end session returns.
MAX_UNCONFIRMED: Final = 64


class _PadsMissing(Exception):
    """Inside a store transaction: a pad the frame names is not held here (roll back)."""


def relayed_keys(
    transfer_id: bytes, path: Sequence[str], key_bits: int, material: bytes
) -> list[QkdKey]:
    """The QKD keys a transfer's material becomes at both end sites."""
    size = key_bits // 8
    count = len(material) // size
    ids = relayed_key_ids(transfer_id, path, count)
    return [QkdKey(ids[i], material[i * size : (i + 1) * size]) for i in range(count)]


class RelayNode:
    """The site's part in the QKD network. ``direct``: the links with a QKD device (their
    sessions carry everything); remote links are added with ``add_remote``."""

    def __init__(
        self,
        site_id: str,
        direct: Mapping[str, PeerLink],
        store: KeyStore,
        durable: Durable,
        *,
        static_next_hops: Mapping[str, str] | None = None,
    ) -> None:
        now = trio.current_time()
        self.site_id = site_id
        self._direct = dict(direct)
        self._remotes: dict[str, PeerLink] = {}
        self._store = store
        self._durable = durable
        self._static = dict(static_next_hops or {})
        self.database = LinkStateDatabase(site_id, now)
        self._routes_from: tuple[int, frozenset[str]] | None = None
        self.routes = RouteTable(site_id, {site_id: (site_id,)})
        self.relay = RelaySite(site_id)
        self.ends = RoutedEnds(
            site_id,
            route=self._route,
            send=lambda peer, body: self._send(peer, RoutedMessage(body)),
            accepts=self._accepts,
        )
        self._outbox: list[tuple[str, NetworkMessage]] = []
        self._queues = {
            peer: trio.open_memory_channel[NetworkMessage](SEND_QUEUE) for peer in self._direct
        }
        self._wakeup = Wakeup()
        self._waiting_forwards: dict[bytes, NextHopNeeded] = {}
        self._sources: dict[bytes, tuple[tuple[str, ...], trio.Event]] = {}
        # Destination: RELAY_CONFIRM bodies to send, per remote site, in storing order.
        self._confirms: dict[str, collections.deque[bytes]] = {}
        self._confirm_wakeups: dict[str, Wakeup] = {}
        self._path_watchers: dict[str, Callable[[tuple[str, ...] | None], None]] = {}
        self._nursery: trio.Nursery | None = None
        self.counters = {
            "transfers_started": 0,
            "transfers_confirmed": 0,
            "transfers_relayed": 0,
            "transfers_delivered": 0,
            "transfers_abandoned": 0,
            "keys_relayed": 0,
        }
        for peer, link in self._direct.items():
            link.network_handler = self.on_message
            link.session_watchers.append(functools.partial(self._session_changed, peer))

    def add_remote(
        self, link: PeerLink, path_changed: Callable[[tuple[str, ...] | None], None]
    ) -> None:
        """A remote site this one gets keys with; its link's dials use ``open_stream``;
        ``path_changed`` is told its path whenever that changes."""
        self._remotes[link.peer.site_id] = link
        self._path_watchers[link.peer.site_id] = path_changed
        self._confirm_wakeups[link.peer.site_id] = wakeup = Wakeup()
        link.session_watchers.append(lambda up: wakeup.set())
        link.call_handlers[CallKind.RELAY_CONFIRM] = functools.partial(
            self._confirmed, link.peer.site_id
        )

    # -- what operators see ----------------------------------------------------------------

    def status(self) -> dict[str, object]:
        return {
            "links_up": sorted(self.database.up_neighbours),
            "routes": {
                site: list(path)
                for site, path in sorted(self.routes.paths.items())
                if site != self.site_id
            },
            "open_transfers": len(self.relay.open_transfers()),
            # Relay pads ready on each direct link, in bytes, each way: what relaying may
            # still take from that link's QKD material.
            "relay_pad_bytes": {
                peer: {
                    "sending": self._store.pad_ready_bytes(
                        relay_sae(self.site_id), relay_sae(peer)
                    ),
                    "receiving": self._store.pad_ready_bytes(
                        relay_sae(peer), relay_sae(self.site_id)
                    ),
                }
                for peer in sorted(self._direct)
            },
            **self.counters,
        }

    # -- the direct links' sessions --------------------------------------------------------

    def _session_changed(self, peer: str, up: bool) -> None:
        now = trio.current_time()
        if up:
            self._queue_link_state(self.database.link_up(peer, now))
        else:
            self._queue_link_state(self.database.link_down(peer, now))
        self._refresh_routes()
        self._wakeup.set()

    def _queue_link_state(self, outgoing: Sequence[Outgoing]) -> None:
        self._outbox += [(o.neighbour, LinkStateMessage(o.data)) for o in outgoing]
        if outgoing:
            self._wakeup.set()

    def _refresh_routes(self) -> None:
        """Recompute the routes when the link-state database or the up sessions changed;
        end the routed streams whose next hop went away (their sessions dial again)."""
        basis = (self.database.generation, self.database.up_neighbours)
        if basis == self._routes_from:
            return
        self._routes_from = basis
        old = self.routes
        self.routes = compute_routes(
            self.database.graph(),
            self.site_id,
            up_neighbours=self.database.up_neighbours,
            static_next_hops=self._static,
        )
        for remote in self._remotes:
            before, after = old.path(remote), self.routes.path(remote)
            if before != after:
                self._path_watchers[remote](after)
                log.info(
                    "event=route_changed remote=%s path=%s",
                    remote,
                    "-".join(after) if after else "none",
                )
        self.ends.end_rerouted(lambda remote: old.next_hop(remote) != self.routes.next_hop(remote))
        # A transfer of ours through a site we no longer reach will never be confirmed:
        # give it up now rather than at its deadline, freeing its place in the window.
        now = trio.current_time()
        for transfer_id, (path, done) in list(self._sources.items()):
            lost = next((site for site in path[1:] if self.routes.path(site) is None), None)
            if lost is not None and not done.is_set():
                for action in self.relay.abandon(transfer_id, f"{lost} is unreachable", now):
                    if isinstance(action, TransferAbandoned):
                        self._abandoned(action)

    async def on_message(self, sender: str, message: NetworkMessage) -> None:
        """A network message from direct peer ``sender``. A malformed one raises (the
        session that carried it broke the protocol); one that does not fit what this site
        holds is logged and dropped."""
        now = trio.current_time()
        if isinstance(message, LinkStateMessage):
            self._queue_link_state(self.database.receive(sender, message.body, now))
            self._refresh_routes()
        elif isinstance(message, RoutedMessage):
            await self.ends.on_envelope(decode_routed(message.body))
        elif isinstance(message, RelayKeysMessage):
            await self._on_relay_keys(sender, message.body)
        elif isinstance(message, RelayAckMessage):
            ack = decode_relay_ack(message.body)
            try:
                actions = self.relay.receive_ack(ack, sender, now)
            except RelayFrameError as exc:
                self._refused("RELAY_ACK", sender, exc)
                return
            await self._process(actions)

    def _refused(self, what: str, sender: str, exc: Exception) -> None:
        tampered = isinstance(exc, HopTagInvalid)
        (log.error if tampered else log.warning)(
            "event=relay_refused message=%s peer=%s reason=%r", what, sender, str(exc)
        )

    def _send(self, peer: str, message: NetworkMessage) -> bool:
        """Queue a message for the direct link to ``peer``; False (dropped) if its session
        is down or its queue is full. Never waits: it is called from sessions' receive
        loops, and a relay that waited there on a send could wait on itself (a session
        whose reader waits on a send into a session whose reader waits on it)."""
        link = self._direct.get(peer)
        if link is None or not link.session_up:
            return False
        try:
            self._queues[peer][0].send_nowait(message)
        except trio.WouldBlock:
            log.warning("event=network_message_dropped peer=%s reason='send queue full'", peer)
            return False
        return True

    async def _sender(self, peer: str) -> None:
        """Send what is queued for ``peer``, several messages per session write."""
        link = self._direct[peer]
        receive = self._queues[peer][1]
        async for message in receive:
            batch = [message]
            while len(batch) < SEND_BATCH:
                try:
                    batch.append(receive.receive_nowait())
                except trio.WouldBlock:
                    break
            try:
                await link.send_network(batch)
            except PeerUnavailable as exc:
                log.info(
                    "event=network_send_failed peer=%s messages=%d reason=%r",
                    peer,
                    len(batch),
                    str(exc),
                )

    # -- routed streams ----------------------------------------------------------------------

    async def open_stream(self, remote: str) -> RoutedStream:
        """A new routed stream to ``remote`` (the dial of its end-to-end session).
        ``NoRoute`` if no path leads there now."""
        return await self.ends.open(remote)

    def _route(self, envelope: RoutedEnvelope) -> RouteAction:
        return route_envelope(envelope, self.site_id, self.routes, self.database.up_neighbours)

    def _accepts(self, remote: str) -> bool:
        return remote in self._remotes

    # -- relayed QKD material ----------------------------------------------------------------

    def _take_hop_pads(self, peer: str, pieces: Sequence[int]) -> list[list[HopKey]] | None:
        """Relay pads of the link to ``peer`` (this site sending) covering each piece's bytes
        with pads of its own, all or none; None if the stock is short."""
        counts = [-(-size // PAD_BYTES) for size in pieces]
        pads = self._store.take_pads(
            relay_sae(self.site_id), relay_sae(peer), sum(counts) * PAD_BYTES
        )
        if not pads:
            return None
        keys = [HopKey(uuid.UUID(p.key_id).bytes, p.material) for p in pads]
        out, at = [], 0
        for count in counts:
            out.append(keys[at : at + count])
            at += count
        return out

    async def _on_relay_keys(self, sender: str, body: bytes) -> None:
        frame = decode_relay_keys(body)
        header = frame.header
        now = trio.current_time()
        ids = [str(uuid.UUID(bytes=i)) for i in header.pad_key_ids + header.mac_key_ids]
        # The pads first, then the transfer is admitted, in one transaction: a frame naming
        # pads not held here (a replay, or junk) leaves no state and takes no pad.
        try:
            with self._store.transaction() as db:
                found = self._store.take_pads_in(
                    db, ids, relay_sae(sender), relay_sae(self.site_id)
                )
                if found is None:
                    raise _PadsMissing
                self.relay.admit(frame, sender, now=now)
        except _PadsMissing:
            log.info(
                "event=relay_refused message=RELAY_KEYS peer=%s reason=%r",
                sender,
                "the relay pads it names are not held here",
            )
            return
        except RelayRejected as exc:
            self._refused("RELAY_KEYS", sender, exc)
            return
        await self._durable()  # the pads are gone for good before anything depends on them
        count = len(header.pad_key_ids)
        keys = [HopKey(uuid.UUID(k.key_id).bytes, k.material) for k in found]
        try:
            actions = self.relay.receive(
                frame,
                sender,
                HopKeys(tuple(keys[:count]), tuple(keys[count:])),
                trio.current_time(),
            )
        except RelayFrameError as exc:
            self._refused("RELAY_KEYS", sender, exc)
            return
        await self._process(actions)

    async def _process(self, actions: Sequence[RelayAction]) -> None:
        for action in actions:
            if isinstance(action, SendRelayKeys):
                self._send(action.peer, RelayKeysMessage(action.body))
            elif isinstance(action, SendRelayAck):
                self._send(action.peer, RelayAckMessage(action.body))
            elif isinstance(action, NextHopNeeded):
                self._waiting_forwards[action.transfer_id] = action
                await self._forward(action.transfer_id)
            elif isinstance(action, MaterialDelivered):
                await self._delivered(action)
            elif isinstance(action, HopAcked):
                if action.role is RelayRole.RELAY:
                    self.counters["transfers_relayed"] += 1
            elif isinstance(action, TransferAbandoned):
                self._abandoned(action)

    def _abandoned(self, action: TransferAbandoned) -> None:
        self.counters["transfers_abandoned"] += 1
        log.warning(
            "event=relay_abandoned transfer=%s role=%s reason=%r",
            action.transfer_id.hex(),
            action.role.value,
            action.reason,
        )
        self._waiting_forwards.pop(action.transfer_id, None)
        source = self._sources.get(action.transfer_id)
        if source is not None:
            source[1].set()

    async def _forward(self, transfer_id: bytes) -> None:
        """Seal a held transfer for its next hop, if that link has the relay pads now."""
        waiting = self._waiting_forwards.get(transfer_id)
        if waiting is None:
            return
        pads = self._take_hop_pads(waiting.peer, [waiting.material_size, MAC_MATERIAL_SIZE])
        if pads is None:
            self._wakeup.set()  # the run loop looks again in RETRY_SECONDS
            return
        del self._waiting_forwards[transfer_id]
        await self._durable()
        try:
            actions = self.relay.forward(
                transfer_id,
                HopKeys(tuple(pads[0]), tuple(pads[1])),
                now=trio.current_time(),
            )
        except RelayUsageError:
            return  # abandoned meanwhile: the pads stay consumed
        await self._process(actions)

    async def _delivered(self, delivered: MaterialDelivered) -> None:
        """Destination: store the material as the remote link's QKD keys, then queue its
        RELAY_CONFIRM. Never waits for buffer space: this runs in a direct session's
        receive loop, which carries the very session that would free it."""
        source = delivered.path[0]
        link = self._remotes.get(source)
        if link is None or not is_link_master(source, self.site_id):
            log.warning(
                "event=relay_delivery_dropped source=%s reason=%r",
                source,
                "not a [[remote]] here" if link is None else "the source is not the pair's master",
            )
            return
        keys = relayed_keys(
            delivered.transfer_id, delivered.path, delivered.key_bits, delivered.material
        )
        limit = link.params.qkd_buffer_keys + (SOURCE_WINDOW + 1) * TRANSFER_KEYS
        if self._store.qkd_key_count(source) + len(keys) > limit:
            stored, why = 0, f"the QKD buffer for {source} is full"
        else:
            stored, why = self._store.store_qkd_keys(source, keys), "its key IDs are held here"
            link.store_changed.set()
            await self._durable()  # stored before the source hears so
        status = CONFIRM_STORED
        if stored != len(keys):
            # Not stored as relayed (or only in part): the source must not keep it either.
            status = CONFIRM_NOT_STORED
            log.warning(
                "event=relay_delivery_refused source=%s transfer=%s reason=%r",
                source,
                delivered.transfer_id.hex(),
                why,
            )
        else:
            self.counters["transfers_delivered"] += 1
            self.counters["keys_relayed"] += len(keys)
        check = relayed_material_check(delivered.transfer_id, delivered.path, delivered.material)
        waiting = self._confirms.setdefault(source, collections.deque())
        if len(waiting) >= MAX_UNCONFIRMED:
            dropped = waiting.popleft()
            log.warning(
                "event=relay_confirm_dropped remote=%s transfer=%s reason='too many waiting'",
                source,
                dropped[:TRANSFER_ID_SIZE].hex(),
            )
        waiting.append(delivered.transfer_id + bytes([status]) + check)
        self._confirm_wakeups[source].set()

    async def _confirmer(self, remote: str, link: PeerLink) -> None:
        """Destination: send RELAY_CONFIRMs to ``remote`` one at a time, in the order the
        material was stored here, so the source stores it in the same order; one the
        session could not carry is sent again (on this session after a pause, or on the
        next). A refusal means the source gave the transfer up or holds other material."""
        wakeup = self._confirm_wakeups[remote]
        waiting = self._confirms.setdefault(remote, collections.deque())
        while True:
            wakeup.arm()
            if not waiting or not link.session_up:
                await wakeup.wait()
                continue
            body = waiting[0]
            transfer_id = body[:TRANSFER_ID_SIZE].hex()
            try:
                await link.call(CallKind.RELAY_CONFIRM, body, timeout=RELAY_CONFIRM_TIMEOUT)
            except CallRefused as exc:
                log.warning(
                    "event=relay_confirm_refused remote=%s transfer=%s reason=%r",
                    remote,
                    transfer_id,
                    str(exc),
                )
            except PeerUnavailable as exc:
                log.info(
                    "event=relay_confirm_deferred remote=%s transfer=%s reason=%r",
                    remote,
                    transfer_id,
                    str(exc),
                )
                await trio.sleep(RETRY_SECONDS)
                continue
            if waiting and waiting[0] is body:
                waiting.popleft()

    async def _confirmed(self, remote: str, body: bytes) -> bytes:
        """Source: RELAY_CONFIRM from the destination, over the end-to-end session: keep
        the material if the destination's check of it equals ours."""
        if len(body) != CONFIRM_SIZE or body[TRANSFER_ID_SIZE] not in CONFIRM_STATUSES:
            raise CallRefused(f"RELAY_CONFIRM is {CONFIRM_SIZE} bytes with status 0 or 1")
        transfer_id, status = body[:TRANSFER_ID_SIZE], body[TRANSFER_ID_SIZE]
        check = body[TRANSFER_ID_SIZE + 1 :]
        entry = self._sources.get(transfer_id)
        if entry is None or entry[0][-1] != remote:
            raise CallRefused("no transfer to that site with that ID is open here")
        path, done = entry
        try:
            material = self.relay.release_confirmed(transfer_id, trio.current_time())
        except RelayUsageError:
            raise CallRefused("that transfer was abandoned here") from None
        if status != CONFIRM_STORED:
            # The destination did not keep it (full, or IDs it held): neither end uses it.
            self.counters["transfers_abandoned"] += 1
            done.set()
            log.warning(
                "event=relay_transfer_not_stored remote=%s transfer=%s",
                remote,
                transfer_id.hex(),
            )
            return b""
        if not constant_time_equal(check, relayed_material_check(transfer_id, path, material)):
            # A relay altered it: each hop's MAC held, so one of the relays re-sealed
            # other material. Neither end may use it (the destination's copy is never
            # named by a batch, as it is not the source's).
            self.counters["transfers_abandoned"] += 1
            done.set()
            log.error(
                "event=relay_material_mismatch remote=%s transfer=%s path=%s",
                remote,
                transfer_id.hex(),
                "-".join(path),
            )
            raise CallRefused("the material arrived altered: a relay on the path changed it")
        keys = relayed_keys(transfer_id, path, RELAYED_KEY_BITS, material)
        link = self._remotes[remote]
        # No waiting for space (the window bounds what comes): this answers a call inside
        # the end-to-end session's receive loop.
        self._store.store_qkd_keys(remote, keys)
        link.store_changed.set()
        self.counters["transfers_confirmed"] += 1
        self.counters["keys_relayed"] += len(keys)
        done.set()
        return b""

    async def _source(self, remote: str, link: PeerLink) -> None:
        """Keep the remote link's QKD buffer filled with relayed material, up to
        ``SOURCE_WINDOW`` transfers at a time, while its end-to-end session runs (the
        destination confirms over it)."""
        material_size = TRANSFER_KEYS * RELAYED_KEY_BITS // 8
        target = max(TRANSFER_KEYS, link.params.qkd_buffer_keys - TRANSFER_KEYS)
        open_here: set[bytes] = set()

        async def await_confirmation(transfer_id: bytes, done: trio.Event) -> None:
            try:
                await done.wait()
            finally:
                del self._sources[transfer_id]
                open_here.discard(transfer_id)
                link.sink.space.set()  # room in the window

        async with trio.open_nursery() as transfers:
            while True:
                link.sink.space.arm()
                path = self.routes.path(remote)
                coming = len(open_here) * TRANSFER_KEYS
                ready = (
                    link.session_up
                    and len(open_here) < SOURCE_WINDOW
                    and link.sink.qkd_keys_buffered() + coming < target
                    and path is not None
                    and 1 < len(path) <= MAX_PATH_SITES
                )
                pads = None
                if ready:
                    assert path is not None
                    # The material is hop 0's pads themselves: the first relay holds
                    # them too, so the frame's ciphertext is all zeros and that relay
                    # takes exactly these pads (none is left behind in its store).
                    pads = self._take_hop_pads(path[1], [material_size, MAC_MATERIAL_SIZE])
                if pads is None or path is None:
                    with trio.move_on_after(RETRY_SECONDS):
                        await link.sink.space.wait()
                    continue
                material = b"".join(k.material for k in pads[0])[:material_size]
                transfer_id = os.urandom(TRANSFER_ID_SIZE)
                done = trio.Event()
                self._sources[transfer_id] = (path, done)
                open_here.add(transfer_id)
                transfers.start_soon(await_confirmation, transfer_id, done)
                await self._durable()  # the pads are gone for good before they are used
                actions = self.relay.start(
                    transfer_id,
                    path,
                    RELAYED_KEY_BITS,
                    material,
                    HopKeys(tuple(pads[0]), tuple(pads[1])),
                    now=trio.current_time(),
                )
                self.counters["transfers_started"] += 1
                log.debug("event=relay_started remote=%s path=%s", remote, "-".join(path))
                self._wakeup.set()  # its deadline
                await self._process(actions)

    # -- the loop ------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Flood link state, keep the routes, retry waiting forwards, time transfers out;
        one source task per remote site this one is the master of."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self.ends.nursery = nursery
            for remote, link in self._remotes.items():
                if is_link_master(self.site_id, remote):
                    nursery.start_soon(self._source, remote, link)
                else:
                    nursery.start_soon(self._confirmer, remote, link)
            for peer in self._direct:
                nursery.start_soon(self._sender, peer)
            task_status.started()
            while True:
                self._wakeup.arm()
                now = trio.current_time()
                if now >= self.database.next_deadline():
                    self._queue_link_state(self.database.on_deadline(now))
                await self._process(self.relay.poll(now))
                for transfer_id in list(self._waiting_forwards):
                    await self._forward(transfer_id)
                self._refresh_routes()
                outbox, self._outbox = self._outbox, []
                for peer, message in outbox:
                    self._send(peer, message)
                deadline = min(
                    self.database.next_deadline(), self.relay.next_deadline() or math.inf
                )
                if self._waiting_forwards:
                    deadline = min(deadline, trio.current_time() + RETRY_SECONDS)
                await self._wakeup.wait_until(deadline)
