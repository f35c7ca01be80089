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

This module is the session around the batches: the clock and its deadlines, the
messages both roles handle, and which role handles the rest. The master's batch making is
``qkdd.peer.batch_maker``, the slave's acceptance ``qkdd.peer.batch_taker``, what both do
with one batch ``qkdd.peer.batching``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Final

from qkdd.crypto import PqcBackend
from qkdd.hybrid import KeyContext
from qkdd.link_params import LinkError, LinkParameters, SessionDead
from qkdd.peer.agreement_messages import (
    MAX_KEYS_PER_BATCH,
    BatchAck,
    BatchDecision,
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
from qkdd.peer.agreement_store import AgreementStore
from qkdd.peer.batch_maker import BatchMaker
from qkdd.peer.batch_taker import BatchTaker
from qkdd.peer.batching import BATCH_KEYS as BATCH_KEYS
from qkdd.peer.batching import BATCH_REPLY_TIMEOUT as BATCH_REPLY_TIMEOUT
from qkdd.peer.batching import PAD_BITS_MAX as PAD_BITS_MAX
from qkdd.peer.batching import QKD_KEY_WAIT_SECONDS as QKD_KEY_WAIT_SECONDS
from qkdd.peer.batching import WINDOW as WINDOW
from qkdd.peer.horizon import HEARTBEAT_INTERVAL, HorizonExchange
from qkdd.peer.randomness import SYSTEM_RANDOMNESS, Randomness

log = logging.getLogger("qkdd.link")

# A peer heard from for this long is gone (three heartbeats lost): the session ends.
PEER_SILENCE_TIMEOUT: Final = 3 * HEARTBEAT_INTERVAL


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
        randomness: Randomness = SYSTEM_RANDOMNESS,
    ) -> None:
        """``list_qkd_ids``: the master lists each run's QKD key IDs in KEY_BATCH (the
        slave's device hands keys out by ID only). ``randomness``: where the ML-KEM offers
        and encapsulations come from (the system's unless a recorded transcript is
        replayed)."""
        self.params = params
        self._store = store
        self._peer = params.peer_site_id
        context = KeyContext(session_id, params.master_site_id, params.slave_site_id)
        # One side or the other, by our role on the link.
        self._maker: BatchMaker | None = None
        self._taker: BatchTaker | None = None
        if params.is_master:
            self._maker = BatchMaker(
                params,
                store=store,
                backend=backend,
                randomness=randomness,
                context=context,
                batch_keys=max(1, min(batch_keys, MAX_KEYS_PER_BATCH)),
                list_qkd_ids=list_qkd_ids,
            )
        else:
            self._taker = BatchTaker(
                params, store=store, backend=backend, randomness=randomness, context=context
            )
        # Both: the QKD_HORIZON conversation (the slave defers applying the master's
        # while batches wait).
        self._horizons = HorizonExchange(store, self._peer, params.qkd_buffer_keys)
        # Both: the clock, from the first poll or message; when we last heard the peer.
        self._started_at: float | None = None
        self._heard_at = 0.0
        self._handlers = self._dispatch_table()

    def _dispatch_table(self) -> dict[type, Callable[..., list[LinkMessage]]]:
        """(our role, message type) -> handler: a message not listed for our role ends the
        session."""
        both: dict[type, Callable[..., list[LinkMessage]]] = {
            StoreId: self._on_store_id,
            QkdHorizon: self._on_horizon,
            QkdSkip: self._on_skip,
        }
        if self._maker is not None:
            return {
                **both,
                Resync: self._maker.on_resync,
                KemOffer: self._maker.on_offer,
                PoolDemand: self._maker.on_demand,
                PadDemand: self._maker.on_pad_demand,
                BatchAck: self._maker.on_ack,
            }
        assert self._taker is not None
        return {**both, KeyBatch: self._taker.on_batch, BatchDecision: self._taker.on_decision}

    @property
    def _reply_deadline(self) -> float | None:
        """When the reply we wait for (BATCH_ACK, BATCH_DECISION) is overdue."""
        side = self._maker or self._taker
        assert side is not None
        return side.reply_deadline

    @property
    def _awaiting_resync(self) -> bool:
        return self._maker is not None and not self._maker.resynced

    @property
    def _batches_wait(self) -> bool:
        return self._taker is not None and self._taker.waiting

    # -- entry points ---------------------------------------------------------------------

    def start(self, now: float | None = None) -> list[LinkMessage]:
        """The session's first messages. The clock starts now (or at the first poll or
        message, if ``now`` is not given)."""
        if now is not None:
            self._clock(now)
        hello: list[LinkMessage] = [StoreId(self._store.store_id), self._horizons.ours(now)]
        if self._taker is None:
            return hello
        return [*hello, *self._taker.start()]

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
        if self._awaiting_resync and not isinstance(
            message, (Resync, StoreId, QkdHorizon, QkdSkip)
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
        if not self._batches_wait and self._horizons.worth_applying():
            out += self._apply_peer_horizon()
        out += self._progress(now)
        if self._horizons.due(now):
            out.append(self._horizons.ours(now))
        return out

    def _progress(self, now: float) -> list[LinkMessage]:
        """Whatever became possible: the master fills its window; the slave works through
        the batches that wait for QKD keys and tells the master what its pools want."""
        if self._maker is not None:
            return self._maker.fill_window(now)
        assert self._taker is not None
        out = self._taker.work_waiting(now, self._heard_at)
        if not self._taker.waiting and self._horizons.pending:
            out += self._apply_peer_horizon()
        return out + self._taker.demands()

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
        if self._awaiting_resync:
            times.append(self._started_at + BATCH_REPLY_TIMEOUT)
        wait = self._taker.wait_deadline() if self._taker is not None else None
        if wait is not None:
            times.append(wait)
        return min(times)

    def _check_deadlines(self, now: float) -> None:
        # A dropped or black-holed frame is only noticed when a later one arrives; when
        # nothing else flows, these deadlines end the session, and RESYNC settles it.
        reply_deadline = self._reply_deadline
        if reply_deadline is not None and now > reply_deadline:
            waiting_for = "BATCH_ACK" if self.params.is_master else "BATCH_DECISION"
            raise SessionDead(f"no {waiting_for} within {BATCH_REPLY_TIMEOUT:g} s")
        assert self._started_at is not None
        if self._awaiting_resync and now > self._started_at + BATCH_REPLY_TIMEOUT:
            raise SessionDead(f"no RESYNC within {BATCH_REPLY_TIMEOUT:g} s of the session start")
        if now > self._heard_at + PEER_SILENCE_TIMEOUT:
            raise SessionDead(f"nothing from the peer for {PEER_SILENCE_TIMEOUT:g} s")

    def awaited_qkd_keys(self) -> list[str]:
        """QKD key IDs the first waiting batch lists that our device has not delivered yet
        (a device that hands keys out by ID is asked for exactly these)."""
        return self._taker.awaited_qkd_keys() if self._taker is not None else []

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
        if self._taker is not None and self._taker.waiting:
            self._taker.horizon_received(message.newest_key_id)
            return []  # applied once no batch waits: a waiting run must not be dropped
        return self._apply_peer_horizon()

    def _apply_peer_horizon(self) -> list[LinkMessage]:
        listed = self._horizons.peer_horizon.oldest_key_ids
        flying = self._maker.in_flight_listed(listed) if self._maker is not None else []
        return list(self._horizons.apply(flying))

    def _on_skip(self, message: QkdSkip, now: float) -> list[LinkMessage]:
        self._horizons.skipped_by_peer(message)
        return []
