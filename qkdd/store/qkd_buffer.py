"""The QKD half of the key store: keys a device delivered that wait to be agreed with the
peer, held as frames (``qkdd.store.qkd_frames``), and the memory of QKD key IDs already
used. ``KeyStore`` inherits these methods; they share its database and transactions.

Theory of operation. Both devices of a link deliver one stream in one order, so the two
buffers should hold the same keys. They fall out of step when one side's buffer holds keys
the other will never get: the device restarted while one daemon was down, a daemon lost its
store, a device discarded keys, a batch was cut off mid-session. Every buffered key gets a
*receive number* (``seq``, increasing for the life of the store, across peers), and each
side tells the other its oldest keys and its newest one (QKD_HORIZON). From the peer's
horizon a side learns, in one store transaction (``apply_peer_horizon``):

- (a) its own keys older than the first listed key it holds are orphans (the peer's
  device delivered them before that key, and the peer no longer holds them);
- (b) listed keys it lacks although it holds a later one (a later listed key, or the
  peer's newest) never reach it: its device is past them. Those, and listed keys it has
  already used, are *skipped*: marked used here and sent back (QKD_SKIP) for the peer to
  mark used too;
- (c) if it holds none of the listed keys, has used not even the first, lacks the peer's
  newest key, and its buffer is full (so its device is held back and can never catch up)
  or the peer lost its store, everything it holds came before the peer's stream or from a
  run of the device the peer never saw: all of it is dropped.

A key is only ever *added* to the used set, so a mistake (e.g. a key that arrives late
after a lost frame) can cost a key, never use one twice.

Used keys. A used key's bit is set in its frame and its material erased there; a frame
whose keys are all used keeps only their IDs. IDs used without ever being held here (the
peer's word, a refused batch's) go to ``qkd_consumed``. Both are forgotten once both
buffers have moved past them (our oldest held key, and the peer's oldest as its horizon
says, were received after them) and they are older than the newest ``consumed_memory``
keys received (``RecentIds``): a device only ever re-sends keys it has not seen
acknowledged, at most its window of keys in flight (the serial protocol allows up to
65,535), so a re-sent key is always among the remembered ones and is ignored.

Runs. A batch names QKD keys as a *run*: keys consecutive among those held, in receive
order, by the first key's ID, their number and SHA-256 over their 16-byte IDs (``QkdRun``).
The master takes the oldest keys it holds (``oldest_qkd_run``); the slave finds the key
with that ID and the keys received after it (``qkd_run``); either consumes the run as a
range of receive numbers. A frame that does not open is quarantined whole
(``KeyStore._open_row``): the peer still holds its keys, so no run may span the gap it
leaves. The master therefore never builds a run across one: keys it read before the gap
are used up with it, and the run starts after it; the peer drops its copies of them as
orphans when the batch names the next key. The slave's run simply leaves the frame's keys
out, so its digest differs from the master's and the batch is refused at once.

Cost. Storing a delivery is one row per frame; a run, the oldest and the newest held key
are ranges of the index of frames with keys held; consuming a run updates the frames it
covers (sealing again only the one or two it covers in part). How many keys each peer
holds is counted once when the store opens and then kept in memory (``qkd_key_count``); a
transaction's changes join the count when it commits, never when it rolls back. A key is
found by ID among the newest received (at least ``consumed_memory``), kept in memory; an
older one by reading the IDs of the frames older than those, from our oldest held key on:
the first frame when the buffers are in step. A key that never arrived here costs a read
of those older frames only (none while the buffer holds fewer keys than the memory); the
whole buffer's IDs (16 bytes a key) only when it holds more and the peer names keys this
side never got, a fault its horizon then settles.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Collection, Iterable, Iterator, Sequence
from typing import Final

from qkdd.constants import FRAMES_READ_FIRST, FRAMES_READ_MOST
from qkdd.sealing import RowDoesNotOpen, StoreError, qkd_row_aad
from qkdd.sealing import qkd_frame_aad as frame_aad
from qkdd.store.qkd_frames import (
    FRAME_COLUMNS,
    MAX_FRAME_KEYS,
    QKD_FRAMES_SCHEMA,
    QkdFrame,
    bitmap_bytes,
    bitmap_int,
    empty_bitmap,
    frame_groups,
)
from qkdd.store.qkd_ids import (
    QKD_KEY_ID_SIZE,
    QkdKeyFields,
    QkdRun,
    StoredQkdKey,
    id_text,
    raw_id,
    raw_ids,
    texts_of,
)
from qkdd.store.qkd_lookup import FRAME_HEAD, QkdLookup

QKD_BUFFER_SCHEMA: Final = QKD_FRAMES_SCHEMA

# Changes of the buffered-key counts made inside a transaction. A temporary table is part
# of the connection's transactions, so a rollback takes its rows back with the rest: the
# count in memory only ever takes changes that were committed.
_HELD_CHANGES_SCHEMA: Final = """
CREATE TEMP TABLE IF NOT EXISTS qkd_held_changes (
    peer_site TEXT NOT NULL,
    delta     INTEGER NOT NULL
)
"""


def seq_ranges(seqs: Iterable[int]) -> list[tuple[int, int]]:
    """Sorted receive numbers as inclusive ranges of consecutive ones."""
    out: list[tuple[int, int]] = []
    for seq in sorted(set(seqs)):
        if out and out[-1][1] + 1 == seq:
            out[-1] = (out[-1][0], seq)
        else:
            out.append((seq, seq))
    return out


class QkdBuffer(QkdLookup):
    """QKD keys and used QKD key IDs; mixed into ``KeyStore``."""

    # Buffered keys per peer as last committed (set up at open, ``_upgrade_qkd_buffer``),
    # and whether ``qkd_held_changes`` holds changes not yet taken into it.
    _held: dict[str, int]
    _held_changed: bool
    _forgotten_at: dict[str, int]

    def _upgrade_qkd_buffer(self) -> None:
        """At open: move used IDs and buffered keys of older stores into this layout, count
        the buffered keys of each peer and recall the newest IDs received (once)."""
        tables = {
            str(r[0]) for r in self._db.execute("SELECT name FROM sqlite_master WHERE type='table'")
        }
        if "consumed_qkd_keys" in tables:
            with self.transaction() as db:
                mark = self._last_seq(db)
                rows = db.execute("SELECT peer_site, key_id FROM consumed_qkd_keys").fetchall()
                db.executemany(
                    "INSERT OR IGNORE INTO qkd_consumed VALUES (?, ?, ?)",
                    [(peer, raw_id(key_id), mark) for peer, key_id in rows],
                )
                db.execute(
                    "INSERT OR IGNORE INTO counters SELECT 'used:' || peer_site, count(*)"
                    " FROM consumed_qkd_keys GROUP BY peer_site"
                )
                db.execute("DROP TABLE consumed_qkd_keys")
        if "qkd_keys" in tables:
            with self.transaction() as db:
                self._upgrade_qkd_rows(db)
        self._db.execute(_HELD_CHANGES_SCHEMA)
        self._held = {
            str(peer): int(n)
            for peer, n in self._db.execute(
                "SELECT peer_site, sum(held) FROM qkd_frames GROUP BY peer_site"
            )
        }
        self._held_changed = False
        self._recent = {}
        self._forgotten_at = {}
        for (peer,) in self._db.execute("SELECT DISTINCT peer_site FROM qkd_frames").fetchall():
            self._recall_recent(str(peer))

    def _upgrade_qkd_rows(self, db: sqlite3.Connection) -> None:
        """Move a store's one-row-per-key buffer (``qkd_keys``, schema 3 and older) into
        frames of keys consecutive in receive order, keeping their receive numbers."""
        db.execute(
            "INSERT OR IGNORE INTO counters SELECT 'qkd-seq', coalesce(max(seq), 0) FROM qkd_keys"
        )
        rows = db.execute(
            "SELECT seq, peer_site, key_id, material, received_at FROM qkd_keys ORDER BY seq"
        ).fetchall()
        group: list[tuple[int, bytes, bytes, float]] = []
        group_peer = ""

        def flush() -> None:
            if group:
                first = group[0][0]
                self._insert_frame(
                    db, group_peer, first, [(g[1], g[2]) for g in group], group[0][3]
                )
                group.clear()

        for seq, peer, key_id, sealed, received_at in rows:
            peer = str(peer)
            try:
                material = self._sealer.open(qkd_row_aad(peer, str(key_id)), bytes(sealed))
                raw = raw_id(str(key_id))
            except (RowDoesNotOpen, StoreError):  # does not open, or no UUID: set aside
                flush()
                db.execute(
                    "INSERT INTO quarantined_rows (table_name, row_key, sealed, quarantined_at)"
                    " VALUES ('qkd_keys', ?, ?, ?)",
                    (f"{peer}/{key_id}", bytes(sealed), time.time()),
                )
                with contextlib.suppress(StoreError):
                    db.execute(
                        "INSERT OR IGNORE INTO qkd_consumed VALUES (?, ?, ?)",
                        (peer, raw_id(str(key_id)), int(seq)),
                    )
                continue
            if group and (
                peer != group_peer
                or int(seq) != group[-1][0] + 1
                or len(material) != len(group[0][2])
                or len(group) >= MAX_FRAME_KEYS
            ):
                flush()
            group_peer = peer
            group.append((int(seq), raw, material, float(received_at)))
        flush()
        db.execute("DROP TABLE qkd_keys")

    # -- receive numbers --------------------------------------------------------------------

    @staticmethod
    def _last_seq(db: sqlite3.Connection) -> int:
        """The newest receive number handed out (buffered keys are numbered in order of
        arrival, for the life of the store, across all peers)."""
        row = db.execute("SELECT value FROM counters WHERE name='qkd-seq'").fetchone()
        if row is not None:
            return int(row[0])
        held = db.execute("SELECT max(first_seq + key_count - 1) FROM qkd_frames").fetchone()
        used = db.execute("SELECT max(mark) FROM qkd_consumed").fetchone()
        return max(int(held[0] or 0), int(used[0] or 0))

    # -- how many keys are buffered ---------------------------------------------------------

    def qkd_key_count(self, peer_site: str) -> int:
        """Keys of the peer's link buffered here (from memory; inside a transaction, with
        what it changed so far)."""
        count = self._held_counts().get(peer_site, 0)
        if self._held_changed:  # still inside the transaction that made the changes
            row = self._db.execute(
                "SELECT coalesce(sum(delta), 0) FROM temp.qkd_held_changes WHERE peer_site=?",
                (peer_site,),
            ).fetchone()
            count += int(row[0])
        return count

    def _held_counts(self) -> dict[str, int]:
        """The committed counts: changes whose transaction is over were committed (a
        rollback took the others back), so they are taken into memory now."""
        if self._held_changed and not self._db.in_transaction:
            changes = self._db.execute(
                "SELECT peer_site, sum(delta) FROM temp.qkd_held_changes GROUP BY peer_site"
            ).fetchall()
            for peer, delta in changes:
                self._held[str(peer)] = self._held.get(str(peer), 0) + int(delta)
            self._db.execute("DELETE FROM temp.qkd_held_changes")
            self._held_changed = False
        return self._held

    def _count_change(self, db: sqlite3.Connection, peer_site: str, delta: int) -> None:
        """Inside the transaction that adds or uses buffered keys: count them."""
        if delta:
            db.execute("INSERT INTO temp.qkd_held_changes VALUES (?, ?)", (peer_site, delta))
            self._held_changed = True

    # -- storing ----------------------------------------------------------------------------

    def store_qkd_keys(self, peer_site: str, keys: Iterable[QkdKeyFields]) -> int:
        """Store keys from a device; returns how many were new (re-sent and used ones are
        ignored). One transaction, one row per frame of up to ``MAX_FRAME_KEYS`` keys."""
        listed = list(keys)
        if not listed:
            return 0
        recent = self._recent_ids(peer_site)
        raws = raw_ids([k.key_id for k in listed])
        fresh: dict[bytes, bytes]
        if recent.holds_none_of(raws):
            # Nothing resent (the common case): only repeats within the delivery to drop.
            fresh = dict(zip(raws, (k.material for k in listed), strict=True))
            if len(fresh) != len(raws):  # the first copy of a repeated ID is kept
                fresh = {}
                for raw, key in zip(raws, listed, strict=True):
                    fresh.setdefault(raw, key.material)
        else:
            fresh = {}
            for raw, key in zip(raws, listed, strict=True):
                if raw not in fresh and recent.seq_of(raw) is None:
                    fresh[raw] = key.material
        if not fresh:
            return 0
        now = time.time()
        added: list[tuple[int, bytes]] = []
        with self.transaction() as db:
            used = self._used_unheld(db, peer_site, list(fresh))
            items = [(raw, m) for raw, m in fresh.items() if raw not in used]
            if not items:
                return 0
            seq = self._last_seq(db)
            for group in frame_groups(items):
                added.append((seq + 1, self._insert_frame(db, peer_site, seq + 1, group, now)))
                seq += len(group)
            db.execute("INSERT OR REPLACE INTO counters VALUES ('qkd-seq', ?)", (seq,))
            self._count_change(db, peer_site, len(items))
        self._held_counts()
        for first, ids in added:
            recent.add(first, ids, self.consumed_memory)
        return len(items)

    def _insert_frame(
        self,
        db: sqlite3.Connection,
        peer_site: str,
        first_seq: int,
        keys: Sequence[tuple[bytes, bytes]],
        received_at: float,
    ) -> bytes:
        """Seal and insert one frame of (ID, material) pairs; returns its IDs."""
        ids = b"".join(raw for raw, _ in keys)
        size = len(keys[0][1])
        used = empty_bitmap(len(keys))
        sealed = self._sealer.seal(
            frame_aad(peer_site, first_seq, size, ids, used), b"".join(m for _, m in keys)
        )
        db.execute(
            "INSERT INTO qkd_frames (first_seq, peer_site, key_count, key_size, held,"
            " received_at, used, key_ids, material) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (first_seq, peer_site, len(keys), size, len(keys), received_at, used, ids, sealed),
        )
        return ids

    # -- reading ----------------------------------------------------------------------------

    def _held_frames(
        self, peer_site: str, after: int, limit: int, material: bool = True
    ) -> list[QkdFrame]:
        """Up to ``limit`` frames with keys held, starting after receive number ``after``,
        oldest first (read at once: no statement stays open while a frame that does not
        open is quarantined); without their sealed material unless ``material``."""
        rows = self._db.execute(
            f"SELECT {FRAME_COLUMNS if material else FRAME_HEAD} FROM qkd_frames"
            " WHERE peer_site=? AND held > 0 AND first_seq > ? ORDER BY first_seq LIMIT ?",
            (peer_site, after, limit),
        ).fetchall()
        return [QkdFrame.of(row) for row in rows]

    def _frames_from(self, peer_site: str, after: int, material: bool = True) -> Iterator[QkdFrame]:
        """Frames with keys held after receive number ``after``, oldest first, read a few
        at a time (more each time)."""
        limit = FRAMES_READ_FIRST
        while True:
            frames = self._held_frames(peer_site, after, limit, material)
            yield from frames
            if len(frames) < limit:
                return
            after = frames[-1].first_seq
            limit = min(2 * limit, FRAMES_READ_MOST)

    def _open_frame(self, peer_site: str, frame: QkdFrame) -> bytes | None:
        """A frame's material (used keys as zeros), or None if it does not open: then it is
        quarantined (``KeyStore._quarantine`` calls ``_quarantine_frame``)."""
        if frame.sealed is None:
            return None
        first, last = id_text(frame.key_id(0)), id_text(frame.key_id(frame.key_count - 1))
        return self._open_row(
            "qkd_frames",
            (peer_site, str(frame.first_seq)),
            frame_aad(peer_site, frame.first_seq, frame.key_size, frame.key_ids, frame.used),
            frame.sealed,
            name=f"{peer_site}/{frame.first_seq} keys={first}..{last}",
        )

    def _quarantine_frame(self, db: sqlite3.Connection, peer_site: str, first_seq: int) -> None:
        """Inside a transaction: set a frame that does not open aside (its ciphertext to
        ``quarantined_rows``); its keys count as used, its IDs stay remembered."""
        row = db.execute(
            "SELECT held, material FROM qkd_frames WHERE peer_site=? AND first_seq=?",
            (peer_site, first_seq),
        ).fetchone()
        if row is None or row[1] is None:
            return
        db.execute(
            "INSERT INTO quarantined_rows (table_name, row_key, sealed, quarantined_at)"
            " VALUES ('qkd_frames', ?, ?, ?)",
            (f"{peer_site}/{first_seq}", bytes(row[1]), time.time()),
        )
        db.execute("UPDATE qkd_frames SET held=0, material=NULL WHERE first_seq=?", (first_seq,))
        self._count_change(db, peer_site, -int(row[0]))
        self._count_used(db, peer_site, int(row[0]))

    def oldest_qkd_keys(self, peer_site: str) -> Iterator[StoredQkdKey]:
        """The buffered QKD keys, oldest first, a frame opened at a time. Finish with the
        iterator before writing to the store. A frame that does not open is quarantined
        and skipped: the peer still holds its keys, and drops them as orphans once a
        batch names later keys or by our horizon."""
        for frame in list(self._frames_from(peer_site, -1)):
            material = self._open_frame(peer_site, frame)
            if material is None:
                continue
            size = frame.key_size
            texts = texts_of(frame.key_ids)
            for begin, end in frame.unused_spans():
                for i in range(begin, end):
                    yield StoredQkdKey(texts[i], material[i * size : (i + 1) * size])

    def oldest_qkd_run(self, peer_site: str, min_bytes: int, max_keys: int) -> QkdRun | None:
        """At the master: the oldest buffered keys, as few as make ``min_bytes`` of
        material, or all there are up to ``max_keys`` if they make less; None if none is
        buffered. A frame that does not open ends nothing: it and the keys read before it
        are used up (quarantined, see the module docstring) and the run starts after it."""
        if max_keys < 1:
            raise ValueError("a run has at least one key")
        ids: list[bytes] = []
        parts: list[bytes] = []
        have = count = 0
        first_seq = last_seq = -1
        for frame in self._frames_from(peer_site, -1):
            material = self._open_frame(peer_site, frame)
            if material is None:
                if count:
                    with self._writing() as db:
                        self._mark_used(db, peer_site, [(first_seq, last_seq)])
                    ids, parts, have, count = [], [], 0, 0
                continue
            size = frame.key_size
            for begin, end in frame.unused_spans():
                take = min(end - begin, max_keys - count, max(1, -(-(min_bytes - have) // size)))
                stop = begin + take
                ids.append(frame.key_ids[begin * QKD_KEY_ID_SIZE : stop * QKD_KEY_ID_SIZE])
                parts.append(material[begin * size : stop * size])
                if not count:
                    first_seq = frame.first_seq + begin
                last_seq = frame.first_seq + stop - 1
                count += take
                have += take * size
                if have >= min_bytes or count >= max_keys:
                    return QkdRun(b"".join(ids), b"".join(parts), first_seq, last_seq)
        if not count:
            return None
        return QkdRun(b"".join(ids), b"".join(parts), first_seq, last_seq)

    def qkd_run(
        self, peer_site: str, first_key_id: bytes, count: int, *, scan: bool = True
    ) -> QkdRun | None:
        """At the slave: the buffered key with this ID and the ones received after it, up to
        ``count`` keys in all (fewer if fewer are held); None if that key is not held. A
        frame that does not open leaves its keys out (see the module docstring).
        ``scan=False`` looks for the first key among the newest received only."""
        first_key_id = raw_id(first_key_id)
        found = self._locate(peer_site, [first_key_id], scan=scan).get(first_key_id)
        if found is None or not found.held or count < 1:
            return None
        ids: list[bytes] = []
        parts: list[bytes] = []
        taken = 0
        last_seq = -1
        for frame in self._frames_from(peer_site, found.seq - MAX_FRAME_KEYS):
            if frame.last_seq < found.seq:
                continue
            material = self._open_frame(peer_site, frame)
            if material is None:
                if frame.first_seq <= found.seq:
                    return None  # the first key itself
                continue
            size = frame.key_size
            for begin, end in frame.unused_spans(max(0, found.seq - frame.first_seq)):
                stop = min(end, begin + count - taken)
                ids.append(frame.key_ids[begin * QKD_KEY_ID_SIZE : stop * QKD_KEY_ID_SIZE])
                parts.append(material[begin * size : stop * size])
                taken += stop - begin
                last_seq = frame.first_seq + stop - 1
                if taken >= count:
                    return QkdRun(b"".join(ids), b"".join(parts), found.seq, last_seq)
        if not taken:
            return None
        return QkdRun(b"".join(ids), b"".join(parts), found.seq, last_seq)

    def get_qkd_keys(
        self, peer_site: str, key_ids: Sequence[str], *, scan: bool = True
    ) -> dict[str, bytes]:
        """The material of those of ``key_ids`` buffered here (a key in a frame that does
        not open is left out, as if the device had not delivered it). ``scan=False`` looks
        among the newest received only."""
        texts = dict(zip(raw_ids(key_ids), key_ids, strict=True))
        located = self._locate(peer_site, list(texts), scan=scan)
        held = sorted((place.seq, raw) for raw, place in located.items() if place.held)
        found: dict[str, bytes] = {}
        frame: QkdFrame | None = None
        material: bytes | None = None
        for seq, raw in held:
            if frame is None or seq > frame.last_seq:
                frame = self._frame_holding(peer_site, seq, material=True)
                material = None if frame is None else self._open_frame(peer_site, frame)
            if frame is None or material is None:
                continue
            index, size = seq - frame.first_seq, frame.key_size
            if not frame.is_used(index):
                found[texts[raw]] = material[index * size : (index + 1) * size]
        return found

    def oldest_qkd_key_ids(self, peer_site: str, limit: int) -> list[str]:
        out: list[str] = []
        for frame in self._frames_from(peer_site, -1, material=False):
            for begin, end in frame.unused_spans():
                stop = min(end, begin + limit - len(out))
                out += texts_of(frame.key_ids[begin * QKD_KEY_ID_SIZE : stop * QKD_KEY_ID_SIZE])
                if len(out) >= limit:
                    return out
        return out

    def newest_qkd_key_id(self, peer_site: str) -> str | None:
        row = self._db.execute(
            f"SELECT {FRAME_HEAD} FROM qkd_frames WHERE peer_site=? AND held > 0"
            " ORDER BY first_seq DESC LIMIT 1",
            (peer_site,),
        ).fetchone()
        if row is None:
            return None
        frame = QkdFrame.of(row)
        spans = frame.unused_spans()
        return id_text(frame.key_id(spans[-1][1] - 1)) if spans else None

    def _writing(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        """The transaction open now, or a new one."""
        if self._db.in_transaction:
            return contextlib.nullcontext(self._db)
        return self.transaction()

    # -- using keys ---------------------------------------------------------------------------

    def _mark_used(
        self, db: sqlite3.Connection, peer_site: str, ranges: Sequence[tuple[int, int]]
    ) -> int:
        """Inside a transaction: mark every held key whose receive number is in one of the
        inclusive ``ranges`` used, erasing its material; returns how many were held."""
        marked = 0
        whole: list[tuple[int]] = []
        for low, high in ranges:
            rows = db.execute(
                "SELECT first_seq, key_count, key_size, held, used, key_ids, NULL"
                " FROM qkd_frames WHERE peer_site=? AND held > 0 AND first_seq BETWEEN ? AND ?"
                " ORDER BY first_seq",
                (peer_site, max(-1, low - MAX_FRAME_KEYS + 1), high),
            ).fetchall()
            for row in rows:
                frame = QkdFrame.of(row)
                begin = max(low, frame.first_seq) - frame.first_seq
                end = min(high, frame.last_seq) - frame.first_seq + 1
                if begin >= end:
                    continue
                before = bitmap_int(frame.used)
                after = before | (((1 << (end - begin)) - 1) << begin)
                newly = after & ~before
                if not newly:
                    continue
                used_now = newly.bit_count()
                marked += used_now
                if frame.held == used_now:
                    whole.append((frame.first_seq,))
                    continue
                self._erase_in_frame(db, peer_site, frame, after, newly, used_now)
        if whole:
            db.executemany("UPDATE qkd_frames SET held=0, material=NULL WHERE first_seq=?", whole)
        self._count_change(db, peer_site, -marked)
        self._count_used(db, peer_site, marked)
        return marked

    def _erase_in_frame(
        self,
        db: sqlite3.Connection,
        peer_site: str,
        frame: QkdFrame,
        after: int,
        newly: int,
        used_now: int,
    ) -> None:
        """Some of a frame's keys become used: zero their bytes and seal it again."""
        row = db.execute(
            "SELECT material FROM qkd_frames WHERE first_seq=?", (frame.first_seq,)
        ).fetchone()
        full = QkdFrame(
            frame.first_seq,
            frame.key_count,
            frame.key_size,
            frame.held,
            frame.used,
            frame.key_ids,
            None if row is None or row[0] is None else bytes(row[0]),
        )
        material = self._open_frame(peer_site, full)
        if material is None:
            return  # quarantined whole now: every key of it is used
        erased = bytearray(material)
        size = frame.key_size
        zeros = bytes(size)
        bits = newly
        while bits:
            index = (bits & -bits).bit_length() - 1
            erased[index * size : (index + 1) * size] = zeros
            bits &= bits - 1
        used = bitmap_bytes(after, frame.key_count)
        sealed = self._sealer.seal(
            frame_aad(peer_site, frame.first_seq, size, frame.key_ids, used), bytes(erased)
        )
        db.execute(
            "UPDATE qkd_frames SET held=?, used=?, material=? WHERE first_seq=?",
            (frame.held - used_now, used, sealed, frame.first_seq),
        )

    def _count_used(self, db: sqlite3.Connection, peer_site: str, count: int) -> None:
        """How many keys were ever used survives the forgetting (benches and operators)."""
        if count:
            db.execute(
                "INSERT INTO counters VALUES (?, ?) ON CONFLICT (name) DO UPDATE"
                " SET value = value + excluded.value",
                (f"used:{peer_site}", count),
            )

    def _consume_qkd_keys(
        self, db: sqlite3.Connection, peer_site: str, key_ids: QkdRun | Iterable[str | bytes]
    ) -> None:
        """Inside a transaction: erase these keys' material and remember them as used; a
        key never held here is remembered by its ID alone. A run read from this buffer
        goes as its range of receive numbers."""
        if isinstance(key_ids, QkdRun) and key_ids.first_seq >= 0:
            self._mark_used(db, peer_site, [(key_ids.first_seq, key_ids.last_seq)])
            return
        listed = key_ids.key_ids if isinstance(key_ids, QkdRun) else key_ids
        raws = list(dict.fromkeys(raw_ids(listed)))
        if not raws:
            return
        located = self._locate(peer_site, raws)
        self._mark_used(
            db, peer_site, seq_ranges(place.seq for place in located.values() if place.held)
        )
        unheld = [raw for raw in raws if raw not in located]
        if unheld:
            mark = self._last_seq(db)
            added = db.executemany(
                "INSERT OR IGNORE INTO qkd_consumed VALUES (?, ?, ?)",
                [(peer_site, raw, mark) for raw in unheld],
            ).rowcount
            self._count_used(db, peer_site, added)

    def quarantine_qkd_keys(
        self, peer_site: str, key_ids: Iterable[str], keep: Collection[str] = ()
    ) -> None:
        """Mark QKD key IDs as never to be used (e.g. present on one side only), except
        those in ``keep``."""
        with self.transaction() as db:
            self._consume_qkd_keys(db, peer_site, [k for k in key_ids if k not in keep])
        self._held_counts()

    # -- used keys --------------------------------------------------------------------------
