"""The link slave's side of batch agreement (sans-IO): it lists the batches the last
session left undecided (RESYNC), offers one-time ML-KEM encapsulation keys (KEM_OFFER),
takes the master's batches in the order they came, waiting for its own device's QKD keys
where needed, checks and stores each one or rejects it (BATCH_ACK), commits or aborts it
on the master's word (BATCH_DECISION), and tells the master what its pools want
(POOL_DEMAND, PAD_DEMAND, relay pads included). ``qkdd.peer.agreement`` drives it.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

from qkdd.crypto import KemPrivateKey, PqcBackend
from qkdd.hybrid import BatchDeriver, KemExchange, KeyContext
from qkdd.link_params import LinkError, LinkParameters
from qkdd.peer.agreement_messages import (
    BatchAck,
    BatchDecision,
    BatchPurpose,
    KemOffer,
    KeyBatch,
    LinkMessage,
    PadDemand,
    PoolDemand,
    Resync,
)
from qkdd.peer.agreement_store import AgreementStore, id_text
from qkdd.peer.batching import (
    AUTH_KEY_BITS_RANGE,
    BATCH_REPLY_TIMEOUT,
    PAD_BITS_MAX,
    QKD_KEY_WAIT_SECONDS,
    WINDOW,
    store_batch,
)
from qkdd.peer.horizon import log_orphans
from qkdd.peer.randomness import Randomness
from qkdd.store.qkd_ids import QkdRun

log = logging.getLogger("qkdd.link")


@dataclass
class _WaitingBatch:
    """A slave's batch whose QKD keys have not all arrived here yet."""

    batch: KeyBatch
    deadline: float
    # A horizon after the batch showed our device got past keys of the run we lack.
    doomed: bool = False
    # Its first key was looked for in the whole buffer: later tries look among the keys
    # arrived since (the newest), until the deadline looks everywhere once more.
    looked_everywhere: bool = False


