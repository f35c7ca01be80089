"""Key agreement on one link for one authenticated session: which runs of QKD keys become
which batches of hybrid keys, and when a batch may be handed out. Sans-IO: messages go in,
messages come out; ``poll(now)`` says what to send when the caller was woken (a deadline
passed, or the store changed: keys from the device, keys handed out), and
``next_deadline()`` when it must be called next at the latest. The key store is its
durable state, reached through the narrow ``AgreementStore``.

The link master (the site whose ID sorts first) makes the batches; the slave offers
one-time ML-KEM encapsulation keys, WINDOW of them at a time, so up to WINDOW batches are
in flight. Each batch is three-way:

    master: derive, store keys *pending*, consume the QKD run   -> KEY_BATCH
    slave:  find the same run, derive, store *pending*, consume  -> BATCH_ACK (+ KEM_OFFER)
    master: commit (keys *ready*)                                -> BATCH_DECISION
    slave:  commit (keys *ready*)

A batch is ``count`` keys of one SAE pair and one size made from a run of the oldest QKD
keys; it names the run by its first key, length and digest (``KeyBatch``), and the key IDs
are derived (``qkdd.hybrid``). The slave handles batches in the order they came.

Each session starts with both sides sending their key-store identity: a side whose peer's
identity changed knows the peer lost its state and withdraws every key shared with it.
A key is ready at a site only when the other site is known to hold it: the master learns
that from the ACK, the slave from the decision. If the session breaks anywhere in between,
the slave starts the next session with RESYNC (its pending batches) and the master decides
each one from its own records; the master's pending batches the slave does not list were
never stored there and are aborted. Nothing is ever ready on one side only.

Both sides keep their QKD buffers in step with QKD_HORIZON and QKD_SKIP
(``qkdd.store.qkd_buffer`` has the rules); the horizon doubles as the heartbeat. A peer silent
for PEER_SILENCE_TIMEOUT, or a RESYNC, BATCH_ACK or BATCH_DECISION overdue, ends the
session (``SessionDead`` from ``poll``).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

from qkdd import labels
from qkdd.crypto import CryptoError, KemPrivateKey, PqcBackend
from qkdd.hybrid import BatchBinding, BatchDeriver, KemExchange, KeyContext
from qkdd.key_ids import key_id
from qkdd.keystore import NewHybridKey, NewKeyBlock, StoredQkdKey
from qkdd.link_params import LinkError, LinkParameters, SessionDead
from qkdd.peer.agreement_store import AgreementStore, id_bytes, id_text
from qkdd.peer.horizon import HEARTBEAT_INTERVAL, HorizonExchange, log_orphans
from qkdd.peer.messages import (
    MAX_KEYS_PER_BATCH,
    MAX_QKD_KEYS_PER_BATCH,
    BatchAck,
    BatchDecision,
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
from qkdd.store.qkd_ids import QkdRun, id_index

log = logging.getLogger("qkdd.link")

# Batches in flight at once (each uses one of the slave's ML-KEM offers): enough that the
# link is never idle for a round trip while the next batch is made.
WINDOW: Final = 4
# Keys in one batch at most (by default): one ML-KEM exchange, one derivation, one durable
# write per side and three messages cover this many keys.
BATCH_KEYS: Final = 4096
# How long the slave waits for QKD keys the master already has: the two devices deliver
# the same stream, but not at the same instant.
QKD_KEY_WAIT_SECONDS: Final = 5.0
# How long a side waits for the reply to a batch message before it gives up on the
# session: 3x the time the slave may legitimately wait for its device's QKD keys.
BATCH_REPLY_TIMEOUT: Final = 3 * QKD_KEY_WAIT_SECONDS
# A peer heard from for this long is gone (three heartbeats lost): the session ends.
PEER_SILENCE_TIMEOUT: Final = 3 * HEARTBEAT_INTERVAL
# Sizes an authentication key (a PSK for the next handshakes) may have; the link master's
# config chooses (``auth_key_bits``, 256 by default).
AUTH_KEY_BITS_RANGE: Final = (128, 4096)
# A one-time pad is this many bits of raw QKD material.
PAD_BITS_MAX: Final = 8192
# The most pads a peer's PAD_DEMAND may ask for per pair.
MAX_PAD_DEMAND: Final = 65536

_PURPOSE_LABELS: Final = {
    BatchPurpose.APPLICATION_KEYS: labels.LABEL_HYBRID_KEY,
    BatchPurpose.AUTHENTICATION_KEYS: labels.LABEL_AUTH_KEY,
    BatchPurpose.PADS: labels.LABEL_PAD,
}


@dataclass
class _InFlight:
    """A master's batch the slave has not acknowledged yet."""

    batch: KeyBatch
    qkd_ids: bytes  # its run's 16-byte QKD key IDs, concatenated
    # The newest batch whose decision had been sent when this batch went out: the slave's
    # ACK of this batch proves it read that decision (and every earlier one).
    decided_before: int
    first_key_id: str  # for the log (an authentication key's ID)


