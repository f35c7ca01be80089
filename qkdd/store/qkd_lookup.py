"""Finding QKD keys of the buffer by ID (``qkdd.store.qkd_buffer``): the newest received
from memory (``RecentIds``, at least ``consumed_memory`` keys a peer), older ones by reading
the IDs of the frames older than those: first frames with keys held, oldest first, then
frames kept only as a memory of used IDs, newest first. Also what is remembered as used
without ever being held (``qkd_consumed``)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from qkdd.constants import CONSUMED_MEMORY, FRAMES_READ_FIRST, FRAMES_READ_MOST
from qkdd.store.database import Database
from qkdd.store.qkd_frames import FRAME_COLUMNS, QkdFrame, RecentIds
from qkdd.store.qkd_ids import QKD_KEY_ID_SIZE, raw_id, raw_ids

# Key IDs per SQL statement when looking up many at once (SQLite's variable limit is higher).
_LOOKUP_CHUNK: Final = 500
ALL_SEQS: Final = 2**62  # above every receive number
# A frame's columns without its sealed material (``QkdFrame.sealed`` is then None).
FRAME_HEAD: Final = "first_seq, key_count, key_size, held, used, key_ids, NULL"


@dataclass(frozen=True)
class _Found:
    """Where a key ID sits in the buffer."""

    seq: int
    held: bool


def _ids_in(frame: QkdFrame, wanted: set[bytes]) -> list[tuple[bytes, int]]:
    """Those of ``wanted`` in the frame, with their index there."""
    if len(wanted) > 8:  # one pass over the frame's IDs
        ids, size = frame.key_ids, QKD_KEY_ID_SIZE
        return [
            (ids[i : i + size], i // size)
            for i in range(0, len(ids), size)
            if ids[i : i + size] in wanted
        ]
    return [(raw, i) for raw in wanted if (i := frame.index_of(raw)) is not None]


class QkdLookup(Database):
    """QKD keys by ID; the base of ``QkdBuffer``."""

    # Used IDs kept per peer at least (see the module docstring); tests and benches lower it.
    consumed_memory: int = CONSUMED_MEMORY
    _recent: dict[str, RecentIds]

    def _recall_recent(self, peer_site: str) -> RecentIds:
        """Read the IDs of the peer's newest frames into memory."""
        recent = RecentIds()
        frames: list[tuple[int, bytes]] = []
        keys = 0
        for first, ids in self._db.execute(
            "SELECT first_seq, key_ids FROM qkd_frames WHERE peer_site=? ORDER BY first_seq DESC",
            (peer_site,),
        ):
            frames.append((int(first), bytes(ids)))
            keys += len(ids) // QKD_KEY_ID_SIZE
            if keys >= self.consumed_memory:
                break
        for first, ids in reversed(frames):
            recent.add(first, ids, self.consumed_memory)
        self._recent[peer_site] = recent
        return recent

    def _recent_ids(self, peer_site: str) -> RecentIds:
        recent = self._recent.get(peer_site)
        return recent if recent is not None else self._recall_recent(peer_site)

    def _frame_holding(self, peer_site: str, seq: int, material: bool = False) -> QkdFrame | None:
        """The frame holding receive number ``seq``, if any."""
        row = self._db.execute(
            f"SELECT {FRAME_COLUMNS if material else FRAME_HEAD} FROM qkd_frames"
            " WHERE peer_site=? AND first_seq <= ? ORDER BY first_seq DESC LIMIT 1",
            (peer_site, seq),
        ).fetchone()
        if row is None:
            return None
        frame = QkdFrame.of(row)
        return frame if seq <= frame.last_seq else None

    # -- finding keys by ID -----------------------------------------------------------------

    def _locate(
        self, peer_site: str, raws: Sequence[bytes], *, scan: bool = True
    ) -> dict[bytes, _Found]:
        """Where those of the 16-byte IDs that the buffer holds or remembers as used sit:
        the newest received from memory, the rest (if ``scan``) by reading the frames' IDs
        from the oldest until all are found (see the module docstring)."""
        recent = self._recent_ids(peer_site)
        found: dict[bytes, _Found] = {}
        rest: set[bytes] = set()
        frames: dict[int, QkdFrame | None] = {}
        for raw in dict.fromkeys(raws):
            seq = recent.seq_of(raw)
            if seq is None:
                rest.add(raw)
                continue
            first = recent.frame_first(seq)
            if first is None:
                rest.add(raw)
                continue
            if first not in frames:
                frames[first] = self._frame_holding(peer_site, seq)
            frame = frames[first]
            if frame is None:  # set aside or forgotten: only remembered as used, if at all
                rest.add(raw)
                continue
            index = seq - frame.first_seq
            if frame.key_id(index) != raw:
                rest.add(raw)
                continue
            found[raw] = _Found(seq, frame.held > 0 and not frame.is_used(index))
        if rest and scan:
            found.update(self._scan_for(peer_site, rest))
        return found

    def _scan_for(self, peer_site: str, wanted: set[bytes]) -> dict[bytes, _Found]:
        """Read the IDs of the peer's frames older than those in memory until all
        ``wanted`` are found: first those with keys held, oldest first (where the peer's
        run and horizon start when the buffers are in step), then those kept only as a
        memory of used IDs, newest first (keys used a moment ago). An ID that has not
        arrived yet reads every frame older than the memory: a key that may not have
        arrived (the peer's newest, a batch's first key retried) is looked for with
        ``_locate(scan=False)``."""
        found: dict[bytes, _Found] = {}
        # Frames from the oldest in memory on are all there (``RecentIds``): what is not
        # found there can only be in older ones.
        below = self._recent_ids(peer_site).start_seq
        if below is None:
            return found
        for held, order in (("held > 0", "ASC"), ("held = 0", "DESC")):
            after = -1 if order == "ASC" else below
            limit = FRAMES_READ_FIRST
            while wanted:
                rows = self._db.execute(
                    f"SELECT {FRAME_HEAD} FROM qkd_frames WHERE peer_site=? AND {held}"
                    f" AND first_seq {'>' if order == 'ASC' else '<'} ? AND first_seq < ?"
                    f" ORDER BY first_seq {order} LIMIT ?",
                    (peer_site, after, below, limit),
                ).fetchall()
                for row in rows:
                    frame = QkdFrame.of(row)
                    after = frame.first_seq
                    for raw, index in _ids_in(frame, wanted):
                        found[raw] = _Found(
                            frame.first_seq + index, frame.held > 0 and not frame.is_used(index)
                        )
                        wanted.discard(raw)
                if len(rows) < limit:
                    break
                limit = min(2 * limit, FRAMES_READ_MOST)
        return found

    def _held_seqs(self, peer_site: str, key_ids: Iterable[str]) -> dict[str, int]:
        """Receive numbers of those of ``key_ids`` that are buffered here."""
        texts = list(dict.fromkeys(key_ids))
        raws = raw_ids(texts)
        located = self._locate(peer_site, raws)
        return {
            text: place.seq
            for text, raw in zip(texts, raws, strict=True)
            if (place := located.get(raw)) is not None and place.held
        }

    def _used_unheld(
        self, db: sqlite3.Connection, peer_site: str, raws: Sequence[bytes]
    ) -> set[bytes]:
        """Those of the 16-byte IDs remembered in ``qkd_consumed``."""
        found: set[bytes] = set()
        if not db.execute(
            "SELECT 1 FROM qkd_consumed WHERE peer_site=? LIMIT 1", (peer_site,)
        ).fetchone():
            return found  # the usual case: nothing used here without being held
        for start in range(0, len(raws), _LOOKUP_CHUNK):
            chunk = raws[start : start + _LOOKUP_CHUNK]
            marks = ",".join("?" * len(chunk))
            for (key_id,) in db.execute(
                f"SELECT key_id FROM qkd_consumed WHERE peer_site=? AND key_id IN ({marks})",
                (peer_site, *chunk),
            ):
                found.add(bytes(key_id))
        return found

    def _held_or_used(self, peer_site: str, key_id: str, scan: bool) -> bool | None:
        """True if the key is held here, False if used (or remembered as used without being
        held), None if unknown. ``scan=False`` looks among the newest received only."""
        raw = raw_id(key_id)
        place = self._locate(peer_site, [raw], scan=scan).get(raw)
        if place is not None:
            return place.held
        return False if self._used_unheld(self._db, peer_site, [raw]) else None

    def is_qkd_key_consumed(self, peer_site: str, key_id: str, *, scan: bool = True) -> bool:
        """Whether the key was used here (or remembered as used without being held)."""
        return self._held_or_used(peer_site, key_id, scan) is False

    def is_qkd_key_received(self, peer_site: str, key_id: str, *, scan: bool = True) -> bool:
        """Whether the key reached this buffer: held, or remembered as used."""
        return self._held_or_used(peer_site, key_id, scan) is not None

    def qkd_keys_used(self, peer_site: str) -> int:
        """QKD keys of the peer's link ever used here (agreed, skipped or quarantined)."""
        row = self._db.execute(
            "SELECT value FROM counters WHERE name=?", (f"used:{peer_site}",)
        ).fetchone()
        return int(row[0]) if row else 0
