"""The QKD half of the key store: keys a device delivered that wait to be agreed with the
peer (``qkd_keys``), and the memory of QKD key IDs already used (``qkd_consumed``).

``KeyStore`` inherits these methods; they share its database and transactions.

Theory of operation. Both devices of a link deliver one stream in one order, so the two
buffers should hold the same keys. They fall out of step when one side's buffer holds keys
the other will never get: the device restarted while one daemon was down, a daemon lost its
store, a device discarded keys, a batch was cut off mid-session. Every buffered key gets a
*receive number* (``seq``, increasing for the life of the store), and each side tells the
other its oldest keys and its newest one (QKD_HORIZON). From the peer's horizon a side
learns, in one store transaction (``apply_peer_horizon``):

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

Used key IDs are kept as 16 bytes each with the receive number they had (or the newest
receive number when they were used without being held). A row is forgotten once both
buffers have moved past it (our oldest buffered key, and the peer's oldest as its horizon
says, were received after it) and at least ``consumed_memory`` newer used IDs are
remembered: a device only ever re-sends keys it has not seen acknowledged, at most its
window of keys in flight (the serial protocol allows up to 65,535), so a re-sent key is
always among the remembered ones and is ignored.

Runs. A batch names QKD keys as a *run*: keys consecutive in receive order, by the first
key's ID, their number and SHA-256 over their 16-byte IDs (``QkdRun``). The master takes
the oldest keys it holds (``oldest_qkd_run``); the slave finds the key with that ID and the
keys received after it (``qkd_run``). A key whose row does not open is quarantined
(``KeyStore._open_row``): the peer still holds it, so no run may span the gap it leaves.
The master therefore never builds a run across one: keys it read before the gap are used
up with it (quarantined), and the run starts after it; the peer drops its copies of them
as orphans when the batch names the next key. The slave's run simply leaves the key out,
so its digest differs from the master's and the batch is refused at once.

At device rate, nothing on a hot path sorts, counts or scans the whole buffer: a peer's
oldest keys, its newest and a run from a given key are ranges of the index on
(peer_site, seq), and a key by ID is a probe of the (peer_site, key_id) index. Key IDs
are held as canonical lowercase UUID text (devices deliver them so), so a 16-byte ID
names exactly one row. How many keys each peer has buffered is counted once when the
store opens and then kept in memory (``qkd_key_count``); a transaction's changes to it
join the count when it commits, never when it rolls back (``qkd_held_changes``).
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
import uuid
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from qkdd.crypto import AEAD_NONCE_SIZE, AEAD_TAG_SIZE, hash_bytes
from qkdd.sealing import Sealer, StoreError
from qkdd.sealing import qkd_row_aad as _qkd_aad

# Used QKD key IDs remembered per peer at least, newest first: more than the largest
# window of keys in flight a serial device may announce (65,535), so any key a device may
# still re-send is recognised as used.
CONSUMED_MEMORY: Final = 65_536
# Key IDs per SQL statement when looking up many at once (SQLite's variable limit is higher).
_LOOKUP_CHUNK: Final = 500
# Forgetting used IDs walks the memory's index: done once per this many newly used keys
# (at most an eighth of the memory more is kept).
_FORGET_EVERY: Final = 1024
# Rows read per statement while building a run, doubling up to the most: a run of a few
# keys reads few rows, a long one few statements.
_RUN_READ_FIRST: Final = 64
# A sealed row's bytes beyond its material: the nonce and the tag.
_SEAL_OVERHEAD: Final = AEAD_NONCE_SIZE + AEAD_TAG_SIZE
_RUN_READ_MOST: Final = 4096
QKD_KEY_ID_SIZE: Final = 16

QKD_BUFFER_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS qkd_keys (
    seq         INTEGER PRIMARY KEY,
    peer_site   TEXT NOT NULL,
    key_id      TEXT NOT NULL,
    material    BLOB NOT NULL,
    received_at REAL NOT NULL,
    UNIQUE (peer_site, key_id)
);
-- A peer's oldest keys, its newest and a run from a given key, in receive order.
CREATE INDEX IF NOT EXISTS qkd_keys_by_peer ON qkd_keys (peer_site, seq);
CREATE TABLE IF NOT EXISTS qkd_consumed (
    peer_site TEXT NOT NULL,
    key_id    BLOB NOT NULL,
    mark      INTEGER NOT NULL,
    PRIMARY KEY (peer_site, key_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS qkd_consumed_by_mark ON qkd_consumed (peer_site, mark);
"""

