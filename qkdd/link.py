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
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from qkdd import labels
from qkdd.crypto import CryptoError, KemPrivateKey, PqcBackend
from qkdd.hybrid import HybridDeriver, KemExchange, KeyContext
from qkdd.keystore import KeyStore, NewHybridKey, StoredQkdKey
from qkdd.peer.messages import (
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
# Sizes an authentication key (a PSK for the next handshakes) may have; the link master's
# config chooses (``auth_key_bits``, 256 by default).
AUTH_KEY_BITS_RANGE: Final = (128, 4096)
# A one-time pad is the raw material of whole QKD keys: at most this many bits (and at most
# MAX_QKD_KEYS_PER_KEY keys) each.
PAD_BITS_MAX: Final = 8192
# The most pads a peer's PAD_DEMAND may ask for per pair.
MAX_PAD_DEMAND: Final = 65536


class LinkError(Exception):
    """The peer broke the key-agreement rules; the session must be dropped."""


@dataclass(frozen=True)
class LinkParameters:
    local_site_id: str
    peer_site_id: str
    local_sae_ids: frozenset[str]
    remote_sae_ids: frozenset[str]
    key_size_bits: int
    pool_size: int
    auth_key_bits: int = 256
    # One-time pads kept ready per local sender -> remote recipient pair (0: none).
    pad_keys: int = 0

    @property
    def is_master(self) -> bool:
        return self.local_site_id < self.peer_site_id

    @property
    def master_site_id(self) -> str:
        return self.local_site_id if self.is_master else self.peer_site_id

    @property
    def slave_site_id(self) -> str:
        return self.peer_site_id if self.is_master else self.local_site_id

    def pair_allowed(self, master_sae: str, slave_sae: str) -> bool:
        return (master_sae in self.local_sae_ids and slave_sae in self.remote_sae_ids) or (
            master_sae in self.remote_sae_ids and slave_sae in self.local_sae_ids
        )

    def local_master_pairs(self) -> list[tuple[str, str]]:
        """SAE pairs whose enc_keys caller is at this site (their pool is here)."""
        return sorted((m, s) for m in self.local_sae_ids for s in self.remote_sae_ids)


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
        self._last_demand: PoolDemand | None = None
        self._last_pad_demand: PadDemand | None = None
        self._last_horizon: str | None = None
        # Both: the peer's oldest QKD keys as it last told us, and our oldest key when we
        # last lined our buffer up with them (new keys from our device may need it again).
        self._peer_horizon: tuple[str, ...] = ()
        self._aligned_with: str | None = None
        # Both: when the reply to our last batch message is overdue.
        self._reply_deadline: float | None = None

    # -- entry points ---------------------------------------------------------------------

    def start(self) -> list[LinkMessage]:
        hello: list[LinkMessage] = [StoreId(self._store.store_id), *self._horizon()]
        if self.params.is_master:
            return hello
        pending = self._store.pending_batches(self.params.peer_site_id)
        return [*hello, Resync(tuple(pending)), self._new_offer()]

    def on_message(self, message: LinkMessage, now: float) -> list[LinkMessage]:
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
            self._peer_horizon = message.oldest_key_ids
            self._align()
            return []
        if self.params.is_master:
            if isinstance(message, Resync):
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
                return self._try_batch(now)
            if isinstance(message, BatchDecision):
                return self._on_decision(message)
        raise LinkError(
            f"unexpected {type(message).__name__} for the link "
            f"{'master' if self.params.is_master else 'slave'}"
        )

    def poll(self, now: float) -> list[LinkMessage]:
        """What to send now; raises LinkError if the peer stopped answering mid-batch."""
        if self._peer_horizon:
            oldest = self._store.oldest_qkd_key_ids(self.params.peer_site_id, 1)
            if oldest and oldest[0] != self._aligned_with:
                self._align()
        if self._reply_deadline is not None and now > self._reply_deadline:
            # A dropped frame is only noticed when a later one arrives; when nothing else
            # flows, this deadline ends the session, and RESYNC settles the batch.
            waiting_for = "BATCH_ACK" if self.params.is_master else "BATCH_DECISION"
            raise LinkError(f"no {waiting_for} within {BATCH_REPLY_TIMEOUT:g} s")
        if self.params.is_master:
            # The master's horizon goes out once per session (in start): its oldest keys
            # change with every batch it makes, which the slave learns from the batch.
            batch = self._make_batch()
            if batch is None:
                return []
            self._reply_deadline = now + BATCH_REPLY_TIMEOUT
            return [batch]
        out = self._try_batch(now) if self._waiting else []
        demand = self._demand()
        if demand != self._last_demand:
            self._last_demand = demand
            out.append(demand)
        if self.params.pad_keys:
            pad_demand = self._pad_demand()
            if pad_demand != self._last_pad_demand:
                self._last_pad_demand = pad_demand
                out.append(pad_demand)
        out += self._horizon()
        return out

    def awaited_qkd_keys(self) -> list[str]:
        """QKD key IDs an open batch names that our device has not delivered yet (a device
        that hands keys out by ID is asked for exactly these)."""
        if self._waiting is None:
            return []
        qkd_ids = [qid for e in self._waiting[0].entries for qid in e.qkd_key_ids]
        held = self._store.get_qkd_keys(self.params.peer_site_id, qkd_ids)
        return [qid for qid in qkd_ids if qid not in held]

    def _horizon(self) -> list[LinkMessage]:
        """Our oldest QKD keys, when they changed: lets the peer drop keys we never had."""
        oldest = self._store.oldest_qkd_key_ids(self.params.peer_site_id, MAX_HORIZON_KEYS)
        if not oldest or oldest[0] == self._last_horizon:
            return []
        self._last_horizon = oldest[0]
        return [QkdHorizon(tuple(oldest))]

    def _align(self) -> None:
        """Drop the buffered QKD keys the peer can never have, by its last horizon."""
        peer = self.params.peer_site_id
        self._log_orphans(
            self._store.align_to_peer_horizon(peer, self._peer_horizon), "peer-horizon"
        )
        oldest = self._store.oldest_qkd_key_ids(peer, 1)
        self._aligned_with = oldest[0] if oldest else None

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
        if message.accepted:
            self._store.commit_batch(peer, batch.batch_id)
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
            if now < deadline:
                return []  # our device has not delivered them yet: wait
            missing = len(qkd_ids) - len(materials)
            return self._reject(
                batch, qkd_ids, f"{missing} QKD keys never arrived here (device desync)"
            )
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
