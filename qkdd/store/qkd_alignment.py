"""Lining two QKD buffers up (``qkdd.store.qkd_buffer``'s rules (a)-(c), applied from the
peer's horizon and from the first key of a batch), and forgetting used IDs once both
buffers have moved past them."""

from __future__ import annotations

import sqlite3
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from qkdd.store.qkd_buffer import QkdBuffer, seq_ranges
from qkdd.store.qkd_ids import raw_id, raw_ids
from qkdd.store.qkd_lookup import ALL_SEQS

# Forgetting used IDs is tried once per this many newly used keys.
_FORGET_EVERY: Final = 1024


@dataclass(frozen=True)
class HorizonOutcome:
    """What a peer's horizon did here (``QkdAlignment.apply_peer_horizon``)."""

    dropped: int  # our buffered keys dropped as orphans
    skip: tuple[str, ...]  # the peer's listed keys to skip, marked used here already
    # Listed keys we lack without proof that they never come, or none of them held here:
    # look again when our buffer changes (a later key may arrive, or the buffer fill up).
    unresolved: bool
    # We hold one of the listed keys or the newest: our device got that far in the peer's
    # stream (keys of the peer's older than that which we lack never come).
    anchored: bool = False


class QkdAlignment(QkdBuffer):
    """The QKD buffer with the rules that line it up with the peer's; mixed into
    ``KeyStore``."""

    _forgotten_at: dict[str, int]

    def _drop_before(
        self, db: sqlite3.Connection, peer_site: str, seq: int, keep: Collection[bytes]
    ) -> int:
        """Mark used every held key received before ``seq`` except those in ``keep``."""
        if not keep:
            return self._mark_used(db, peer_site, [(0, seq - 1)])
        seqs: list[int] = []
        for frame in list(self._frames_from(peer_site, -1, material=False)):
            if frame.first_seq >= seq:
                break
            for begin, end in frame.unused_spans():
                seqs += [
                    frame.first_seq + i
                    for i in range(begin, end)
                    if frame.first_seq + i < seq and frame.key_id(i) not in keep
                ]
        return self._mark_used(db, peer_site, seq_ranges(seqs))

    def quarantine_qkd_keys_before(
        self, peer_site: str, key_ids: Iterable[str], keep: Collection[str] = ()
    ) -> int:
        """Quarantine every buffered QKD key received before the earliest of ``key_ids``
        (except those in ``keep``).

        Both devices deliver one stream in one order, so a key the peer no longer holds
        and that precedes a key it does hold can never be agreed on: it is dropped, and the
        two buffers line up again. Returns how many were dropped (0 if none of ``key_ids``
        is buffered here)."""
        with self.transaction() as db:
            seqs = self._held_seqs(peer_site, key_ids)
            dropped = 0
            if seqs:
                kept = set(raw_ids(keep))
                dropped = self._drop_before(db, peer_site, min(seqs.values()), kept)
        self._held_counts()
        return dropped

    # -- lining the buffers up ----------------------------------------------------------------

    def align_to_peer_horizon(
        self, peer_site: str, oldest_at_peer: Sequence[str], keep: Collection[str] = ()
    ) -> int:
        """Rule (a) alone, and the peer-reset case of rule (c): returns how many keys were
        dropped (see ``apply_peer_horizon``)."""
        return self.apply_peer_horizon(peer_site, oldest_at_peer, None, keep=keep).dropped

    def apply_peer_horizon(
        self,
        peer_site: str,
        listed: Sequence[str],
        newest: str | None,
        *,
        keep: Collection[str] = (),
        exclude: Collection[str] = (),
        buffer_full: bool = False,
    ) -> HorizonOutcome:
        """Line our buffer up with the peer's horizon: its oldest keys ``listed`` (oldest
        first) and its ``newest``. Rules (a)-(c) of the module docstring. ``keep``: our
        keys an open batch names (never dropped here); ``exclude``: keys of our batch in
        flight (never skipped, the peer is about to use them). One transaction."""
        listed = list(listed)
        raw_of = dict(zip(listed, raw_ids(listed), strict=True))
        newest_raw = raw_id(newest) if newest is not None else None
        with self.transaction() as db:
            located = self._locate(peer_site, list(raw_of.values()))
            # The peer's newest is looked for among our newest keys only: when its device is
            # ahead of ours the key has not arrived yet, and looking for it everywhere would
            # read every frame held, on every horizon. Rule (c) alone needs to know that it
            # is nowhere here, and looks further (rarely: the buffer is full or the peer new).
            newest_place = None
            if newest_raw is not None:
                newest_place = located.get(newest_raw) or self._locate(
                    peer_site, [newest_raw], scan=False
                ).get(newest_raw)
            held = {raw: place.seq for raw, place in located.items() if place.held}
            unlocated = [raw for raw in raw_of.values() if raw not in located]
            used = {raw for raw, place in located.items() if not place.held}
            used |= self._used_unheld(db, peer_site, unlocated)
            listed_held = [held[raw_of[k]] for k in listed if raw_of[k] in held]
            newest_held = newest_place is not None and newest_place.held
            kept = set(raw_ids(keep))
            # Rule (c) could apply: no listed key held, the oldest not used here either.
            peer_elsewhere = bool(listed) and not listed_held and raw_of[listed[0]] not in used
            if listed_held:
                dropped = self._drop_before(db, peer_site, min(listed_held), kept)  # rule (a)
            elif (
                peer_elsewhere
                and not newest_held
                and (buffer_full or self._flag(f"peer-reset:{peer_site}"))
            ):
                newest_held = self._holds_anywhere(peer_site, newest_raw)
                # Rule (c), unless the peer's newest is ours after all (older than memory).
                dropped = 0 if newest_held else self._drop_before(db, peer_site, ALL_SEQS, kept)
            else:
                dropped = 0
            # Rule (b): past the anchor, what we lack never comes.
            if newest_held:
                anchor = len(listed)
            else:
                anchor = max((i + 1 for i, k in enumerate(listed) if raw_of[k] in held), default=0)
            lacked = [k for k in listed[:anchor] if raw_of[k] not in held and raw_of[k] not in used]
            skip = [k for k in listed if k not in exclude and (raw_of[k] in used or k in lacked)]
            self._consume_qkd_keys(db, peer_site, [raw_of[k] for k in lacked if k not in exclude])
            # Look again when our buffer changes if rule (c) may apply once it fills, or a
            # listed key we lack may still arrive. Listed keys all used here change nothing.
            unresolved = peer_elsewhere and not newest_held
            unresolved |= any(
                raw_of[k] not in held and raw_of[k] not in used for k in listed[anchor:]
            )
            # The peer holds nothing older than its oldest listed key that we know of (held
            # or used here): used IDs before it are no longer asked about.
            listed_seen = [located[raw].seq for raw in raw_of.values() if raw in located]
            if listed_seen or not listed:  # else we cannot tell where the peer is
                self._forget_consumed(db, peer_site, min(listed_seen, default=None))
        self._held_counts()
        return HorizonOutcome(
            dropped, tuple(dict.fromkeys(skip)), unresolved, bool(listed_held) or newest_held
        )

    def _holds_anywhere(self, peer_site: str, raw: bytes | None) -> bool:
        """Whether the key is held here, wherever it sits in the buffer (reads every frame
        older than the memory if it is not)."""
        if raw is None:
            return False
        place = self._locate(peer_site, [raw]).get(raw)
        return place is not None and place.held

    def _forget_consumed(
        self, db: sqlite3.Connection, peer_site: str, peer_oldest_seq: int | None
    ) -> int:
        """Forget used IDs that both buffers have moved past and that are older than the
        newest ``consumed_memory`` keys received (``peer_oldest_seq``: our receive number
        of the peer's oldest key that we hold, None if its horizon names none we hold)."""
        used_now = self.qkd_keys_used(peer_site)
        every = max(1, min(_FORGET_EVERY, self.consumed_memory // 8))
        if used_now - self._forgotten_at.get(peer_site, -every) < every:
            return 0
        self._forgotten_at[peer_site] = used_now
        recent = self._recent_ids(peer_site)
        limit = recent.start_seq
        if limit is None:
            return 0
        oldest = db.execute(
            "SELECT min(first_seq) FROM qkd_frames WHERE peer_site=? AND held > 0", (peer_site,)
        ).fetchone()[0]
        if oldest is not None:
            limit = min(limit, int(oldest))
        if peer_oldest_seq is not None:
            limit = min(limit, peer_oldest_seq)
        frames = db.execute(
            "DELETE FROM qkd_frames WHERE peer_site=? AND held = 0 AND first_seq < ?"
            " AND first_seq + key_count <= ?",
            (peer_site, limit, limit),
        ).rowcount
        unheld = db.execute(
            "DELETE FROM qkd_consumed WHERE peer_site=? AND mark < ?", (peer_site, limit)
        ).rowcount
        return int(frames) + int(unheld)