# Changes of the buffered-key counts made inside a transaction. A temporary table is part
# of the connection's transactions, so a rollback takes its rows back with the rest: the
# count in memory only ever takes changes that were committed.
_HELD_CHANGES_SCHEMA: Final = """
CREATE TEMP TABLE IF NOT EXISTS qkd_held_changes (
    peer_site TEXT NOT NULL,
    delta     INTEGER NOT NULL
)
"""


@dataclass(frozen=True)
class StoredQkdKey:
    key_id: str
    material: bytes = field(repr=False)


@dataclass(frozen=True)
class QkdRun:
    """QKD keys consecutive in a buffer's receive order, as a batch names them."""

    key_ids: tuple[bytes, ...]  # 16-byte IDs in receive order
    material: bytes = field(repr=False, compare=False)  # their material concatenated
    # The same IDs as the store names them (canonical UUID text), when read from it.
    texts: tuple[str, ...] = field(default=(), repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.key_ids or set(map(len, self.key_ids)) != {QKD_KEY_ID_SIZE}:
            raise ValueError(f"a run is one or more QKD key IDs of {QKD_KEY_ID_SIZE} bytes")

    @property
    def first_key_id(self) -> bytes:
        return self.key_ids[0]

    @property
    def count(self) -> int:
        return len(self.key_ids)

    def digest(self) -> bytes:
        """SHA-256 over the 16-byte key IDs, in order."""
        return hash_bytes(b"".join(self.key_ids))


@dataclass(frozen=True)
class HorizonOutcome:
    """What a peer's horizon did here (``QkdBuffer.apply_peer_horizon``)."""

    dropped: int  # our buffered keys dropped as orphans
    skip: tuple[str, ...]  # the peer's listed keys to skip, marked used here already
    # Listed keys we lack without proof that they never come, or none of them held here:
    # look again when our buffer changes (a later key may arrive, or the buffer fill up).
    unresolved: bool
    # We hold one of the listed keys or the newest: our device got that far in the peer's
    # stream (keys of the peer's older than that which we lack never come).
    anchored: bool = False


def key_id_bytes(key_id: str) -> bytes:
    """The 16 bytes of a QKD key ID (a UUID, as devices and the peer protocol carry it)."""
    try:
        return uuid.UUID(key_id).bytes
    except ValueError:
        raise StoreError(f"QKD key ID {key_id!r} is not a UUID") from None


def id_text(raw: bytes) -> str:
    """Canonical UUID text of 16 bytes (as ``str(uuid.UUID(bytes=raw))``, faster)."""
    if len(raw) != QKD_KEY_ID_SIZE:
        raise StoreError(f"a QKD key ID is {QKD_KEY_ID_SIZE} bytes, not {len(raw)}")
    h = bytes(raw).hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _canonical_id(key_id: str | bytes) -> tuple[str, bytes]:
    """(canonical text, 16 bytes) of a QKD key ID given as text or as its 16 bytes;
    StoreError if it is not a UUID."""
    if isinstance(key_id, bytes):
        return id_text(key_id), key_id
    # Fast path for the usual form; anything else (braces, urn:uuid:) through uuid.
    if len(key_id) == 36 and key_id[8] == key_id[13] == key_id[18] == key_id[23] == "-":
        try:
            raw = bytes.fromhex(key_id.replace("-", ""))
        except ValueError:
            raw = b""
        if len(raw) == QKD_KEY_ID_SIZE:
            return key_id.lower(), raw
    raw = key_id_bytes(key_id)
    return id_text(raw), raw


def _rows_for(rows: Sequence[tuple[int, str, bytes]], need: int, most: int) -> int:
    """How many of ``rows`` (oldest first) make ``need`` bytes of material, at most
    ``most``; a sealed row is its material and a fixed overhead."""
    have = 0
    for count, (_, _, sealed) in enumerate(rows[:most], start=1):
        have += len(sealed) - _SEAL_OVERHEAD
        if have >= need:
            return count
    return min(len(rows), most)


def _stored_raws(texts: Sequence[str]) -> list[bytes]:
    """The 16 bytes of many buffered keys' IDs, converted at once."""
    joined = "".join(texts).replace("-", "")
    try:
        raw = bytes.fromhex(joined)
    except ValueError:
        raw = b""
    size = QKD_KEY_ID_SIZE
    if len(raw) != size * len(texts):
        return [_stored_raw(text) for text in texts]
    return [raw[i : i + size] for i in range(0, len(raw), size)]


def _canonical_ids(key_ids: Iterable[str | bytes]) -> dict[str, bytes]:
    """Canonical text -> 16 bytes for many IDs; canonical texts (the store's own, the
    peer protocol's) are converted at once, anything else one by one."""
    listed = list(key_ids)
    if listed and all(isinstance(k, str) for k in listed):
        texts: list[str] = listed  # type: ignore[assignment]
        joined = "".join(texts)
        n = len(texts)
        if (
            len(joined) == 36 * n
            and joined.count("-") == 4 * n
            and joined == joined.lower()
            and joined[8::36] == joined[13::36] == joined[18::36] == joined[23::36] == "-" * n
        ):
            raws = _stored_raws(texts)
            if len(raws) == len(texts):
                return dict(zip(texts, raws, strict=True))
    return dict(_canonical_id(k) for k in listed)


def _stored_raw(text: str) -> bytes:
    """The 16 bytes of a buffered key's ID (held canonical: only the hyphens go)."""
    try:
        raw = bytes.fromhex(text.replace("-", ""))
    except ValueError:
        raw = b""
    return raw if len(raw) == QKD_KEY_ID_SIZE else key_id_bytes(text)


class QkdBuffer:
    """QKD keys and used QKD key IDs; mixed into ``KeyStore``."""

    # Used IDs kept per peer at least (see the module docstring); tests and benches lower it.
    consumed_memory: int = CONSUMED_MEMORY
    # Buffered keys per peer as last committed (set up at open, ``_upgrade_qkd_buffer``),
    # and whether ``qkd_held_changes`` holds changes not yet taken into it.
    _held: dict[str, int]
    _held_changed: bool

    if TYPE_CHECKING:
        _db: sqlite3.Connection
        _sealer: Sealer

        def transaction(self) -> contextlib.AbstractContextManager[sqlite3.Connection]: ...

        def _open_row(
            self, table: str, key: tuple[str, ...], associated: bytes, sealed: bytes
        ) -> bytes | None: ...

        def _flag(self, name: str) -> bool: ...

    def _upgrade_qkd_buffer(self) -> None:
        """At open: move used IDs from the text table of older stores into
        ``qkd_consumed``, and count the buffered keys of each peer (once)."""
        old = self._db.execute(
            "SELECT 1 FROM sqlite_master WHERE type='table' AND name='consumed_qkd_keys'"
        ).fetchone()
        if old is not None:
            with self.transaction() as db:
                mark = self._last_seq(db)
                rows = db.execute("SELECT peer_site, key_id FROM consumed_qkd_keys").fetchall()
                db.executemany(
                    "INSERT OR IGNORE INTO qkd_consumed VALUES (?, ?, ?)",
                    [(peer, key_id_bytes(key_id), mark) for peer, key_id in rows],
                )
                db.execute(
                    "INSERT OR IGNORE INTO counters SELECT 'used:' || peer_site, count(*)"
                    " FROM consumed_qkd_keys GROUP BY peer_site"
                )
                db.execute("DROP TABLE consumed_qkd_keys")
        self._db.execute(_HELD_CHANGES_SCHEMA)
        self._held = {
            str(peer): int(n)
            for peer, n in self._db.execute(
                "SELECT peer_site, count(*) FROM qkd_keys GROUP BY peer_site"
            )
        }
        self._held_changed = False

    # -- receive numbers --------------------------------------------------------------------

    @staticmethod
    def _last_seq(db: sqlite3.Connection) -> int:
        """The newest receive number handed out (buffered keys are numbered in order of
        arrival, for the life of the store, across all peers)."""
        row = db.execute("SELECT value FROM counters WHERE name='qkd-seq'").fetchone()
        if row is not None:
            return int(row[0])
        # A store from before the counter: continue above every number in use.
        held = db.execute("SELECT max(seq) FROM qkd_keys").fetchone()[0] or 0
        used = db.execute("SELECT max(mark) FROM qkd_consumed").fetchone()[0] or 0
        return max(int(held), int(used))

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
        """Inside the transaction that adds or removes buffered keys: count them."""
        if delta:
            db.execute("INSERT INTO temp.qkd_held_changes VALUES (?, ?)", (peer_site, delta))
            self._held_changed = True

    # -- storing and reading ----------------------------------------------------------------

    def store_qkd_keys(self, peer_site: str, keys: Iterable[StoredQkdKey]) -> int:
        """Store keys from a device; returns how many were new (re-sent and used ones are
        ignored). One transaction and one insert statement per delivery."""
        fresh: dict[str, tuple[bytes, bytes]] = {}  # canonical ID -> (16 bytes, material)
        for key in keys:
            text, raw = _canonical_id(key.key_id)
            fresh.setdefault(text, (raw, key.material))
        if not fresh:
            return 0
        sealed = {
            text: self._sealer.seal(_qkd_aad(peer_site, text), material)
            for text, (_, material) in fresh.items()
        }
        now = time.time()
        with self.transaction() as db:
            used = self._consumed_raw(db, peer_site, [raw for raw, _ in fresh.values()])
            seq = self._last_seq(db)
            rows = [
                (seq + n, peer_site, text, blob, now)
                for n, (text, blob) in enumerate(
                    ((t, b) for t, b in sealed.items() if fresh[t][0] not in used), start=1
                )
            ]
            if not rows:
                return 0
            # A key held already is ignored here; its receive number stays unused.
            added = db.executemany(
                "INSERT OR IGNORE INTO qkd_keys (seq, peer_site, key_id, material,"
                " received_at) VALUES (?, ?, ?, ?, ?)",
                rows,
            ).rowcount
            db.execute("INSERT OR REPLACE INTO counters VALUES ('qkd-seq', ?)", (seq + len(rows),))
            self._count_change(db, peer_site, added)
        self._held_counts()
        return added

    def oldest_qkd_keys(self, peer_site: str) -> Iterator[StoredQkdKey]:
        """The buffered QKD keys, oldest first, unsealed one at a time as they are taken.
        Finish with the iterator before writing to the store.

        A key that does not open is quarantined (deleting the row being read is safe in
        SQLite) and skipped: the peer still holds it, and drops it as an orphan once a
        batch names later keys (``quarantine_qkd_keys_before``) or by our horizon."""
        rows = self._db.execute(
            "SELECT key_id, material FROM qkd_keys WHERE peer_site=? ORDER BY seq", (peer_site,)
        )
        for key_id, sealed in rows:
            material = self._open_qkd(peer_site, key_id, sealed)
            if material is not None:
                yield StoredQkdKey(key_id, material)

    def oldest_qkd_run(self, peer_site: str, min_bytes: int, max_keys: int) -> QkdRun | None:
        """At the master: the oldest buffered keys, as few as make ``min_bytes`` of
        material, or all there are up to ``max_keys`` if they make less; None if none is
        buffered. A key that does not open ends nothing: it and the keys read before it
        are used up (quarantined, see the module docstring) and the run starts after it."""
        if max_keys < 1:
            raise ValueError("a run has at least one key")
        texts: list[str] = []
        parts: list[bytes] = []
        have = 0
        after = -1
        limit = min(max_keys, _RUN_READ_FIRST)
        while True:
            rows = self._rows_after(peer_site, after, limit)
            # Open at once the rows the run needs (their sizes show before opening); the
            # rest, if one of those does not open, one by one.
            wanted = _rows_for(rows, min_bytes - have, max_keys - len(texts))
            opened = self._open_qkd_rows(peer_site, rows[:wanted])
            for index, (seq, text, sealed) in enumerate(rows):
                after = seq
                material = opened[index] if index < wanted else None
                if material is None:
                    material = self._open_qkd(peer_site, text, sealed)
                if material is None:
                    if texts:
                        with self._writing() as db:
                            self._consume_qkd_keys(db, peer_site, texts)
                        texts, parts, have = [], [], 0
                    continue
                texts.append(text)
                parts.append(material)
                have += len(material)
                if have >= min_bytes or len(texts) == max_keys:
                    return self._run(texts, parts)
            if len(rows) < limit:  # the buffer holds no more
                return self._run(texts, parts) if texts else None
            limit = min(2 * limit, _RUN_READ_MOST, max_keys - len(texts))

    def qkd_run(self, peer_site: str, first_key_id: bytes, count: int) -> QkdRun | None:
        """At the slave: the buffered key ``first_key_id`` and up to ``count - 1`` keys
        received after it, in order (fewer if the device has not delivered the rest yet);
        None if that key is not buffered here (or does not open). A later key that does
        not open is quarantined and left out: the run's digest then tells it apart."""
        if count < 1:
            raise ValueError("a run has at least one key")
        first = self._db.execute(
            "SELECT seq FROM qkd_keys WHERE peer_site=? AND key_id=?",
            (peer_site, id_text(first_key_id)),
        ).fetchone()
        if first is None:
            return None
        texts: list[str] = []
        parts: list[bytes] = []
        after = int(first[0]) - 1
        while len(texts) < count:
            limit = min(count - len(texts), _RUN_READ_MOST)
            rows = self._rows_after(peer_site, after, limit)
            for (seq, text, sealed), opened in zip(
                rows, self._open_qkd_rows(peer_site, rows), strict=True
            ):
                material = opened if opened is not None else self._open_qkd(peer_site, text, sealed)
                if material is not None:
                    texts.append(text)
                    parts.append(material)
                elif after < int(first[0]):  # the first key itself
                    return None
                after = seq
            if len(rows) < limit:
                break
        return self._run(texts, parts) if texts else None

    def _rows_after(self, peer_site: str, seq: int, limit: int) -> list[tuple[int, str, bytes]]:
        """Up to ``limit`` buffered rows received after ``seq``, oldest first (read at
        once: no statement stays open while a row that does not open is quarantined)."""
        rows: list[tuple[int, str, bytes]] = self._db.execute(
            "SELECT seq, key_id, material FROM qkd_keys WHERE peer_site=? AND seq>?"
            " ORDER BY seq LIMIT ?",
            (peer_site, seq, limit),
        ).fetchall()
        return rows

    @staticmethod
    def _run(texts: Sequence[str], parts: Sequence[bytes]) -> QkdRun:
        return QkdRun(tuple(_stored_raws(texts)), b"".join(parts), tuple(texts))

    def _writing(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        """The transaction open now, or a new one."""
        if self._db.in_transaction:
            return contextlib.nullcontext(self._db)
        return self.transaction()

    def _open_qkd_rows(
        self, peer_site: str, rows: Sequence[tuple[int, str, bytes]]
    ) -> list[bytes | None]:
        """The material of many rows in one call; None where a row does not open (the
        caller then takes it through ``_open_qkd``, which sets it aside)."""
        return self._sealer.open_many(
            [(_qkd_aad(peer_site, text), bytes(sealed)) for _, text, sealed in rows]
        )

    def _open_qkd(self, peer_site: str, key_id: str, sealed: bytes) -> bytes | None:
        material = self._open_row(
            "qkd_keys", (peer_site, key_id), _qkd_aad(peer_site, key_id), sealed
        )
        if material is None:
            # The row is quarantined now, and stays so even if the transaction around
            # rolls back (``KeyStore.transaction`` moves it again): not counted any more.
            self._held[peer_site] = self._held.get(peer_site, 0) - 1
        return material

    def get_qkd_keys(self, peer_site: str, key_ids: Sequence[str]) -> dict[str, bytes]:
        found: dict[str, bytes] = {}
        for key_id in key_ids:
            row = self._db.execute(
                "SELECT material FROM qkd_keys WHERE peer_site=? AND key_id=?", (peer_site, key_id)
            ).fetchone()
            # A key that does not open is left out, as if the device had not delivered it.
            if row and (material := self._open_qkd(peer_site, key_id, row[0])) is not None:
                found[key_id] = material
        return found

    def oldest_qkd_key_ids(self, peer_site: str, limit: int) -> list[str]:
        rows = self._db.execute(
            "SELECT key_id FROM qkd_keys WHERE peer_site=? ORDER BY seq LIMIT ?", (peer_site, limit)
        )
        return [str(r[0]) for r in rows]

    def newest_qkd_key_id(self, peer_site: str) -> str | None:
        row = self._db.execute(
            "SELECT key_id FROM qkd_keys WHERE peer_site=? ORDER BY seq DESC LIMIT 1", (peer_site,)
        ).fetchone()
        return None if row is None else str(row[0])

    # -- lining the buffers up ----------------------------------------------------------------

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
            seqs = self._held_seqs(db, peer_site, key_ids)
            stale = self._buffered_before(db, peer_site, min(seqs.values())) if seqs else []
            stale = [k for k in stale if k not in keep]
            self._consume_qkd_keys(db, peer_site, stale)
        self._held_counts()
        return len(stale)

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
        with self.transaction() as db:
            held = self._held_seqs(db, peer_site, [*listed, *([newest] if newest else [])])
            used = self._consumed_among(db, peer_site, listed)
            listed_held = [held[k] for k in listed if k in held]
            newest_held = newest is not None and newest in held
            if listed_held:
                stale = self._buffered_before(db, peer_site, min(listed_held))  # rule (a)
            elif (
                listed
                and listed[0] not in used
                and not newest_held
                and (buffer_full or self._flag(f"peer-reset:{peer_site}"))
            ):
                stale = self._buffered_before(db, peer_site, None)  # rule (c)
            else:
                stale = []
            stale = [k for k in stale if k not in keep]
            self._consume_qkd_keys(db, peer_site, stale)
            # Rule (b): past the anchor, what we lack never comes.
            if newest_held:
                anchor = len(listed)
            else:
                anchor = max((i + 1 for i, k in enumerate(listed) if k in held), default=0)
            lacked = [k for k in listed[:anchor] if k not in held and k not in used]
            skip = [k for k in listed if k not in exclude and (k in used or k in lacked)]
            self._consume_qkd_keys(db, peer_site, [k for k in lacked if k not in exclude])
            unresolved = bool(listed) and not listed_held
            unresolved |= any(k not in held and k not in used for k in listed[anchor:])
            if listed_held or not listed:  # else we cannot tell where the peer is
                self._forget_consumed(db, peer_site, min(listed_held, default=None))
        self._held_counts()
        return HorizonOutcome(
            len(stale), tuple(dict.fromkeys(skip)), unresolved, bool(listed_held) or newest_held
        )

    def _held_seqs(
        self, db: sqlite3.Connection, peer_site: str, key_ids: Iterable[str]
    ) -> dict[str, int]:
        """Receive numbers of those of ``key_ids`` that are buffered here."""
        ids = list(dict.fromkeys(key_ids))
        found: dict[str, int] = {}
        for start in range(0, len(ids), _LOOKUP_CHUNK):
            chunk = ids[start : start + _LOOKUP_CHUNK]
            marks = ",".join("?" * len(chunk))
            for key_id, seq in db.execute(
                f"SELECT key_id, seq FROM qkd_keys WHERE peer_site=? AND key_id IN ({marks})",
                (peer_site, *chunk),
            ):
                found[str(key_id)] = int(seq)
        return found

    @staticmethod
    def _held_run(
        db: sqlite3.Connection, peer_site: str, key_ids: Sequence[str]
    ) -> list[int] | None:
        """Receive numbers of ``key_ids`` if they are buffered here as a run (in this
        order, nothing else of the peer's between them); else None."""
        first = db.execute(
            "SELECT seq FROM qkd_keys WHERE peer_site=? AND key_id=?", (peer_site, key_ids[0])
        ).fetchone()
        if first is None:
            return None
        rows = db.execute(
            "SELECT seq, key_id FROM qkd_keys WHERE peer_site=? AND seq>=? ORDER BY seq LIMIT ?",
            (peer_site, first[0], len(key_ids)),
        ).fetchall()
        if len(rows) != len(key_ids) or [row[1] for row in rows] != list(key_ids):
            return None
        return [int(row[0]) for row in rows]

    def _consumed_raw(
        self, db: sqlite3.Connection, peer_site: str, raw_ids: Sequence[bytes]
    ) -> set[bytes]:
        """Those of the 16-byte ``raw_ids`` remembered as used."""
        found: set[bytes] = set()
        for start in range(0, len(raw_ids), _LOOKUP_CHUNK):
            chunk = raw_ids[start : start + _LOOKUP_CHUNK]
            marks = ",".join("?" * len(chunk))
            for (key_id,) in db.execute(
                f"SELECT key_id FROM qkd_consumed WHERE peer_site=? AND key_id IN ({marks})",
                (peer_site, *chunk),
            ):
                found.add(bytes(key_id))
        return found

    def _consumed_among(
        self, db: sqlite3.Connection, peer_site: str, key_ids: Iterable[str]
    ) -> set[str]:
        raw = list(dict.fromkeys(key_id_bytes(k) for k in key_ids))
        return {id_text(k) for k in self._consumed_raw(db, peer_site, raw)}

    @staticmethod
    def _buffered_before(db: sqlite3.Connection, peer_site: str, seq: int | None) -> list[str]:
        """Buffered key IDs received before ``seq`` (all of them for None)."""
        rows = db.execute(
            "SELECT key_id FROM qkd_keys WHERE peer_site=? AND seq < ? ORDER BY seq",
            (peer_site, seq if seq is not None else 2**62),
        )
        return [str(r[0]) for r in rows]

    # -- used keys --------------------------------------------------------------------------

    def is_qkd_key_consumed(self, peer_site: str, key_id: str) -> bool:
        return self._is_consumed(self._db, peer_site, key_id)

    @staticmethod
    def _is_consumed(db: sqlite3.Connection, peer_site: str, key_id: str) -> bool:
        row = db.execute(
            "SELECT 1 FROM qkd_consumed WHERE peer_site=? AND key_id=?",
            (peer_site, key_id_bytes(key_id)),
        ).fetchone()
        return row is not None

    def _consume_qkd_keys(
        self, db: sqlite3.Connection, peer_site: str, key_ids: Iterable[str | bytes]
    ) -> None:
        """Inside a transaction: erase these keys' material and remember them as used,
        each with its receive number (or the newest one, for a key never held here).
        IDs as text or as 16 bytes. A run (a batch's keys) goes in one range delete."""
        ids = _canonical_ids(key_ids)  # canonical text -> 16 bytes
        if not ids:
            return
        texts = list(ids)
        run = self._held_run(db, peer_site, texts)
        if run is not None:
            seqs = dict(zip(texts, run, strict=True))
            gone = db.execute(
                "DELETE FROM qkd_keys WHERE peer_site=? AND seq BETWEEN ? AND ?",
                (peer_site, run[0], run[-1]),
            ).rowcount
        else:
            seqs = self._held_seqs(db, peer_site, texts)
            gone = db.executemany(
                "DELETE FROM qkd_keys WHERE seq=?", [(seq,) for seq in seqs.values()]
            ).rowcount
        self._count_change(db, peer_site, -gone)
        last = self._last_seq(db) if len(seqs) < len(ids) else 0
        added = db.executemany(
            "INSERT OR IGNORE INTO qkd_consumed VALUES (?, ?, ?)",
            [(peer_site, raw, seqs.get(text, last)) for text, raw in ids.items()],
        ).rowcount
        if added:
            # How many were ever used survives the forgetting (benches and operators).
            db.execute(
                "INSERT INTO counters VALUES (?, ?) ON CONFLICT (name) DO UPDATE"
                " SET value = value + excluded.value",
                (f"used:{peer_site}", added),
            )

    def quarantine_qkd_keys(
        self, peer_site: str, key_ids: Iterable[str], keep: Collection[str] = ()
    ) -> None:
        """Mark QKD key IDs as never to be used (e.g. present on one side only), except
        those in ``keep``."""
        with self.transaction() as db:
            self._consume_qkd_keys(db, peer_site, [k for k in key_ids if k not in keep])
        self._held_counts()

    def consumed_count(self, peer_site: str) -> int:
        """Used QKD key IDs remembered for the peer (the newest; older ones are forgotten)."""
        row = self._db.execute("SELECT count(*) FROM qkd_consumed WHERE peer_site=?", (peer_site,))
        return int(row.fetchone()[0])

    def qkd_keys_used(self, peer_site: str) -> int:
        """QKD keys of the peer's link ever used here (agreed, skipped or quarantined)."""
        row = self._db.execute(
            "SELECT value FROM counters WHERE name=?", (f"used:{peer_site}",)
        ).fetchone()
        return int(row[0]) if row else 0

    def _forget_consumed(
        self, db: sqlite3.Connection, peer_site: str, peer_oldest_seq: int | None
    ) -> int:
        """Forget used IDs that both buffers have moved past, keeping the newest
        ``consumed_memory`` (``peer_oldest_seq``: our receive number of the peer's oldest
        key that we hold, None if its horizon names none we hold)."""
        used = db.execute("SELECT value FROM counters WHERE name=?", (f"used:{peer_site}",))
        used_now = int((used.fetchone() or (0,))[0])
        done = self.__dict__.setdefault("_forgotten_at", {})
        every = max(1, min(_FORGET_EVERY, self.consumed_memory // 8))
        if used_now - done.get(peer_site, -every) < every:
            return 0
        done[peer_site] = used_now
        row = db.execute(
            "SELECT mark FROM qkd_consumed WHERE peer_site=? ORDER BY mark DESC LIMIT 1 OFFSET ?",
            (peer_site, self.consumed_memory),
        ).fetchone()
        if row is None:
            return 0  # fewer remembered than the memory holds
        limit = int(row[0])
        ours = db.execute("SELECT min(seq) FROM qkd_keys WHERE peer_site=?", (peer_site,))
        oldest = ours.fetchone()[0]
        if oldest is not None:
            limit = min(limit, int(oldest))
        if peer_oldest_seq is not None:
            limit = min(limit, peer_oldest_seq)
        cursor = db.execute(
            "DELETE FROM qkd_consumed WHERE peer_site=? AND mark < ?", (peer_site, limit)
        )
        return cursor.rowcount
