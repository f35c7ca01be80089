"""Keeping the two QKD buffers of a link in step during a session (sans-IO): when to send
our QKD_HORIZON (it is also the heartbeat), applying the peer's, and answering with
QKD_SKIP. The rules that decide what is dropped or skipped live with the buffer
(``qkdd.store.qkd_buffer``); this is the conversation around them.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable, Sequence
from typing import Final, Protocol

from qkdd.peer.agreement_messages import HORIZON_KEYS_FIRST, MAX_HORIZON_KEYS, QkdHorizon, QkdSkip
from qkdd.store.qkd_alignment import HorizonOutcome

log = logging.getLogger("qkdd.link")

# Each side sends its horizon at least this often: it is also the session's heartbeat.
HEARTBEAT_INTERVAL: Final = 5.0
# A horizon goes out again this soon when only our newest key changed: the peer may be
# waiting for a later key of ours to prove that keys it lacks never come.
HORIZON_REFRESH: Final = 1.0


class HorizonStore(Protocol):
    """What the horizon exchange uses of the key store."""

    def apply_peer_horizon(
        self,
        peer_site: str,
        listed: Sequence[str],
        newest: str | None,
        *,
        keep: Collection[str] = (),
        exclude: Collection[str] = (),
        buffer_full: bool = False,
    ) -> HorizonOutcome: ...
    def quarantine_qkd_keys(
        self, peer_site: str, key_ids: Iterable[str], keep: Collection[str] = ()
    ) -> None: ...
    def qkd_key_count(self, peer_site: str) -> int: ...
    def oldest_qkd_key_ids(self, peer_site: str, limit: int) -> list[str]: ...
    def newest_qkd_key_id(self, peer_site: str) -> str | None: ...


def log_orphans(peer: str, dropped: int, why: str) -> None:
    if dropped:
        log.warning("event=qkd_keys_quarantined peer=%s count=%d reason=%s", peer, dropped, why)


class HorizonExchange:
    """One side's half of the horizon conversation for one session."""

    def __init__(self, store: HorizonStore, peer_site: str, buffer_keys: int) -> None:
        self._store = store
        self._peer = peer_site
        self._buffer_keys = buffer_keys
        # The peer's last horizon; whether it is still to be applied (deferred by the
        # caller) or left something to decide once our buffer changes; our newest key when
        # we last applied it.
        self.peer_horizon = QkdHorizon(())
        self.pending = False
        self._recheck = False
        self._checked_newest: str | None = None
        # The peer's listed keys we skipped already (bounded, oldest forgotten first).
        self._skipped: dict[str, None] = {}
        # Our last horizon (its listed keys, newest, when sent), the next size, and
        # whether our newest key changed since.
        self.sent = QkdHorizon(())
        self.sent_at: float | None = None
        self._horizon_keys = HORIZON_KEYS_FIRST
        self._refresh_due = False

    def started(self, now: float) -> None:
        if self.sent_at is None:
            self.sent_at = now

    def next_deadline(self) -> float | None:
        """When our next horizon is due at the latest (a heartbeat, or a refresh after our
        newest key changed)."""
        if self.sent_at is None:
            return None
        return self.sent_at + (HORIZON_REFRESH if self._refresh_due else HEARTBEAT_INTERVAL)

    def due(self, now: float) -> bool:
        if self.sent_at is None or now >= self.sent_at + HEARTBEAT_INTERVAL:
            return True
        oldest = self._store.oldest_qkd_key_ids(self._peer, 1)
        if oldest != list(self.sent.oldest_key_ids[:1]):
            return True
        # Our newest key changed since the last horizon: a refresh falls due.
        self._refresh_due = self._store.newest_qkd_key_id(self._peer) != self.sent.newest_key_id
        return self._refresh_due and now >= self.sent_at + HORIZON_REFRESH

    def ours(self, now: float | None) -> QkdHorizon:
        """Our oldest QKD keys and our newest: lets the peer drop keys we never had, and
        tell us which of ours it never will."""
        oldest = self._store.oldest_qkd_key_ids(self._peer, self._horizon_keys)
        newest = self._store.newest_qkd_key_id(self._peer) if oldest else None
        self.sent = QkdHorizon(tuple(oldest), newest)
        self._refresh_due = False
        self.sent_at = now
        return self.sent

    def received(self, horizon: QkdHorizon) -> None:
        self.peer_horizon = horizon
        self.pending = True

    def worth_applying(self) -> bool:
        """A horizon waits to be applied, or the last one left something open and our
        buffer changed since."""
        if self.pending:
            return True
        return self._recheck and self._store.newest_qkd_key_id(self._peer) != self._checked_newest

    def apply(self, exclude: Collection[str] = ()) -> list[QkdSkip]:
        """Line our buffer up with the peer's last horizon; QKD_SKIP what it holds that can
        never be agreed. ``exclude``: listed keys a batch of ours in flight uses."""
        self.pending = False
        horizon = self.peer_horizon
        full = self._store.qkd_key_count(self._peer) >= self._buffer_keys
        outcome = self._store.apply_peer_horizon(
            self._peer,
            horizon.oldest_key_ids,
            horizon.newest_key_id,
            exclude=exclude,
            buffer_full=full,
        )
        log_orphans(self._peer, outcome.dropped, "peer-horizon")
        self._recheck = outcome.unresolved
        self._checked_newest = self._store.newest_qkd_key_id(self._peer)
        skip = [k for k in outcome.skip if k not in self._skipped]
        for key_id in skip:
            self._skipped[key_id] = None
        while len(self._skipped) > 4 * MAX_HORIZON_KEYS:
            del self._skipped[next(iter(self._skipped))]
        if not skip:
            return []
        log.info("event=qkd_keys_skipped peer=%s count=%d reason=never-here", self._peer, len(skip))
        return [
            QkdSkip(tuple(skip[i : i + MAX_HORIZON_KEYS]))
            for i in range(0, len(skip), MAX_HORIZON_KEYS)
        ]

    def skipped_by_peer(self, message: QkdSkip) -> None:
        """The peer will never agree these keys of ours: use them up here too."""
        before = self._store.qkd_key_count(self._peer)
        self._store.quarantine_qkd_keys(self._peer, message.key_ids)
        log_orphans(self._peer, before - self._store.qkd_key_count(self._peer), "peer-skipped")
        listed = set(self.sent.oldest_key_ids)
        if listed and listed <= set(message.key_ids):
            # Everything we listed was skipped: the run the peer never got goes on; list
            # more of it next time.
            self._horizon_keys = min(2 * self._horizon_keys, MAX_HORIZON_KEYS)
        else:
            self._horizon_keys = HORIZON_KEYS_FIRST