@dataclass
class _Waiting:
    """A slave's batch whose QKD keys have not all arrived here yet."""

    batch: KeyBatch
    deadline: float
    # A horizon after the batch showed our device got past keys of the run we lack.
    doomed: bool = False


class LinkAgreement:
    def __init__(
        self,
        params: LinkParameters,
        *,
        store: AgreementStore,
        backend: PqcBackend,
        session_id: bytes,
        batch_keys: int = BATCH_KEYS,
        list_qkd_ids: bool = False,
    ) -> None:
        """``list_qkd_ids``: the master lists each run's QKD key IDs in KEY_BATCH (the
        slave's device hands keys out by ID only)."""
        self.params = params
        self._store = store
        self._backend = backend
        self._context = KeyContext(session_id, params.master_site_id, params.slave_site_id)
        self._batch_keys = max(1, min(batch_keys, MAX_KEYS_PER_BATCH))
        self._list_qkd_ids = list_qkd_ids
        self._peer = params.peer_site_id
        # master side
        self._offers: deque[KemOffer] = deque()
        self._in_flight: deque[_InFlight] = deque()
        self._in_flight_keys: dict[tuple[int, str, str], int] = {}
        self._last_decision_sent = 0
        # While batches fly, the buffer size at which a whole batch may be made.
        self._whole_batch_at = 0
        self._remote_demand: dict[tuple[str, str], int] = {}
        self._remote_pad_demand: dict[tuple[str, str], int] = {}
        self._resynced = False
        # Every session the master makes a fresh authentication key first: it replaces,
        # once both sides hold it, the PSK (or bootstrap) that authenticated this session.
        self._auth_key_wanted = params.is_master
        # slave side
        self._offer_counter = 0
        self._kem_keys: dict[int, KemPrivateKey] = {}
        self._waiting: deque[_Waiting] = deque()
        # Batches we acknowledged whose decision has not come yet, and the keys the
        # accepted ones will add to each pool (counted in our demand already, so a demand
        # sent before the decision arrives does not ask for them twice).
        self._undecided: dict[int, KeyBatch | None] = {}
        self._coming: dict[tuple[int, str, str], int] = {}
        self._resync_open: set[int] = set()
        self._last_demand: PoolDemand | None = None
        self._last_pad_demand: PadDemand | None = None
        # Both: the QKD_HORIZON conversation (the slave defers applying the master's
        # while batches wait).
        self._horizons = HorizonExchange(store, self._peer, params.qkd_buffer_keys)
        # Both: the clock, from the first poll or message; when we last heard the peer.
        self._started_at: float | None = None
        self._heard_at = 0.0
        # Both: when the reply we wait for (BATCH_ACK, BATCH_DECISION) is overdue.
        self._reply_deadline: float | None = None
        self._handlers = self._dispatch_table()

    def _dispatch_table(self) -> dict[type, Callable[..., list[LinkMessage]]]:
        """(our role, message type) -> handler: a message not listed for our role ends the
        session."""
        both: dict[type, Callable[..., list[LinkMessage]]] = {
            StoreId: self._on_store_id,
            QkdHorizon: self._on_horizon,
            QkdSkip: self._on_skip,
        }
        if self.params.is_master:
            return {
                **both,
                Resync: self._on_resync,
                KemOffer: self._on_offer,
                PoolDemand: self._on_demand,
                PadDemand: self._on_pad_demand,
                BatchAck: self._on_ack,
            }
        return {**both, KeyBatch: self._on_batch, BatchDecision: self._on_decision}

    # -- entry points ---------------------------------------------------------------------

    def start(self, now: float | None = None) -> list[LinkMessage]:
        """The session's first messages. The clock starts now (or at the first poll or
        message, if ``now`` is not given)."""
        if now is not None:
            self._clock(now)
        hello: list[LinkMessage] = [StoreId(self._store.store_id), self._horizons.ours(now)]
        if self.params.is_master:
            return hello
        pending = self._store.pending_batches(self._peer)
        # Their keys may yet become ready: no demand until the master decided them all.
        self._resync_open = set(pending)
        return [*hello, Resync(tuple(pending)), *(self._new_offer() for _ in range(WINDOW))]

    def heard(self, now: float) -> None:
        """The peer sent something (any message of the session counts as a heartbeat)."""
        self._clock(now)
        self._heard_at = now

    def _clock(self, now: float) -> None:
        if self._started_at is None:
            self._started_at = self._heard_at = now
            self._horizons.started(now)

    def on_message(self, message: LinkMessage, now: float) -> list[LinkMessage]:
        self.heard(now)
        handler = self._handlers.get(type(message))
        if handler is None:
            role = "master" if self.params.is_master else "slave"
            raise LinkError(f"unexpected {type(message).__name__} for the link {role}")
        if (
            self.params.is_master
            and not self._resynced
            and not isinstance(message, (Resync, StoreId, QkdHorizon, QkdSkip))
        ):
            raise LinkError("peer sent key-agreement messages before RESYNC")
        return handler(message, now) + self._progress(now)

    def poll(self, now: float) -> list[LinkMessage]:
        """What to send now (called when woken: a deadline, or the store changed). Raises
        SessionDead when a reply or a heartbeat from the peer is overdue: the caller ends
        the session, and the next one settles what was open."""
        self._clock(now)
        self._check_deadlines(now)
        out: list[LinkMessage] = []
        if not self._waiting and self._horizons.worth_applying():
            out += self._apply_peer_horizon()
        out += self._progress(now)
        if self._horizons.due(now):
            out.append(self._horizons.ours(now))
        return out

    def _progress(self, now: float) -> list[LinkMessage]:
        """Whatever became possible: the master fills its window; the slave works through
        the batches that wait for QKD keys and tells the master what its pools want."""
        if self.params.is_master:
            return self._fill_window(now)
        out = self._work_waiting(now)
        if self._resync_open:
            return out
        demand = self._demand()
        if demand != self._last_demand:
            self._last_demand = demand
            out.append(demand)
        if self.params.pad_keys:
            pad_demand = self._pad_demand()
            if pad_demand != self._last_pad_demand:
                self._last_pad_demand = pad_demand
                out.append(pad_demand)
        return out

    def next_deadline(self) -> float | None:
        """The latest time ``poll`` must run again: a reply or heartbeat falls due, the
        slave's wait for QKD keys ends, or our next heartbeat is to be sent. None before
        the clock started. New QKD keys and keys handed out are the caller's to signal
        (it calls ``poll`` when the store changed)."""
        heartbeat = self._horizons.next_deadline()
        if self._started_at is None or heartbeat is None:
            return None
        times = [self._heard_at + PEER_SILENCE_TIMEOUT, heartbeat]
        if self._reply_deadline is not None:
            times.append(self._reply_deadline)
        if self.params.is_master and not self._resynced:
            times.append(self._started_at + BATCH_REPLY_TIMEOUT)
        if self._waiting:
            times.append(self._waiting[0].deadline)
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
        """QKD key IDs the first waiting batch lists that our device has not delivered yet
        (a device that hands keys out by ID is asked for exactly these)."""
        if not self._waiting or not self._waiting[0].batch.qkd_key_ids:
            return []
        wanted = [id_text(raw) for raw in self._waiting[0].batch.qkd_key_ids]
        held = self._store.get_qkd_keys(self._peer, wanted)
        return [qid for qid in wanted if qid not in held]

    # -- both: keeping the QKD buffers in step -------------------------------------------

    def _on_store_id(self, message: StoreId, now: float) -> list[LinkMessage]:
        dropped = self._store.check_peer_store(self._peer, message.store_id)
        if dropped:
            log.warning(
                "event=peer_state_lost peer=%s keys_dropped=%d reason='the peer's key store "
                "is new: keys it held are gone, so ours are withdrawn'",
                self._peer,
                dropped,
            )
        return []

    def _on_horizon(self, message: QkdHorizon, now: float) -> list[LinkMessage]:
        self._horizons.received(message)
        if self._waiting:
            # Sent after the waiting batches: if we hold the master's newest key, our
            # device got past every key of theirs; keys of a run we lack never come.
            newest = message.newest_key_id
            if newest is not None and (
                self._store.get_qkd_keys(self._peer, [newest])
                or self._store.is_qkd_key_consumed(self._peer, newest)
            ):
                for waiting in self._waiting:
                    waiting.doomed = True
            return []  # applied once no batch waits: a waiting run must not be dropped
        return self._apply_peer_horizon()

    def _in_flight_listed(self, listed: Sequence[str]) -> list[str]:
        """The peer's listed keys that a batch of ours in flight uses (the master consumed
        them already; the slave is about to)."""
        if not self._in_flight:
            return []
        return [
            k
            for k in listed
            if any(id_index(f.qkd_ids, id_bytes(k)) is not None for f in self._in_flight)
        ]

    def _apply_peer_horizon(self) -> list[LinkMessage]:
        listed = self._horizons.peer_horizon.oldest_key_ids
        return list(self._horizons.apply(self._in_flight_listed(listed)))

    def _on_skip(self, message: QkdSkip, now: float) -> list[LinkMessage]:
        self._horizons.skipped_by_peer(message)
        return []

    # -- both: one batch ------------------------------------------------------------------

    def _binding(self, batch: KeyBatch) -> BatchBinding:
        return BatchBinding(
            batch_id=batch.batch_id,
            purpose_label=_PURPOSE_LABELS[batch.purpose],
            master_sae_id=batch.master_sae_id,
            slave_sae_id=batch.slave_sae_id,
            size_bits=batch.size_bits,
            count=batch.count,
            qkd_first_key_id=batch.qkd_first_key_id,
            qkd_key_count=batch.qkd_key_count,
            qkd_ids_digest=batch.qkd_ids_digest,
        )

    def _store_batch(
        self,
        batch: KeyBatch,
        deriver: BatchDeriver,
        consumed: QkdRun | Sequence[str],
        material: bytes,
    ) -> bytes:
        """Derive the batch's keys and store them pending, consuming its QKD run; both
        sides run exactly this. Returns the batch's key-ID prefix."""
        binding = self._binding(batch)
        used = material[: batch.count * batch.size_bits // 8]
        if batch.purpose == BatchPurpose.PADS:
            # Raw QKD material, not derived: a one-time pad must be information-theoretic.
            prefix = deriver.key_id_prefix(binding)
            size = batch.size_bits // 8
            pads = [
                NewHybridKey(
                    key_id(prefix, i),
                    batch.master_sae_id,
                    batch.slave_sae_id,
                    batch.size_bits,
                    used[i * size : (i + 1) * size],
                )
                for i in range(batch.count)
            ]
            self._store.add_batch(self._peer, batch.batch_id, [], consumed, pads=pads)
            return prefix
        derived = deriver.derive(binding, used)
        if batch.purpose == BatchPurpose.AUTHENTICATION_KEYS:
            auth = [StoredQkdKey(derived.key_id(0), derived.key(0))]
            self._store.add_batch(self._peer, batch.batch_id, [], consumed, auth_keys=auth)
            return derived.id_prefix
        block = NewKeyBlock(
            derived.id_prefix,
            batch.master_sae_id,
            batch.slave_sae_id,
            batch.size_bits,
            batch.count,
            derived.material,
        )
        self._store.add_batch(self._peer, batch.batch_id, [block], consumed)
        return derived.id_prefix

    # -- master ---------------------------------------------------------------------------

    def _on_resync(self, message: Resync, now: float) -> list[LinkMessage]:
        if self._resynced:
            raise LinkError("a second RESYNC in one session")
        decisions: list[LinkMessage] = []
        listed = set(message.pending_batch_ids)
        for batch_id in message.pending_batch_ids:
            # The slave holds this batch: commit it if we hold it too, else abort.
            if self._store.batch_state(self._peer, batch_id) is not None:
                self._store.commit_batch(self._peer, batch_id)
                decisions.append(BatchDecision(batch_id, True))
            else:
                decisions.append(BatchDecision(batch_id, False))
        for batch_id in self._store.pending_batches(self._peer):
            if batch_id not in listed:
                log.info(
                    "event=batch_aborted peer=%s batch=%d reason=not-stored-by-peer",
                    self._peer,
                    batch_id,
                )
                self._store.abort_batch(self._peer, batch_id)
        # The slave decided every committed batch it did not list: nothing can ask about
        # those again (the listed ones wait until the slave acknowledges a later batch).
        self._store.forget_decided_batches(self._peer, keep=listed)
        if message.pending_batch_ids:
            self._last_decision_sent = max(message.pending_batch_ids)
        self._resynced = True
        return decisions

    def _on_offer(self, message: KemOffer, now: float) -> list[LinkMessage]:
        if len(self._offers) >= 2 * WINDOW:
            raise LinkError(f"more than {2 * WINDOW} ML-KEM offers outstanding")
        self._offers.append(message)
        return []

    def _on_demand(self, message: PoolDemand, now: float) -> list[LinkMessage]:
        for master, slave, wanted in message.wanted:
            if master not in self.params.remote_sae_ids or slave not in self.params.local_sae_ids:
                raise LinkError(f"POOL_DEMAND for a pair we do not serve: {master}->{slave}")
            flying = self._in_flight_keys.get((BatchPurpose.APPLICATION_KEYS, master, slave), 0)
            self._remote_demand[(master, slave)] = min(wanted, self.params.pool_size) - flying
        return []

    def _on_pad_demand(self, message: PadDemand, now: float) -> list[LinkMessage]:
        for sender, recipient, wanted in message.wanted:
            if (
                sender not in self.params.remote_sae_ids
                or recipient not in self.params.local_sae_ids
            ):
                raise LinkError(f"PAD_DEMAND for a pair we do not serve: {sender}->{recipient}")
            flying = self._in_flight_keys.get((BatchPurpose.PADS, sender, recipient), 0)
            self._remote_pad_demand[(sender, recipient)] = min(wanted, MAX_PAD_DEMAND) - flying
        return []

    def _on_ack(self, message: BatchAck, now: float) -> list[LinkMessage]:
        if not self._in_flight or self._in_flight[0].batch.batch_id != message.batch_id:
            raise LinkError(
                f"BATCH_ACK for batch {message.batch_id}, which is not in flight (or not next)"
            )
        flight = self._in_flight.popleft()
        batch = flight.batch
        self._reply_deadline = now + BATCH_REPLY_TIMEOUT if self._in_flight else None
        pair = (batch.purpose, batch.master_sae_id, batch.slave_sae_id)
        self._in_flight_keys[pair] -= batch.count
        # The slave read this batch, so every decision sent before it: those batches'
        # records are no longer needed for a RESYNC.
        self._store.forget_decided_batches(self._peer, before=flight.decided_before + 1)
        self._last_decision_sent = batch.batch_id
        if message.accepted and not self._store.commit_batch(self._peer, batch.batch_id):
            # Our record of the batch is gone (the peer's store changed under it): the
            # slave must not keep keys we no longer hold.
            log.warning(
                "event=batch_aborted peer=%s batch=%d reason=unknown-here",
                self._peer,
                batch.batch_id,
            )
            return [BatchDecision(batch.batch_id, False)]
        if message.accepted:
            if batch.purpose == BatchPurpose.AUTHENTICATION_KEYS:
                log.info("event=auth_key_rotated peer=%s key=%s", self._peer, flight.first_key_id)
            log.debug(
                "event=batch_committed peer=%s batch=%d keys=%d",
                self._peer,
                batch.batch_id,
                batch.count,
            )
            return [BatchDecision(batch.batch_id, True)]
        log.warning(
            "event=batch_rejected peer=%s batch=%d reason=%r",
            self._peer,
            batch.batch_id,
            message.reason,
        )
        self._store.abort_batch(self._peer, batch.batch_id)
        if batch.purpose == BatchPurpose.AUTHENTICATION_KEYS:
            self._auth_key_wanted = True
        else:
            demand = (
                self._remote_pad_demand
                if batch.purpose == BatchPurpose.PADS
                else self._remote_demand
            )
            key = (batch.master_sae_id, batch.slave_sae_id)
            if key in demand:
                demand[key] += batch.count
        return [BatchDecision(batch.batch_id, False)]

    def _wants(self) -> tuple[int, tuple[str, str], int, int] | None:
        """What the next batch is for: (purpose, pair, key size, keys wanted), the largest
        deficit first; pads only once every key pool is full."""
        if self._auth_key_wanted:
            return BatchPurpose.AUTHENTICATION_KEYS, ("", ""), self.params.auth_key_bits, 1
        app = BatchPurpose.APPLICATION_KEYS
        wants = []
        for pair in self.params.local_master_pairs():
            flying = self._in_flight_keys.get((app, *pair), 0)
            wants.append((self.params.pool_size - self._store.ready_count(*pair) - flying, pair))
        wants += [(wanted, pair) for pair, wanted in self._remote_demand.items()]
        best = max(wants, default=(0, ("", "")))
        if best[0] > 0:
            return app, best[1], self.params.key_size_bits, best[0]
        pads = BatchPurpose.PADS
        wants = []
        if self.params.pad_keys:
            for pair in self.params.local_master_pairs():
                flying = self._in_flight_keys.get((pads, *pair), 0)
                have = self._store.pad_ready_count(*pair)
                wants.append((self.params.pad_keys - have - flying, pair))
        wants += [(wanted, pair) for pair, wanted in self._remote_pad_demand.items()]
        best = max(wants, default=(0, ("", "")))
        if best[0] > 0:
            return pads, best[1], PAD_BITS_MAX, best[0]
        return None

    def _fill_window(self, now: float) -> list[LinkMessage]:
        out: list[LinkMessage] = []
        while self._resynced and self._offers and len(self._in_flight) < WINDOW:
            batch = self._make_batch(now)
            if batch is None:
                break
            out.append(batch)
        return out

    def _make_batch(self, now: float) -> KeyBatch | None:
        wants = self._wants()
        if wants is None:
            return None
        purpose, pair, size_bits, wanted = wants
        wanted = min(wanted, self._batch_keys)
        key_bytes = size_bits // 8
        buffered = self._store.qkd_key_count(self._peer)
        if self._in_flight and buffered < self._whole_batch_at:
            return None  # still short of a whole batch: do not read the run again
        run = self._store.oldest_qkd_run(self._peer, wanted * key_bytes, MAX_QKD_KEYS_PER_BATCH)
        if run is None:
            return None
        count = min(wanted, len(run.material) // key_bytes)
        if count == 0 or (self._in_flight and count < wanted):
            # A short batch only when none is in flight: while batches fly, wait for the
            # device to fill a whole one (fewer, larger batches at high rates). Until the
            # buffer holds about enough keys for it, the run is not read again.
            missing = wanted * key_bytes - len(run.material)
            per_key = max(1, len(run.material) // max(1, run.count))
            self._whole_batch_at = buffered + -(-missing // per_key)
            return None
        self._whole_batch_at = 0
        if len(run.material) >= (count + 1) * key_bytes or count < wanted:
            # The run reaches past the keys we make: take only the QKD keys they need.
            shorter = self._store.oldest_qkd_run(
                self._peer, count * key_bytes, MAX_QKD_KEYS_PER_BATCH
            )
            if shorter is None or len(shorter.material) < count * key_bytes:
                return None
            run = shorter
        offer = self._offers.popleft()  # each encapsulation key is used once
        try:
            shared, ciphertext = self._backend.kem_encapsulate(offer.public_key)
        except CryptoError as exc:
            raise LinkError(f"peer's ML-KEM offer is invalid: {exc}") from None
        deriver = BatchDeriver(self._context, KemExchange(offer.public_key, ciphertext, shared))
        batch = KeyBatch(
            batch_id=self._store.next_batch_id(self._peer),
            offer_id=offer.offer_id,
            purpose=purpose,
            kem_ciphertext=ciphertext,
            master_sae_id=pair[0],
            slave_sae_id=pair[1],
            size_bits=size_bits,
            count=count,
            qkd_first_key_id=run.first_key_id,
            qkd_key_count=run.count,
            qkd_ids_digest=run.digest(),
            qkd_key_ids=tuple(run.key_ids) if self._list_qkd_ids else (),
        )
        prefix = self._store_batch(batch, deriver, run, run.material)
        if purpose == BatchPurpose.AUTHENTICATION_KEYS:
            self._auth_key_wanted = False
        else:
            pads = purpose == BatchPurpose.PADS
            demand = self._remote_pad_demand if pads else self._remote_demand
            if pair in demand:
                demand[pair] -= count
        flying_key = (purpose, *pair)
        self._in_flight_keys[flying_key] = self._in_flight_keys.get(flying_key, 0) + count
        if not self._in_flight:
            self._reply_deadline = now + BATCH_REPLY_TIMEOUT
        self._in_flight.append(
            _InFlight(
                batch,
                run.id_blob,
                decided_before=self._last_decision_sent,
                first_key_id=key_id(prefix, 0),
            )
        )
        return batch

    # -- slave ----------------------------------------------------------------------------

    def _new_offer(self) -> KemOffer:
        self._offer_counter += 1
        key = self._backend.kem_generate()
        self._kem_keys[self._offer_counter] = key
        return KemOffer(self._offer_counter, key.public_bytes)

    def _on_batch(self, message: KeyBatch, now: float) -> list[LinkMessage]:
        if len(self._waiting) >= WINDOW:
            raise LinkError(f"more than {WINDOW} batches in flight")
        deadline = now + QKD_KEY_WAIT_SECONDS
        self._waiting.append(_Waiting(message, deadline))
        return []

    def _work_waiting(self, now: float) -> list[LinkMessage]:
        out: list[LinkMessage] = []
        while self._waiting:
            head = self._waiting[0]
            reply = self._try_batch(head, now)
            if reply is None:
                break  # its QKD keys have not all arrived: wait
            self._waiting.popleft()
            if self._waiting:
                self._waiting[0].deadline = max(
                    self._waiting[0].deadline, now + QKD_KEY_WAIT_SECONDS
                )
            out += reply
        if not self._waiting and self._horizons.pending:
            out += self._apply_peer_horizon()
        return out

    def _find_run(self, batch: KeyBatch) -> QkdRun | None:
        """The batch's QKD keys as held here, as far as held (None if not even the first
        is): read as a run, or by ID where the batch lists them."""
        if not batch.qkd_key_ids:
            return self._store.qkd_run(self._peer, batch.qkd_first_key_id, batch.qkd_key_count)
        texts = [id_text(raw) for raw in batch.qkd_key_ids]
        found = self._store.get_qkd_keys(self._peer, texts)
        ids, parts = [], []
        for raw, text in zip(batch.qkd_key_ids, texts, strict=True):
            if text not in found:
                break
            ids.append(raw)
            parts.append(found[text])
        return QkdRun.of(ids, b"".join(parts)) if ids else None

    def _try_batch(self, waiting: _Waiting, now: float) -> list[LinkMessage] | None:
        batch = waiting.batch
        kem_key = self._kem_keys.pop(batch.offer_id, None)
        if kem_key is None:
            raise LinkError(
                f"KEY_BATCH {batch.batch_id} names ML-KEM offer {batch.offer_id}, "
                "which is not outstanding"
            )
        reason = self._check_batch(batch)
        if reason:
            return self._reject(batch, None, reason)
        run = self._find_run(batch)
        held = run.count if run is not None else 0
        if run is None or held < batch.qkd_key_count:
            first = id_text(batch.qkd_first_key_id)
            if not held and self._store.is_qkd_key_consumed(self._peer, first):
                return self._reject(batch, run, f"QKD key {first} was already used")
            if now < waiting.deadline and not waiting.doomed:
                self._kem_keys[batch.offer_id] = kem_key
                return None  # our device has not delivered them yet: wait
            missing = batch.qkd_key_count - held
            if waiting.doomed:
                why = f"{missing} QKD keys never come here: our device is past them"
            else:
                why = f"{missing} QKD keys never arrived here"
            return self._reject(batch, run, f"{why} (device desync)")
        if run.digest() != batch.qkd_ids_digest:
            return self._reject(batch, run, "the QKD keys here differ from the batch's (digest)")
        if len(run.material) < batch.count * batch.size_bits // 8:
            return self._reject(batch, run, "the QKD run here is shorter than the batch needs")
        # The master skipped any older keys we hold: its device never delivered them.
        log_orphans(
            self._peer,
            self._store.quarantine_qkd_keys_before(self._peer, [id_text(run.first_key_id)]),
            "not-in-peer-stream",
        )
        shared = kem_key.decapsulate(batch.kem_ciphertext)
        deriver = BatchDeriver(
            self._context, KemExchange(kem_key.public_bytes, batch.kem_ciphertext, shared)
        )
        self._store_batch(batch, deriver, run, run.material)
        self._undecided[batch.batch_id] = batch
        pool = (batch.purpose, batch.master_sae_id, batch.slave_sae_id)
        self._coming[pool] = self._coming.get(pool, 0) + batch.count
        if self._reply_deadline is None:
            self._reply_deadline = now + BATCH_REPLY_TIMEOUT
        return [BatchAck(batch.batch_id, True), self._new_offer()]

    def _check_batch(self, batch: KeyBatch) -> str:
        if batch.purpose == BatchPurpose.AUTHENTICATION_KEYS:
            low, high = AUTH_KEY_BITS_RANGE
            if (
                batch.count != 1
                or batch.master_sae_id
                or batch.slave_sae_id
                or not low <= batch.size_bits <= high
            ):
                return f"an authentication batch is one key of {low}-{high} bits, no SAE pair"
        else:
            if not self.params.pair_allowed(batch.master_sae_id, batch.slave_sae_id):
                return (
                    f"SAE pair {batch.master_sae_id}->{batch.slave_sae_id} is not configured here"
                )
            if batch.purpose == BatchPurpose.PADS:
                if batch.size_bits != PAD_BITS_MAX:
                    return f"a one-time pad has {PAD_BITS_MAX} bits, not {batch.size_bits}"
            elif batch.size_bits != self.params.key_size_bits:
                return f"key size {batch.size_bits} differs from ours ({self.params.key_size_bits})"
        if self._store.batch_state(self._peer, batch.batch_id) is not None:
            return f"batch {batch.batch_id} was already used"
        return ""

    def _reject(self, batch: KeyBatch, held: QkdRun | None, reason: str) -> list[LinkMessage]:
        log.warning(
            "event=batch_rejected peer=%s batch=%d reason=%r", self._peer, batch.batch_id, reason
        )
        # Quarantine: the QKD keys a failed batch named are never used.
        named = batch.qkd_key_ids or (batch.qkd_first_key_id,)
        ours = held.key_ids if held is not None else ()
        self._store.quarantine_qkd_keys(
            self._peer, [id_text(raw) for raw in dict.fromkeys([*named, *ours])]
        )
        self._kem_keys.pop(batch.offer_id, None)
        self._undecided[batch.batch_id] = None  # the master answers a rejection with an abort
        if self._reply_deadline is None:
            self._reply_deadline = self._heard_at + BATCH_REPLY_TIMEOUT
        return [BatchAck(batch.batch_id, False, reason), self._new_offer()]

    def _on_decision(self, message: BatchDecision, now: float) -> list[LinkMessage]:
        self._resync_open.discard(message.batch_id)
        decided = self._undecided.pop(message.batch_id, None)
        if decided is not None:
            pool = (decided.purpose, decided.master_sae_id, decided.slave_sae_id)
            self._coming[pool] -= decided.count
        self._reply_deadline = now + BATCH_REPLY_TIMEOUT if self._undecided else None
        if self._store.batch_state(self._peer, message.batch_id) is None:
            return []  # a decision for a batch we rejected: nothing to do
        if message.commit:
            self._store.commit_batch(self._peer, message.batch_id)
        else:
            self._store.abort_batch(self._peer, message.batch_id)
        self._store.forget_committed_batches(self._peer)
        return []

    def _pad_demand(self) -> PadDemand:
        wanted = []
        for pair in self.params.local_master_pairs():
            have = self._store.pad_ready_count(*pair)
            have += self._coming.get((BatchPurpose.PADS, *pair), 0)
            wanted.append((*pair, max(0, self.params.pad_keys - have)))
        return PadDemand(tuple(wanted))

    def _demand(self) -> PoolDemand:
        wanted = []
        for pair in self.params.local_master_pairs():
            have = self._store.ready_count(*pair)
            have += self._coming.get((BatchPurpose.APPLICATION_KEYS, *pair), 0)
            wanted.append((*pair, max(0, self.params.pool_size - have)))
        return PoolDemand(tuple(wanted))