class BatchTaker:
    """The slave's batches of one session."""

    def __init__(
        self,
        params: LinkParameters,
        *,
        store: AgreementStore,
        backend: PqcBackend,
        randomness: Randomness,
        context: KeyContext,
    ) -> None:
        self.params = params
        self._store = store
        self._backend = backend
        self._random = randomness
        self._context = context
        self._peer = params.peer_site_id
        self._offer_counter = 0
        self._kem_keys: dict[int, KemPrivateKey] = {}
        self._waiting: deque[_WaitingBatch] = deque()
        # Batches we acknowledged whose decision has not come yet, and the keys the
        # accepted ones will add to each pool (counted in our demand already, so a demand
        # sent before the decision arrives does not ask for them twice).
        self._undecided: dict[int, KeyBatch | None] = {}
        self._coming: dict[tuple[int, str, str], int] = {}
        self._resync_open: set[int] = set()
        self._last_demand: PoolDemand | None = None
        self._last_pad_demand: PadDemand | None = None
        # When the BATCH_DECISION we wait for is overdue.
        self.reply_deadline: float | None = None

    def start(self) -> list[LinkMessage]:
        """RESYNC (our batches still pending) and the first window of offers."""
        pending = self._store.pending_batches(self._peer)
        # Their keys may yet become ready: no demand until the master decided them all.
        self._resync_open = set(pending)
        return [Resync(tuple(pending)), *(self._new_offer() for _ in range(WINDOW))]

    @property
    def waiting(self) -> bool:
        """Whether a batch waits for QKD keys here."""
        return bool(self._waiting)

    def wait_deadline(self) -> float | None:
        """When the first waiting batch stops waiting for its QKD keys."""
        return self._waiting[0].deadline if self._waiting else None

    def horizon_received(self, newest_key_id: str | None) -> None:
        """The master's horizon, sent after the waiting batches: if we hold its newest key,
        our device got past every key of theirs; keys of a run we lack never come."""
        # Among our newest keys only: the master's newest has usually not arrived here
        # (that is why a batch waits), and looking everywhere would read every frame.
        if newest_key_id is not None and self._store.is_qkd_key_received(
            self._peer, newest_key_id, scan=False
        ):
            for waiting in self._waiting:
                waiting.doomed = True

    def awaited_qkd_keys(self) -> list[str]:
        """QKD key IDs the first waiting batch lists that our device has not delivered yet
        (a device that hands keys out by ID is asked for exactly these)."""
        if not self._waiting or not self._waiting[0].batch.qkd_key_ids:
            return []
        wanted = [id_text(raw) for raw in self._waiting[0].batch.qkd_key_ids]
        held = self._store.get_qkd_keys(self._peer, wanted)
        return [qid for qid in wanted if qid not in held]

    # -- messages from the master ---------------------------------------------------------

    def on_batch(self, message: KeyBatch, now: float) -> list[LinkMessage]:
        if len(self._waiting) >= WINDOW:
            raise LinkError(f"more than {WINDOW} batches in flight")
        deadline = now + QKD_KEY_WAIT_SECONDS
        self._waiting.append(_WaitingBatch(message, deadline))
        return []

    def on_decision(self, message: BatchDecision, now: float) -> list[LinkMessage]:
        self._resync_open.discard(message.batch_id)
        decided = self._undecided.pop(message.batch_id, None)
        if decided is not None:
            pool = (decided.purpose, decided.master_sae_id, decided.slave_sae_id)
            self._coming[pool] -= decided.count
        self.reply_deadline = now + BATCH_REPLY_TIMEOUT if self._undecided else None
        if self._store.batch_state(self._peer, message.batch_id) is None:
            return []  # a decision for a batch we rejected: nothing to do
        if message.commit:
            self._store.commit_batch(self._peer, message.batch_id)
        else:
            self._store.abort_batch(self._peer, message.batch_id)
        self._store.forget_committed_batches(self._peer)
        return []

    # -- the batches, in the order they came ----------------------------------------------

    def _new_offer(self) -> KemOffer:
        self._offer_counter += 1
        key = self._random.kem_key(self._backend)
        self._kem_keys[self._offer_counter] = key
        return KemOffer(self._offer_counter, key.public_bytes)

    def work_waiting(self, now: float, heard_at: float) -> list[LinkMessage]:
        """Store or reject each waiting batch whose QKD keys are here or will never come;
        stop at the first that must wait longer. ``heard_at``: when the master last spoke."""
        out: list[LinkMessage] = []
        while self._waiting:
            head = self._waiting[0]
            reply = self._try_batch(head, now, heard_at)
            if reply is None:
                break  # its QKD keys have not all arrived: wait
            self._waiting.popleft()
            if self._waiting:
                self._waiting[0].deadline = max(
                    self._waiting[0].deadline, now + QKD_KEY_WAIT_SECONDS
                )
            out += reply
        return out

    def _find_run(self, batch: KeyBatch, scan: bool) -> QkdRun | None:
        """The batch's QKD keys as held here, as far as held (None if not even the first
        is): read as a run, or by ID where the batch lists them. ``scan``: look in the
        whole buffer, not only among the newest keys."""
        if not batch.qkd_key_ids:
            return self._store.qkd_run(
                self._peer, batch.qkd_first_key_id, batch.qkd_key_count, scan=scan
            )
        texts = [id_text(raw) for raw in batch.qkd_key_ids]
        found = self._store.get_qkd_keys(self._peer, texts, scan=scan)
        ids, parts = [], []
        for raw, text in zip(batch.qkd_key_ids, texts, strict=True):
            if text not in found:
                break
            ids.append(raw)
            parts.append(found[text])
        return QkdRun.of(ids, b"".join(parts)) if ids else None

    def _try_batch(
        self, waiting: _WaitingBatch, now: float, heard_at: float
    ) -> list[LinkMessage] | None:
        batch = waiting.batch
        kem_key = self._kem_keys.pop(batch.offer_id, None)
        if kem_key is None:
            raise LinkError(
                f"KEY_BATCH {batch.batch_id} names ML-KEM offer {batch.offer_id}, "
                "which is not outstanding"
            )
        reason = self._check_batch(batch)
        if reason:
            return self._reject(batch, None, reason, heard_at)
        last_try = now >= waiting.deadline or waiting.doomed
        scan = last_try or not waiting.looked_everywhere
        run = self._find_run(batch, scan)
        held = run.count if run is not None else 0
        if run is None or held < batch.qkd_key_count:
            first = id_text(batch.qkd_first_key_id)
            if not held and self._store.is_qkd_key_consumed(self._peer, first, scan=scan):
                return self._reject(batch, run, f"QKD key {first} was already used", heard_at)
            if not last_try:
                waiting.looked_everywhere = True
                self._kem_keys[batch.offer_id] = kem_key
                return None  # our device has not delivered them yet: wait
            missing = batch.qkd_key_count - held
            if waiting.doomed:
                why = f"{missing} QKD keys never come here: our device is past them"
            else:
                why = f"{missing} QKD keys never arrived here"
            return self._reject(batch, run, f"{why} (device desync)", heard_at)
        if run.digest() != batch.qkd_ids_digest:
            return self._reject(
                batch, run, "the QKD keys here differ from the batch's (digest)", heard_at
            )
        if len(run.material) < batch.count * batch.size_bits // 8:
            return self._reject(
                batch, run, "the QKD run here is shorter than the batch needs", heard_at
            )
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
        store_batch(self._store, self._peer, batch, deriver, run)
        self._undecided[batch.batch_id] = batch
        pool = (batch.purpose, batch.master_sae_id, batch.slave_sae_id)
        self._coming[pool] = self._coming.get(pool, 0) + batch.count
        if self.reply_deadline is None:
            self.reply_deadline = now + BATCH_REPLY_TIMEOUT
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
            pads = batch.purpose == BatchPurpose.PADS
            if not self.params.pair_allowed(batch.master_sae_id, batch.slave_sae_id, pads=pads):
                return (
                    f"SAE pair {batch.master_sae_id}->{batch.slave_sae_id} is not configured here"
                )
            if pads:
                if batch.size_bits != PAD_BITS_MAX:
                    return f"a one-time pad has {PAD_BITS_MAX} bits, not {batch.size_bits}"
            elif batch.size_bits != self.params.key_size_bits:
                return f"key size {batch.size_bits} differs from ours ({self.params.key_size_bits})"
        if self._store.batch_state(self._peer, batch.batch_id) is not None:
            return f"batch {batch.batch_id} was already used"
        return ""

    def _reject(
        self, batch: KeyBatch, held: QkdRun | None, reason: str, heard_at: float
    ) -> list[LinkMessage]:
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
        if self.reply_deadline is None:
            self.reply_deadline = heard_at + BATCH_REPLY_TIMEOUT
        return [BatchAck(batch.batch_id, False, reason), self._new_offer()]

    # -- what our pools want --------------------------------------------------------------

    def demands(self) -> list[LinkMessage]:
        """POOL_DEMAND and PAD_DEMAND where they changed; none while batches of the last
        session are undecided (their keys may yet become ready)."""
        out: list[LinkMessage] = []
        if self._resync_open:
            return out
        demand = self._demand()
        if demand != self._last_demand:
            self._last_demand = demand
            out.append(demand)
        if self.params.pad_keys or self.params.relay_pads:
            pad_demand = self._pad_demand()
            if pad_demand != self._last_pad_demand:
                self._last_pad_demand = pad_demand
                out.append(pad_demand)
        return out

    def _pad_demand(self) -> PadDemand:
        """Our pad pools' wants; listing the relay pair (even at 0) tells the master we
        relay too, so it fills its own relay direction."""
        wanted = []
        for pair, target in self.params.pad_pools():
            have = self._store.pad_ready_count(*pair)
            have += self._coming.get((BatchPurpose.PADS, *pair), 0)
            wanted.append((*pair, max(0, target - have)))
        return PadDemand(tuple(wanted))

    def _demand(self) -> PoolDemand:
        wanted = []
        for pair in self.params.local_master_pairs():
            have = self._store.ready_count(*pair)
            have += self._coming.get((BatchPurpose.APPLICATION_KEYS, *pair), 0)
            wanted.append((*pair, max(0, self.params.pool_size - have)))
        return PoolDemand(tuple(wanted))
