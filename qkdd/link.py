"""Key agreement on one link, for one authenticated session: which QKD keys become which
hybrid keys, and when a key may be handed out. No sockets and no clock: messages go in,
messages come out, ``poll(now)`` says what to do next. The key store is its durable state.

The link master (the site whose ID sorts first) picks QKD key IDs; the slave offers
one-time ML-KEM encapsulation keys. A batch is three-way:

    master: derive, store keys *pending*, consume QKD keys      -> KEY_BATCH
    slave:  derive, store keys *pending*, consume QKD keys      -> BATCH_ACK
    master: commit (keys *ready*)                               -> BATCH_DECISION
    slave:  commit (keys *ready*)

Each session starts with both sides sending their key-store identity: a side whose peer's
identity changed knows the peer lost its state and withdraws every key shared with it,
so no application is handed a key whose other half is gone.

A key is ready at a site only when the other site is known to hold it: the master learns
that from the ACK, the slave from the decision. If the session breaks anywhere in
between, the slave starts the next session with RESYNC (its pending batches) and the
master decides each one from its own records; the master's pending batches the slave does
not list were never stored there and are aborted. Nothing is ever ready on one side only.

Both sides also keep their QKD buffers in step: each sends its horizon (oldest keys and
newest key) when its oldest key changes, when its newest changed and a second has passed,
and at least every HEARTBEAT_INTERVAL; the receiver drops its orphans and answers with the
listed keys that can never be agreed (QKD_SKIP, rules in ``qkdd.qkd_buffer``). The horizon
doubles as a heartbeat: a peer silent for PEER_SILENCE_TIMEOUT, a RESYNC, BATCH_ACK or
BATCH_DECISION overdue, ends the session (``SessionDead`` from ``poll``); ``next_deadline``
says when ``poll`` must run next at the latest.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from typing import Final

from qkdd import labels
from qkdd.crypto import CryptoError, KemPrivateKey, PqcBackend
from qkdd.hybrid import HybridDeriver, KemExchange, KeyContext
from qkdd.keystore import KeyStore, NewHybridKey, StoredQkdKey
from qkdd.link_params import LinkError as LinkError
from qkdd.link_params import LinkParameters as LinkParameters
from qkdd.link_params import SessionDead as SessionDead
from qkdd.peer.messages import (
    HORIZON_KEYS_FIRST,
    MAX_HORIZON_KEYS,
    MAX_KEYS_PER_BATCH,
    MAX_QKD_KEYS_PER_KEY,
    BatchAck,
    BatchDecision,
    BatchEntry,
    BatchPurpose,
    KemOffer,
    KeyBatch,
    LinkMessage,
    PadDemand,
    PoolDemand,
    QkdHorizon,
    QkdSkip,
    Resync,
    StoreId,
)

log = logging.getLogger("qkdd.link")

# How long the slave waits for QKD keys the master already has: the two devices deliver
# the same stream, but not at the same instant.
QKD_KEY_WAIT_SECONDS: Final = 5.0
# How long a side waits for the reply to a batch message before it gives up on the
# session: 3x the time the slave may legitimately wait for its device's QKD keys.
BATCH_REPLY_TIMEOUT: Final = 3 * QKD_KEY_WAIT_SECONDS
# Each side sends its horizon at least this often: it is also the session's heartbeat.
HEARTBEAT_INTERVAL: Final = 5.0
# A peer heard from for this long is gone (three heartbeats lost): the session ends.
PEER_SILENCE_TIMEOUT: Final = 3 * HEARTBEAT_INTERVAL
# A horizon goes out again this soon when only our newest key changed: the peer may be
# waiting for a later key of ours to prove that keys it lacks never come.
HORIZON_REFRESH: Final = 1.0
# Sizes an authentication key (a PSK for the next handshakes) may have; the link master's
# config chooses (``auth_key_bits``, 256 by default).
AUTH_KEY_BITS_RANGE: Final = (128, 4096)
# A one-time pad is the raw material of whole QKD keys: at most this many bits (and at most
# MAX_QKD_KEYS_PER_KEY keys) each.
PAD_BITS_MAX: Final = 8192
# The most pads a peer's PAD_DEMAND may ask for per pair.
MAX_PAD_DEMAND: Final = 65536


class LinkAgreement:
    def __init__(
        self,
        params: LinkParameters,
        *,
        store: KeyStore,
        backend: PqcBackend,
        session_id: bytes,
    ) -> None:
        self.params = params
        self._store = store
        self._backend = backend
        self._context = KeyContext(session_id, params.master_site_id, params.slave_site_id)
        # master side
        self._offer: KemOffer | None = None
        self._in_flight: KeyBatch | None = None
        self._remote_demand: dict[tuple[str, str], int] = {}
        self._remote_pad_demand: dict[tuple[str, str], int] = {}
        self._resynced = False
        # Every session the master makes a fresh authentication key first: it replaces,
        # once both sides hold it, the PSK (or bootstrap) that authenticated this session.
        self._auth_key_wanted = params.is_master
        # slave side
        self._offer_counter = 0
        self._kem_key: KemPrivateKey | None = None
        self._waiting: tuple[KeyBatch, float] | None = None
        # A horizon sent after the open batch shows our device got past the master's keys
        # we still lack: they never come, so the batch is rejected without waiting.
        self._horizon_since_batch = False
        self._waiting_doomed = False
        self._last_demand: PoolDemand | None = None
        self._last_pad_demand: PadDemand | None = None
        # Both: the peer's last horizon, whether it left something to decide once our
        # buffer changes, and our newest key when we last applied it.
        self._peer_horizon = QkdHorizon(())
        self._recheck = False
        self._checked_newest: str | None = None
        # Both: the peer's listed keys we skipped already (bounded, oldest forgotten first).
        self._skipped: dict[str, None] = {}
        # Both: our last horizon (its listed keys, newest, when sent) and the next size.
        self._sent = QkdHorizon(())
        self._sent_at: float | None = None
        self._horizon_keys = HORIZON_KEYS_FIRST
        # Both: the clock, from the first poll or message; when we last heard the peer.
        self._started_at: float | None = None
        self._heard_at = 0.0
        # Both: when the reply to our last batch message is overdue.
        self._reply_deadline: float | None = None

    # -- entry points ---------------------------------------------------------------------

    def start(self, now: float | None = None) -> list[LinkMessage]:
        """The session's first messages. The clock starts now (or at the first poll or
        message, if ``now`` is not given)."""
        if now is not None:
            self._clock(now)
        hello: list[LinkMessage] = [StoreId(self._store.store_id), self._horizon(now)]
        if self.params.is_master:
            return hello
        pending = self._store.pending_batches(self.params.peer_site_id)
        return [*hello, Resync(tuple(pending)), self._new_offer()]

    def heard(self, now: float) -> None:
        """The peer sent something (any message of the session counts as a heartbeat)."""
        self._clock(now)
        self._heard_at = now

    def _clock(self, now: float) -> None:
        if self._started_at is None:
            self._started_at = self._heard_at = now
            if self._sent_at is None:
                self._sent_at = now

    def on_message(self, message: LinkMessage, now: float) -> list[LinkMessage]:
        self.heard(now)
        if isinstance(message, StoreId):
            dropped = self._store.check_peer_store(self.params.peer_site_id, message.store_id)
            if dropped:
                log.warning(
                    "event=peer_state_lost peer=%s keys_dropped=%d reason='the peer's key store "
                    "is new: keys it held are gone, so ours are withdrawn'",
                    self.params.peer_site_id,
                    dropped,
                )
            return []
        if isinstance(message, QkdHorizon):
            self._peer_horizon = message
            # The master sent it after the open batch: every key it lists, and its newest,
            # came after the batch's keys from its device.
            self._horizon_since_batch = self._waiting is not None
            return self._apply_peer_horizon()
        if isinstance(message, QkdSkip):
            self._on_skip(message)
            return []
        if self.params.is_master:
            if isinstance(message, Resync):
                if self._resynced:
                    raise LinkError("a second RESYNC in one session")
                return self._on_resync(message)
            if not self._resynced:
                raise LinkError("peer sent key-agreement messages before RESYNC")
            if isinstance(message, KemOffer):
                self._offer = message
                return []
            if isinstance(message, PoolDemand):
                return self._on_demand(message)
            if isinstance(message, PadDemand):
                return self._on_pad_demand(message)
            if isinstance(message, BatchAck):
                return self._on_ack(message)
        else:
            if isinstance(message, KeyBatch):
                if self._waiting is not None:
                    raise LinkError("KEY_BATCH while another batch is open")
                self._waiting = (message, now + QKD_KEY_WAIT_SECONDS)
                self._horizon_since_batch = self._waiting_doomed = False
                return self._try_batch(now)
            if isinstance(message, BatchDecision):
                return self._on_decision(message)
        raise LinkError(
            f"unexpected {type(message).__name__} for the link "
            f"{'master' if self.params.is_master else 'slave'}"
        )

    def poll(self, now: float) -> list[LinkMessage]:
        """What to send now. Raises SessionDead when a reply or a heartbeat from the peer
        is overdue: the caller ends the session, and the next one settles what was open."""
        self._clock(now)
        self._check_deadlines(now)
        out: list[LinkMessage] = []
        if self._recheck:
            newest = self._store.newest_qkd_key_id(self.params.peer_site_id)
            if newest != self._checked_newest:
                out += self._apply_peer_horizon()
        if self.params.is_master:
            batch = self._make_batch()
            if batch is not None:
                self._reply_deadline = now + BATCH_REPLY_TIMEOUT
                out.append(batch)
        else:
            if self._waiting:
                out += self._try_batch(now)
            demand = self._demand()
            if demand != self._last_demand:
                self._last_demand = demand
                out.append(demand)
            if self.params.pad_keys:
                pad_demand = self._pad_demand()
                if pad_demand != self._last_pad_demand:
                    self._last_pad_demand = pad_demand
                    out.append(pad_demand)
        if self._horizon_due(now):
            out.append(self._horizon(now))
        return out

    def next_deadline(self) -> float | None:
        """The latest time ``poll`` must run again: a reply or heartbeat falls due, the
        slave's wait for QKD keys ends, or our next heartbeat is to be sent. None before
        the clock started. (New QKD keys from the device are not events here: the caller
        also polls every so often while keys flow.)"""
        if self._started_at is None or self._sent_at is None:
            return None
        times = [self._heard_at + PEER_SILENCE_TIMEOUT, self._sent_at + HEARTBEAT_INTERVAL]
        if self._reply_deadline is not None:
            times.append(self._reply_deadline)
        if self.params.is_master and not self._resynced:
            times.append(self._started_at + BATCH_REPLY_TIMEOUT)
        if self._waiting is not None:
            times.append(self._waiting[1])
        return min(times)

    def _check_deadlines(self, now: float) -> None:
        # A dropped or black-holed frame is only noticed when a later one arrives; when
        # nothing else flows, these deadlines end the session, and RESYNC settles it.
        if self._reply_deadline is not None and now > self._reply_deadline:
            waiting_for = "BATCH_ACK" if self.params.is_master else "BATCH_DECISION"
            raise SessionDead(f"no {waiting_for} within {BATCH_REPLY_TIMEOUT:g} s")
        assert self._started_at is not None
        if (
            self.params.is_master
            and not self._resynced
            and now > self._started_at + BATCH_REPLY_TIMEOUT
        ):
            raise SessionDead(f"no RESYNC within {BATCH_REPLY_TIMEOUT:g} s of the session start")
        if now > self._heard_at + PEER_SILENCE_TIMEOUT:
            raise SessionDead(f"nothing from the peer for {PEER_SILENCE_TIMEOUT:g} s")

    def awaited_qkd_keys(self) -> list[str]:
        """QKD key IDs an open batch names that our device has not delivered yet (a device
        that hands keys out by ID is asked for exactly these)."""
        if self._waiting is None:
            return []
        qkd_ids = [qid for e in self._waiting[0].entries for qid in e.qkd_key_ids]
        held = self._store.get_qkd_keys(self.params.peer_site_id, qkd_ids)
        return [qid for qid in qkd_ids if qid not in held]

    # -- both: keeping the QKD buffers in step -------------------------------------------

    def _horizon_due(self, now: float) -> bool:
        peer = self.params.peer_site_id
        if self._sent_at is None or now >= self._sent_at + HEARTBEAT_INTERVAL:
            return True
        oldest = self._store.oldest_qkd_key_ids(peer, 1)
        if oldest != list(self._sent.oldest_key_ids[:1]):
            return True
        newest = self._store.newest_qkd_key_id(peer)
        return newest != self._sent.newest_key_id and now >= self._sent_at + HORIZON_REFRESH

    def _horizon(self, now: float | None) -> QkdHorizon:
        """Our oldest QKD keys and our newest: lets the peer drop keys we never had, and
        tell us which of ours it never will."""
        peer = self.params.peer_site_id
        oldest = self._store.oldest_qkd_key_ids(peer, self._horizon_keys)
        newest = self._store.newest_qkd_key_id(peer) if oldest else None
        self._sent = QkdHorizon(tuple(oldest), newest)
        self._sent_at = now
        return self._sent

    def _open_batch_keys(self) -> set[str]:
        """QKD keys of our open batch: the slave's (it holds them while it waits for the
        rest) or the master's in flight (the peer is about to use them)."""
        batch = self._waiting[0] if self._waiting else self._in_flight
        if batch is None:
            return set()
        return {qid for e in batch.entries for qid in e.qkd_key_ids}

    def _apply_peer_horizon(self) -> list[LinkMessage]:
        """Line our buffer up with the peer's last horizon; QKD_SKIP what it holds that can
        never be agreed."""
        peer = self.params.peer_site_id
        horizon = self._peer_horizon
        open_keys = self._open_batch_keys()
        full = self._store.qkd_key_count(peer) >= self.params.qkd_buffer_keys
        outcome = self._store.apply_peer_horizon(
            peer,
            horizon.oldest_key_ids,
            horizon.newest_key_id,
            keep=open_keys,
            exclude=open_keys,
            buffer_full=full,
        )
        self._log_orphans(outcome.dropped, "peer-horizon")
        if self._waiting is not None and self._horizon_since_batch and outcome.anchored:
            self._waiting_doomed = True
        self._recheck = outcome.unresolved or (
            self._waiting is not None and not self._waiting_doomed
        )
        self._checked_newest = self._store.newest_qkd_key_id(peer)
        skip = [k for k in outcome.skip if k not in self._skipped]
        for key_id in skip:
            self._skipped[key_id] = None
        while len(self._skipped) > 4 * MAX_HORIZON_KEYS:
            del self._skipped[next(iter(self._skipped))]
        if not skip:
            return []
        log.info("event=qkd_keys_skipped peer=%s count=%d reason=never-here", peer, len(skip))
        return [
            QkdSkip(tuple(skip[i : i + MAX_HORIZON_KEYS]))
            for i in range(0, len(skip), MAX_HORIZON_KEYS)
        ]

    def _on_skip(self, message: QkdSkip) -> None:
        """The peer will never agree these keys of ours: use them up here too."""
        peer = self.params.peer_site_id
        before = self._store.qkd_key_count(peer)
        self._store.quarantine_qkd_keys(peer, message.key_ids, keep=self._open_batch_keys())
        self._log_orphans(before - self._store.qkd_key_count(peer), "peer-skipped")
        listed = set(self._sent.oldest_key_ids)
        if listed and listed <= set(message.key_ids):
            # Everything we listed was skipped: the run the peer never got goes on; list
            # more of it next time.
            self._horizon_keys = min(2 * self._horizon_keys, MAX_HORIZON_KEYS)
        else:
            self._horizon_keys = HORIZON_KEYS_FIRST

    def _drop_orphans(self, key_ids: Sequence[str], why: str) -> None:
        self._log_orphans(
            self._store.quarantine_qkd_keys_before(self.params.peer_site_id, key_ids), why
        )

    def _log_orphans(self, dropped: int, why: str) -> None:
        if dropped:
            log.warning(
                "event=qkd_keys_quarantined peer=%s count=%d reason=%s",
                self.params.peer_site_id,
                dropped,
                why,
            )

    # -- master ---------------------------------------------------------------------------

    def _on_resync(self, message: Resync) -> list[LinkMessage]:
        peer = self.params.peer_site_id
        decisions: list[LinkMessage] = []
        listed = set(message.pending_batch_ids)
        for batch_id in message.pending_batch_ids:
            # The slave holds this batch: commit it if we hold it too, else abort.
            if self._store.batch_state(peer, batch_id) is not None:
                self._store.commit_batch(peer, batch_id)
                decisions.append(BatchDecision(batch_id, True))
            else:
                decisions.append(BatchDecision(batch_id, False))
        for batch_id in self._store.pending_batches(peer):
            if batch_id not in listed:
                log.info(
                    "event=batch_aborted peer=%s batch=%d reason=not-stored-by-peer", peer, batch_id
                )
                self._store.abort_batch(peer, batch_id)
        # The slave decided every committed batch it did not list: nothing can ask about
        # those again (the listed ones wait until the slave acknowledges a later batch).
        self._store.forget_decided_batches(peer, keep=listed)
        self._resynced = True
        return decisions

    def _on_demand(self, message: PoolDemand) -> list[LinkMessage]:
        for master, slave, wanted in message.wanted:
            if master not in self.params.remote_sae_ids or slave not in self.params.local_sae_ids:
                raise LinkError(f"POOL_DEMAND for a pair we do not serve: {master}->{slave}")
            self._remote_demand[(master, slave)] = min(wanted, self.params.pool_size)
        return []

    def _on_pad_demand(self, message: PadDemand) -> list[LinkMessage]:
        for sender, recipient, wanted in message.wanted:
            if (
                sender not in self.params.remote_sae_ids
                or recipient not in self.params.local_sae_ids
            ):
                raise LinkError(f"PAD_DEMAND for a pair we do not serve: {sender}->{recipient}")
            self._remote_pad_demand[(sender, recipient)] = min(wanted, MAX_PAD_DEMAND)
        return []

    def _on_ack(self, message: BatchAck) -> list[LinkMessage]:
        self._reply_deadline = None
        batch = self._in_flight
        if batch is None or batch.batch_id != message.batch_id:
            raise LinkError(f"BATCH_ACK for batch {message.batch_id}, which is not in flight")
        self._in_flight = None
        peer = self.params.peer_site_id
        # The slave read this batch, so every decision sent before it: those batches'
        # records are no longer needed for a RESYNC.
        self._store.forget_decided_batches(peer, before=batch.batch_id)
        if message.accepted and not self._store.commit_batch(peer, batch.batch_id):
            # Our record of the batch is gone (the peer's store changed under it): the
            # slave must not keep keys we no longer hold.
            log.warning(
                "event=batch_aborted peer=%s batch=%d reason=unknown-here", peer, batch.batch_id
            )
            return [BatchDecision(batch.batch_id, False)]
        if message.accepted:
            if batch.purpose == BatchPurpose.AUTHENTICATION_KEYS:
                self._auth_key_wanted = False
                log.info("event=auth_key_rotated peer=%s key=%s", peer, batch.entries[0].key_id)
                return [BatchDecision(batch.batch_id, True)]
            demand = (
                self._remote_pad_demand
                if batch.purpose == BatchPurpose.PADS
                else self._remote_demand
            )
            for entry in batch.entries:
                if (entry.master_sae_id, entry.slave_sae_id) in demand:
                    demand[(entry.master_sae_id, entry.slave_sae_id)] -= 1
            log.debug(
                "event=batch_committed peer=%s batch=%d keys=%d",
                peer,
                batch.batch_id,
                len(batch.entries),
            )
            return [BatchDecision(batch.batch_id, True)]
        log.warning(
            "event=batch_rejected peer=%s batch=%d reason=%r", peer, batch.batch_id, message.reason
        )
        self._store.abort_batch(peer, batch.batch_id)
        return [BatchDecision(batch.batch_id, False)]

    def _deficits(self) -> list[tuple[int, tuple[str, str]]]:
        wants = []
        for pair in self.params.local_master_pairs():
            wants.append((self.params.pool_size - self._store.ready_count(*pair), pair))
        for pair, wanted in self._remote_demand.items():
            wants.append((wanted, pair))
        return sorted((w for w in wants if w[0] > 0), reverse=True)

    def _pad_deficits(self) -> list[tuple[int, tuple[str, str]]]:
        wants = []
        if self.params.pad_keys:
            for pair in self.params.local_master_pairs():
                wants.append((self.params.pad_keys - self._store.pad_ready_count(*pair), pair))
        for pair, wanted in self._remote_pad_demand.items():
            wants.append((wanted, pair))
        return sorted((w for w in wants if w[0] > 0), reverse=True)

    def _make_batch(self) -> KeyBatch | None:
        if self._in_flight is not None or self._offer is None or not self._resynced:
            return None
        if self._auth_key_wanted:
            # The session's first batch replaces the PSK that authenticated it.
            purpose, wanted, pair, size = (
                BatchPurpose.AUTHENTICATION_KEYS,
                1,
                ("", ""),
                self.params.auth_key_bits,
            )
        elif deficits := self._deficits():
            purpose, size = BatchPurpose.APPLICATION_KEYS, self.params.key_size_bits
            wanted, pair = min(deficits[0][0], MAX_KEYS_PER_BATCH), deficits[0][1]
        elif pad_deficits := self._pad_deficits():
            # Pads only once every key pool is full: keys come first.
            purpose, size = BatchPurpose.PADS, PAD_BITS_MAX
            wanted, pair = min(pad_deficits[0][0], MAX_KEYS_PER_BATCH), pad_deficits[0][1]
        else:
            return None
        if purpose == BatchPurpose.PADS:
            entries = self._take_pads(wanted, pair)
        else:
            entries = self._take_qkd_keys(wanted, pair, size)
        if not entries:
            return None
        offer, self._offer = self._offer, None  # each encapsulation key is used once
        try:
            shared, ciphertext = self._backend.kem_encapsulate(offer.public_key)
        except CryptoError as exc:
            raise LinkError(f"peer's ML-KEM offer is invalid: {exc}") from None
        deriver = HybridDeriver(self._context, KemExchange(offer.public_key, ciphertext, shared))
        batch_id = self._store.next_batch_id(self.params.peer_site_id)
        batch = KeyBatch(
            batch_id, offer.offer_id, purpose, ciphertext, tuple(e for e, _ in entries)
        )
        self._store_batch(batch, deriver, entries)
        self._in_flight = batch
        return batch

    def _take_qkd_keys(
        self, wanted: int, pair: tuple[str, str], size_bits: int
    ) -> list[tuple[BatchEntry, bytes]]:
        """Up to ``wanted`` entries, each with enough of the oldest QKD keys for its size."""
        key_bytes = size_bits // 8
        entries: list[tuple[BatchEntry, bytes]] = []
        ids: list[str] = []
        material = b""
        for qkd_key in self._store.oldest_qkd_keys(self.params.peer_site_id):
            ids.append(qkd_key.key_id)
            material += qkd_key.material
            if len(material) >= key_bytes:
                entry = BatchEntry(str(uuid.uuid4()), size_bits, pair[0], pair[1], tuple(ids))
                entries.append((entry, material))
                ids, material = [], b""
                if len(entries) == wanted:
                    break
        return entries

    def _take_pads(self, wanted: int, pair: tuple[str, str]) -> list[tuple[BatchEntry, bytes]]:
        """Up to ``wanted`` pads, each the raw material of the next whole QKD keys, up to
        PAD_BITS_MAX bits or MAX_QKD_KEYS_PER_KEY keys; a pad is only made full-sized."""
        limit = PAD_BITS_MAX // 8
        entries: list[tuple[BatchEntry, bytes]] = []
        ids: list[str] = []
        material = b""
        for qkd_key in self._store.oldest_qkd_keys(self.params.peer_site_id):
            if len(material) + len(qkd_key.material) > limit:
                break  # keys of odd sizes: stop at the first that does not fit
            ids.append(qkd_key.key_id)
            material += qkd_key.material
            if len(material) == limit or len(ids) == MAX_QKD_KEYS_PER_KEY:
                entry = BatchEntry(
                    str(uuid.uuid4()), len(material) * 8, pair[0], pair[1], tuple(ids)
                )
                entries.append((entry, material))
                ids, material = [], b""
                if len(entries) == wanted:
                    break
        return entries

    def _store_batch(
        self, batch: KeyBatch, deriver: HybridDeriver, entries: Sequence[tuple[BatchEntry, bytes]]
    ) -> None:
        """Derive the batch's keys and store them pending; both sides run exactly this."""
        qkd_ids = [qid for e, _ in entries for qid in e.qkd_key_ids]
        peer = self.params.peer_site_id
        if batch.purpose == BatchPurpose.AUTHENTICATION_KEYS:
            auth_keys = [
                StoredQkdKey(e.key_id, _derive(deriver, e, material, labels.LABEL_AUTH_KEY))
                for e, material in entries
            ]
            self._store.add_batch(peer, batch.batch_id, [], qkd_ids, auth_keys)
            return
        if batch.purpose == BatchPurpose.PADS:
            # Raw QKD material, not derived: a one-time pad must be information-theoretic.
            pads = [
                NewHybridKey(e.key_id, e.master_sae_id, e.slave_sae_id, e.size_bits, material)
                for e, material in entries
            ]
            self._store.add_batch(peer, batch.batch_id, [], qkd_ids, pads=pads)
            return
        keys = [
            NewHybridKey(
                e.key_id,
                e.master_sae_id,
                e.slave_sae_id,
                e.size_bits,
                _derive(deriver, e, material, labels.LABEL_HYBRID_KEY),
            )
            for e, material in entries
        ]
        self._store.add_batch(peer, batch.batch_id, keys, qkd_ids)

    # -- slave ----------------------------------------------------------------------------

    def _new_offer(self) -> KemOffer:
        self._offer_counter += 1
        self._kem_key = self._backend.kem_generate()
        return KemOffer(self._offer_counter, self._kem_key.public_bytes)

    def _try_batch(self, now: float) -> list[LinkMessage]:
        assert self._waiting is not None
        batch, deadline = self._waiting
        peer = self.params.peer_site_id
        if batch.offer_id != self._offer_counter or self._kem_key is None:
            raise LinkError(
                f"KEY_BATCH {batch.batch_id} names ML-KEM offer {batch.offer_id}, "
                f"current is {self._offer_counter}"
            )
        qkd_ids = [qid for e in batch.entries for qid in e.qkd_key_ids]
        reason = self._check_batch(batch, qkd_ids)
        if reason:
            return self._reject(batch, qkd_ids, reason)
        materials = self._store.get_qkd_keys(peer, qkd_ids)
        if len(materials) < len(qkd_ids):
            if now < deadline and not self._waiting_doomed:
                return []  # our device has not delivered them yet: wait
            missing = len(qkd_ids) - len(materials)
            if self._waiting_doomed:
                why = f"{missing} QKD keys never come here: our device is past them"
            else:
                why = f"{missing} QKD keys never arrived here"
            return self._reject(batch, qkd_ids, f"{why} (device desync)")
        self._waiting = None
        # The master skipped any older keys we hold: its device never delivered them.
        self._drop_orphans(qkd_ids, "not-in-peer-stream")
        kem_key, self._kem_key = self._kem_key, None
        shared = kem_key.decapsulate(batch.kem_ciphertext)
        deriver = HybridDeriver(
            self._context, KemExchange(kem_key.public_bytes, batch.kem_ciphertext, shared)
        )
        entries = [(e, b"".join(materials[q] for q in e.qkd_key_ids)) for e in batch.entries]
        if batch.purpose == BatchPurpose.PADS and any(
            len(material) * 8 != e.size_bits for e, material in entries
        ):
            return self._reject(batch, qkd_ids, "a one-time pad's QKD keys differ in size here")
        self._store_batch(batch, deriver, entries)
        self._reply_deadline = now + BATCH_REPLY_TIMEOUT
        return [BatchAck(batch.batch_id, True), self._new_offer()]

    def _check_batch(self, batch: KeyBatch, qkd_ids: Sequence[str]) -> str:
        peer = self.params.peer_site_id
        if len(set(qkd_ids)) != len(qkd_ids):
            return "a QKD key ID appears twice in the batch"
        if batch.purpose == BatchPurpose.AUTHENTICATION_KEYS:
            if len(batch.entries) != 1:
                return "an authentication batch holds exactly one key"
            entry = batch.entries[0]
            low, high = AUTH_KEY_BITS_RANGE
            if entry.master_sae_id or entry.slave_sae_id or not low <= entry.size_bits <= high:
                return f"an authentication key has no SAE pair and {low}-{high} bits"
        for entry in batch.entries if batch.purpose != BatchPurpose.AUTHENTICATION_KEYS else ():
            if not self.params.pair_allowed(entry.master_sae_id, entry.slave_sae_id):
                return (
                    f"SAE pair {entry.master_sae_id}->{entry.slave_sae_id} is not configured here"
                )
            if batch.purpose == BatchPurpose.PADS:
                if entry.size_bits > PAD_BITS_MAX:
                    return f"a one-time pad of {entry.size_bits} bits is over {PAD_BITS_MAX}"
            elif entry.size_bits != self.params.key_size_bits:
                return f"key size {entry.size_bits} differs from ours ({self.params.key_size_bits})"
        if self._store.batch_state(peer, batch.batch_id) is not None:
            return f"batch {batch.batch_id} was already used"
        for qid in qkd_ids:
            if self._store.is_qkd_key_consumed(peer, qid):
                return f"QKD key {qid} was already used"
        return ""

    def _reject(self, batch: KeyBatch, qkd_ids: Sequence[str], reason: str) -> list[LinkMessage]:
        log.warning(
            "event=batch_rejected peer=%s batch=%d reason=%r",
            self.params.peer_site_id,
            batch.batch_id,
            reason,
        )
        # Quarantine: these QKD key IDs were named in a failed batch and are never used.
        self._store.quarantine_qkd_keys(self.params.peer_site_id, qkd_ids)
        self._waiting = None
        return [BatchAck(batch.batch_id, False, reason), self._new_offer()]

    def _on_decision(self, message: BatchDecision) -> list[LinkMessage]:
        self._reply_deadline = None
        peer = self.params.peer_site_id
        if self._store.batch_state(peer, message.batch_id) is None:
            return []  # a decision for a batch we rejected: nothing to do
        if message.commit:
            self._store.commit_batch(peer, message.batch_id)
        else:
            self._store.abort_batch(peer, message.batch_id)
        self._store.forget_committed_batches(peer)
        return []

    def _pad_demand(self) -> PadDemand:
        wanted = []
        for pair in self.params.local_master_pairs():
            have = self._store.pad_ready_count(*pair)
            wanted.append((*pair, max(0, self.params.pad_keys - have)))
        return PadDemand(tuple(wanted))

    def _demand(self) -> PoolDemand:
        wanted = []
        for pair in self.params.local_master_pairs():
            wanted.append((*pair, max(0, self.params.pool_size - self._store.ready_count(*pair))))
        return PoolDemand(tuple(wanted))


def _derive(deriver: HybridDeriver, entry: BatchEntry, material: bytes, label: bytes) -> bytes:
    return deriver.derive(
        key_id=entry.key_id,
        master_sae_id=entry.master_sae_id,
        slave_sae_id=entry.slave_sae_id,
        qkd_key_ids=entry.qkd_key_ids,
        qkd_material=material,
        size_bits=entry.size_bits,
        label=label,
    )
