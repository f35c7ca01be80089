"""The link master's side of batch agreement (sans-IO): it settles what the last session
left open (RESYNC), takes the slave's ML-KEM offers and pool and pad demands (relay pads
only where both ends relay), makes batches from the oldest QKD keys up to WINDOW in flight
(KEY_BATCH) and decides each one when the slave's BATCH_ACK comes (BATCH_DECISION).
``qkdd.peer.agreement`` drives it.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from qkdd.crypto import CryptoError, PqcBackend
from qkdd.hybrid import BatchDeriver, KemExchange, KeyContext
from qkdd.key_ids import key_id
from qkdd.link_params import LinkError, LinkParameters
from qkdd.peer.agreement_messages import (
    MAX_QKD_KEYS_PER_BATCH,
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
from qkdd.peer.agreement_store import AgreementStore
from qkdd.peer.batching import (
    BATCH_REPLY_TIMEOUT,
    MAX_PAD_DEMAND,
    PAD_BITS_MAX,
    WINDOW,
    store_batch,
)
from qkdd.peer.randomness import Randomness
from qkdd.store.qkd_ids import id_index, raw_id

log = logging.getLogger("qkdd.link")


@dataclass
class _InFlight:
    """A master's batch the slave has not acknowledged yet."""

    batch: KeyBatch
    qkd_ids: bytes  # its run's 16-byte QKD key IDs, concatenated
    # The newest batch whose decision had been sent when this batch went out: the slave's
    # ACK of this batch proves it read that decision (and every earlier one).
    decided_before: int
    first_key_id: str  # for the log (an authentication key's ID)


class BatchMaker:
    """The master's batches of one session."""

    def __init__(
        self,
        params: LinkParameters,
        *,
        store: AgreementStore,
        backend: PqcBackend,
        randomness: Randomness,
        context: KeyContext,
        batch_keys: int,
        list_qkd_ids: bool,
    ) -> None:
        self.params = params
        self._store = store
        self._backend = backend
        self._random = randomness
        self._context = context
        self._batch_keys = batch_keys
        self._list_qkd_ids = list_qkd_ids
        self._peer = params.peer_site_id
        self._offers: deque[KemOffer] = deque()
        self._in_flight: deque[_InFlight] = deque()
        self._in_flight_keys: dict[tuple[int, str, str], int] = {}
        self._last_decision_sent = 0
        # While batches fly, the buffer size at which a whole batch may be made.
        self._whole_batch_at = 0
        self._remote_demand: dict[tuple[str, str], int] = {}
        self._remote_pad_demand: dict[tuple[str, str], int] = {}
        # The slave's PAD_DEMAND listed its relay pair: it relays too, so it takes the
        # relay pads we make for our own direction (until then none are made).
        self._peer_relays = False
        self._relay_mismatch_logged = False
        self.resynced = False
        # Every session the master makes a fresh authentication key first: it replaces,
        # once both sides hold it, the PSK (or bootstrap) that authenticated this session.
        self._auth_key_wanted = True
        # When the BATCH_ACK we wait for is overdue.
        self.reply_deadline: float | None = None

    def in_flight_listed(self, listed: Sequence[str]) -> list[str]:
        """The peer's listed keys that a batch of ours in flight uses (we consumed them
        already; the slave is about to)."""
        if not self._in_flight:
            return []
        return [
            k
            for k in listed
            if any(id_index(f.qkd_ids, raw_id(k)) is not None for f in self._in_flight)
        ]

    # -- messages from the slave ----------------------------------------------------------

    def on_resync(self, message: Resync, now: float) -> list[LinkMessage]:
        if self.resynced:
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
        self.resynced = True
        return decisions

    def on_offer(self, message: KemOffer, now: float) -> list[LinkMessage]:
        if len(self._offers) >= 2 * WINDOW:
            raise LinkError(f"more than {2 * WINDOW} ML-KEM offers outstanding")
        self._offers.append(message)
        return []

    def on_demand(self, message: PoolDemand, now: float) -> list[LinkMessage]:
        for master, slave, wanted in message.wanted:
            if master not in self.params.remote_sae_ids or slave not in self.params.local_sae_ids:
                raise LinkError(f"POOL_DEMAND for a pair we do not serve: {master}->{slave}")
            flying = self._in_flight_keys.get((BatchPurpose.APPLICATION_KEYS, master, slave), 0)
            self._remote_demand[(master, slave)] = min(wanted, self.params.pool_size) - flying
        return []

    def on_pad_demand(self, message: PadDemand, now: float) -> list[LinkMessage]:
        peer_relay = self.params.peer_relay_pair
        listed_relay = False
        for sender, recipient, wanted in message.wanted:
            if (sender, recipient) == peer_relay:
                listed_relay = True
                if not self.params.relay_pads:
                    continue  # we do not relay over this link: no relay pads either way
                self._peer_relays = True
            elif (
                sender not in self.params.remote_sae_ids
                or recipient not in self.params.local_sae_ids
            ):
                raise LinkError(f"PAD_DEMAND for a pair we do not serve: {sender}->{recipient}")
            flying = self._in_flight_keys.get((BatchPurpose.PADS, sender, recipient), 0)
            self._remote_pad_demand[(sender, recipient)] = min(wanted, MAX_PAD_DEMAND) - flying
        if listed_relay != bool(self.params.relay_pads) and not self._relay_mismatch_logged:
            # A config mismatch, not a fault: the link runs on without relay pads.
            self._relay_mismatch_logged = True
            log.info(
                "event=relay_pads_off peer=%s reason=%s",
                self._peer,
                "not-relaying-here" if listed_relay else "peer-not-relaying",
            )
        return []

    def on_ack(self, message: BatchAck, now: float) -> list[LinkMessage]:
        if not self._in_flight or self._in_flight[0].batch.batch_id != message.batch_id:
            raise LinkError(
                f"BATCH_ACK for batch {message.batch_id}, which is not in flight (or not next)"
            )
        flight = self._in_flight.popleft()
        batch = flight.batch
        self.reply_deadline = now + BATCH_REPLY_TIMEOUT if self._in_flight else None
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

    # -- making batches -------------------------------------------------------------------

    def _wants(self) -> tuple[int, tuple[str, str], int, int] | None:
        """What the next batch is for: (purpose, pair, key size, keys wanted), the largest
        deficit first; pads (relay pads included) only once every key pool is full."""
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
        for pair, target in self.params.pad_pools():
            if pair == self.params.relay_pair and not self._peer_relays:
                continue  # the slave would reject relay pads: it has not said it relays
            flying = self._in_flight_keys.get((pads, *pair), 0)
            have = self._store.pad_ready_count(*pair)
            wants.append((target - have - flying, pair))
        wants += [(wanted, pair) for pair, wanted in self._remote_pad_demand.items()]
        best = max(wants, default=(0, ("", "")))
        if best[0] > 0:
            return pads, best[1], PAD_BITS_MAX, best[0]
        return None

    def fill_window(self, now: float) -> list[LinkMessage]:
        """As many batches as the window, the offers and the QKD buffer allow."""
        out: list[LinkMessage] = []
        while self.resynced and self._offers and len(self._in_flight) < WINDOW:
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
            shared, ciphertext = self._random.kem_encapsulate(self._backend, offer.public_key)
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
        prefix = store_batch(self._store, self._peer, batch, deriver, run)
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
            self.reply_deadline = now + BATCH_REPLY_TIMEOUT
        self._in_flight.append(
            _InFlight(
                batch,
                run.id_blob,
                decided_before=self._last_decision_sent,
                first_key_id=key_id(prefix, 0),
            )
        )
        return batch
