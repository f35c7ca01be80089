"""Application keys held as blocks: the ``key_chunks`` table of the key store.

Key agreement makes keys in blocks: up to thousands of keys of one batch, one SAE pair and
one size, whose IDs are ``prefix || index`` (``qkdd.key_ids``). A block is held as chunks
of at most ``CHUNK_MATERIAL_BYTES`` of material, each one row sealed as a whole
(``sealing.key_chunk_aad``), so storing a batch writes a row per ~8 KiB, not per key, and
no row per key exists anywhere.

- A chunk carries a taken-bitmap. Handing a key out sets its bit, zeroes its bytes and
  seals the chunk again in the same transaction; a chunk whose keys are all taken is
  deleted (``secure_delete`` overwrites what is freed).
- A key asked for by ID is found through the index on (prefix, first index): the chunk
  with the greatest first index not above the key's index, if the key lies within it.
- The pool hands out the oldest ready chunks of a pair first (index on pair, state, age),
  lowest index first within a chunk.
- Hand-outs made together (``handing_out``: the API's requests ready at one moment) share
  one transaction: each chunk they take from is opened, sealed again and written once,
  and their keys are erased by its commit.
- How many keys of each pair are ready is kept in memory: summed once when the store
  opens, then changed by each transaction that commits (a rolled-back one changes
  nothing), so counting costs the same however many keys are held. One process takes
  keys from a store (the daemon); others that open it (``qkdd allow-bootstrap``) only set
  flags.
- A chunk that does not open is quarantined and its untaken keys withdrawn.

``KeyStore`` inherits these methods; they share its database and transactions.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, Final

from qkdd.hybrid import lp
from qkdd.key_ids import ID_PREFIX_SIZE, MAX_INDEX, KeyIdError, key_id, key_ids, split_key_id
from qkdd.sealing import RowDoesNotOpen, Sealer, StoreError, key_chunk_aad, key_chunk_name_aad
from qkdd.store.records import ErasedKey, HybridKey, Unopened

# Material sealed together in one chunk at most (a key larger than this is a chunk alone).
# Larger chunks make storing a batch cheaper, smaller ones handing out a single key.
CHUNK_MATERIAL_BYTES: Final = 8192

KEY_BLOCKS_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS key_chunks (
    seq         INTEGER PRIMARY KEY,
    peer_site   TEXT NOT NULL,
    batch_id    INTEGER NOT NULL,
    id_prefix   BLOB NOT NULL,
    first_index INTEGER NOT NULL,
    count       INTEGER NOT NULL,
    master_sae  TEXT NOT NULL,
    slave_sae   TEXT NOT NULL,
    size_bits   INTEGER NOT NULL,
    state       TEXT NOT NULL CHECK (state IN ('pending', 'ready')),
    created_at  REAL NOT NULL,
    remaining   INTEGER NOT NULL,
    taken       BLOB NOT NULL,
    -- Last: reading the other columns never reads the overflow pages of the material.
    material    BLOB NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS chunks_by_id ON key_chunks (id_prefix, first_index);
-- Oldest ready chunks of a pair come straight off this index (no sort of the whole pool).
CREATE INDEX IF NOT EXISTS chunks_by_pair_age
    ON key_chunks (master_sae, slave_sae, state, created_at);
CREATE INDEX IF NOT EXISTS chunks_by_batch ON key_chunks (peer_site, batch_id);
"""

_CHUNK_COLUMNS: Final = (
    "seq, peer_site, id_prefix, first_index, count, master_sae, slave_sae, size_bits,"
    " state, remaining, taken"
)
_INSERT_CHUNK: Final = (
    "INSERT INTO key_chunks (peer_site, batch_id, id_prefix, first_index, count, master_sae,"
    " slave_sae, size_bits, state, created_at, remaining, taken, material)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


@dataclass(frozen=True)
class NewKeyBlock:
    """Keys of one batch for one SAE pair, all of one size, IDs prefix||index."""

    id_prefix: bytes  # 12 bytes
    master_sae_id: str
    slave_sae_id: str
    size_bits: int
    count: int
    material: bytes = field(repr=False)  # count * size_bits // 8 bytes; key i at [i*kb:(i+1)*kb]
    first_index: int = 0

    def __post_init__(self) -> None:
        if len(self.id_prefix) != ID_PREFIX_SIZE:
            raise ValueError(f"a key block's ID prefix is {ID_PREFIX_SIZE} bytes")
        if self.size_bits <= 0 or self.size_bits % 8:
            raise ValueError(f"keys of {self.size_bits} bits are not whole bytes")
        if self.count < 1 or self.first_index < 0 or self.last_index > MAX_INDEX:
            raise ValueError(f"keys {self.first_index}+{self.count} are out of the index range")
        if len(self.material) != self.count * self.size_bits // 8:
            raise ValueError(
                f"{self.count} keys of {self.size_bits} bits need "
                f"{self.count * self.size_bits // 8} bytes, not {len(self.material)}"
            )

    @property
    def last_index(self) -> int:
        return self.first_index + self.count - 1


def keys_per_chunk(size_bits: int) -> int:
    return max(1, CHUNK_MATERIAL_BYTES // (size_bits // 8))


# -- the taken-bitmap: bit i (byte i // 8, bit i % 8) set once key i of the chunk is out --


def empty_bitmap(count: int) -> bytes:
    return bytes((count + 7) // 8)


def taken_count(taken: bytes | bytearray) -> int:
    return int.from_bytes(taken, "little").bit_count()


def is_taken(taken: bytes | bytearray, index: int) -> bool:
    return bool(taken[index >> 3] >> (index & 7) & 1)


def untaken(taken: bytes | bytearray, count: int, limit: int) -> list[int]:
    """The first ``limit`` indices (within the chunk) whose keys are not taken."""
    found: list[int] = []
    for byte_index, byte in enumerate(taken):
        if byte == 0xFF:
            continue
        base = byte_index * 8
        if not byte and base + 8 <= count and len(found) + 8 <= limit:
            found += range(base, base + 8)  # none of these eight taken
            continue
        for bit in range(8):
            index = base + bit
            if index >= count or len(found) == limit:
                return found
            if not byte >> bit & 1:
                found.append(index)
    return found


def untaken_runs(taken: bytes | bytearray, count: int, limit: int) -> list[tuple[int, int]]:
    """The first ``limit`` keys (within the chunk) not taken, as runs of consecutive ones:
    (first index, count) each, in order."""
    free = ~int.from_bytes(taken, "little") & ((1 << count) - 1)  # a bit per untaken key
    runs: list[tuple[int, int]] = []
    while free and limit > 0:
        first = (free & -free).bit_length() - 1
        rest = free >> first
        length = min((rest ^ (rest + 1)).bit_length() - 1, limit)
        runs.append((first, length))
        limit -= length
        free &= ~(((1 << length) - 1) << first)
    return runs


def runs_of(indices: Sequence[int]) -> list[tuple[int, int]]:
    """Ascending indices as runs of consecutive ones, (first index, count) each."""
    runs: list[tuple[int, int]] = []
    for index in indices:
        if runs and runs[-1][0] + runs[-1][1] == index:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((index, 1))
    return runs


@dataclass(frozen=True)
class ChunkRow:
    """A chunk's identity and state as its row holds them (not its material)."""

    seq: int
    peer_site: str
    id_prefix: bytes
    first_index: int
    count: int
    master_sae: str
    slave_sae: str
    size_bits: int
    state: str
    remaining: int
    taken: bytes

    @property
    def key_bytes(self) -> int:
        return self.size_bits // 8

    @property
    def name(self) -> str:
        """How the quarantine and the log name the chunk: its first and last key IDs."""
        last = self.first_index + self.count - 1
        return f"{key_id(self.id_prefix, self.first_index)}..{key_id(self.id_prefix, last)}"

    @cached_property
    def _name_aad(self) -> bytes:
        return key_chunk_name_aad(
            self.peer_site,
            self.id_prefix,
            self.first_index,
            self.count,
            self.master_sae,
            self.slave_sae,
            self.size_bits,
        )

    def aad(self, taken: bytes | bytearray) -> bytes:
        """``sealing.key_chunk_aad`` of the chunk with this bitmap."""
        return self._name_aad + lp(bytes(taken))

    def ids(self, indices: Sequence[int]) -> list[str]:
        """The key IDs of these indices within the chunk (ascending), a run at a time."""
        return self.run_ids(runs_of(indices))

    def run_ids(self, runs: Sequence[tuple[int, int]]) -> list[str]:
        """The key IDs of runs of keys within the chunk, (first index, count) each."""
        out: list[str] = []
        for first, count in runs:
            out += key_ids(self.id_prefix, self.first_index + first, count)
        return out

    def untaken_keys(self) -> list[ErasedKey]:
        ids = self.ids(untaken(self.taken, self.count, self.count))
        return [ErasedKey(text, self.master_sae, self.slave_sae) for text in ids]


def _chunk_row(row: Sequence[Any]) -> ChunkRow:
    seq, peer, prefix, first, count, master, slave, size, state, remaining, taken = row
    return ChunkRow(
        int(seq),
        str(peer),
        bytes(prefix),
        int(first),
        int(count),
        str(master),
        str(slave),
        int(size),
        str(state),
        int(remaining),
        bytes(taken),
    )


_OLDEST_READY: Final = (
    f"SELECT {_CHUNK_COLUMNS}, material FROM key_chunks WHERE master_sae=? AND slave_sae=?"
    " AND state='ready' ORDER BY created_at, seq"
)


@dataclass
class _OpenChunk:
    """A chunk opened for a hand-out: its plaintext and bitmap as they will be sealed."""

    row: ChunkRow
    plain: bytearray = field(repr=False)
    taken: bytearray
    out: int = 0  # keys taken from it in this hand-out

    def take(self, indices: Sequence[int]) -> list[bytes]:
        """The material of these keys (ascending indices, none taken), zeroed here and
        marked taken."""
        return self.take_runs(runs_of(indices))

    def take_runs(self, runs: Sequence[tuple[int, int]]) -> list[bytes]:
        """``take`` of runs of consecutive keys, (first index, count) each: a run is copied,
        zeroed and marked taken at once."""
        size = self.row.key_bytes
        out: list[bytes] = []
        bits = 0
        for first, count in runs:
            low, high = first * size, (first + count) * size
            run = bytes(self.plain[low:high])
            self.plain[low:high] = bytes(high - low)
            out += [run[i : i + size] for i in range(0, high - low, size)]
            bits |= ((1 << count) - 1) << first
            self.out += count
        taken = int.from_bytes(self.taken, "little") | bits
        self.taken[:] = taken.to_bytes(len(self.taken), "little")
        return out

    def wipe(self) -> None:
        self.plain[:] = bytes(len(self.plain))


@dataclass
class _Gathered:
    """The transaction of ``KeyBlocks.handing_out``, the chunks opened in it, and per pair
    the oldest ready chunks, in order, as its last hand-out read them: the next one of the
    pair takes from these without reading the store when they hold enough."""

    db: sqlite3.Connection
    opened: dict[int, _OpenChunk]
    oldest: dict[tuple[str, str], list[_OpenChunk]] = field(default_factory=dict)


def _take_from(chunks: Sequence[_OpenChunk], number: int) -> tuple[list[str], list[bytes]]:
    """The IDs and materials of the ``number`` first untaken keys of ``chunks`` (in order;
    they hold enough), taken."""
    ids: list[str] = []
    materials: list[bytes] = []
    for chunk in chunks:
        if len(ids) == number:
            break
        runs = untaken_runs(chunk.taken, chunk.row.count, number - len(ids))
        materials += chunk.take_runs(runs)
        ids += chunk.row.run_ids(runs)
    return ids, materials


def seal_chunk_rows(
    sealer: Sealer,
    peer_site: str,
    batch_id: int,
    block: NewKeyBlock,
    state: str,
    created_at: float,
) -> Iterator[tuple[object, ...]]:
    """The rows (for ``_INSERT_CHUNK``) of a block's chunks, each sealed, none taken."""
    per_chunk = keys_per_chunk(block.size_bits)
    key_bytes = block.size_bits // 8
    for start in range(0, block.count, per_chunk):
        count = min(per_chunk, block.count - start)
        first = block.first_index + start
        taken = empty_bitmap(count)
        aad = key_chunk_aad(
            peer_site,
            block.id_prefix,
            first,
            count,
            block.master_sae_id,
            block.slave_sae_id,
            block.size_bits,
            taken,
        )
        sealed = sealer.seal(aad, block.material[start * key_bytes : (start + count) * key_bytes])
        yield (
            peer_site,
            batch_id,
            bytes(block.id_prefix),
            first,
            count,
            block.master_sae_id,
            block.slave_sae_id,
            block.size_bits,
            state,
            created_at,
            count,
            taken,
            sealed,
        )


def insert_chunk_rows(db: sqlite3.Connection, rows: Iterable[tuple[object, ...]]) -> None:
    db.executemany(_INSERT_CHUNK, rows)


class KeyBlocks:
    """Chunks of key blocks and the ready counts of the pool; mixed into ``KeyStore``."""

    # Ready keys per (master, slave), as committed; changes of the open transaction (None:
    # count the pair again once it commits).
    _ready: dict[tuple[str, str], int]
    _ready_changes: dict[tuple[str, str], int | None]
    # Told after a commit that left fewer ready keys of some pair (handed out, expired,
    # withdrawn): the link that refills the pools wakes up instead of looking every so often.
    on_keys_taken: Callable[[], None] | None = None
    # The open ``handing_out`` block, if any.
    _gathered: _Gathered | None = None

    if TYPE_CHECKING:
        _db: sqlite3.Connection
        _sealer: Sealer

        def transaction(self) -> contextlib.AbstractContextManager[sqlite3.Connection]: ...

        def _set_aside(self, row: Unopened) -> None: ...

    # -- ready counts -----------------------------------------------------------------------

    def _count_ready_keys(self) -> None:
        """At open: the ready keys of every pair (one pass over the chunks, not the keys)."""
        self._ready = {
            (str(master), str(slave)): int(n)
            for master, slave, n in self._db.execute(
                "SELECT master_sae, slave_sae, sum(remaining) FROM key_chunks"
                " WHERE state='ready' GROUP BY master_sae, slave_sae"
            )
        }

    def _ready_changed(self, master: str, slave: str, delta: int) -> None:
        """Inside a transaction: the pair's ready count changes by ``delta`` if it commits."""
        pair = (master, slave)
        if pair not in self._ready_changes:
            self._ready_changes[pair] = delta
        elif (before := self._ready_changes[pair]) is not None:
            self._ready_changes[pair] = before + delta

    def _settle_ready_changes(self, *, committed: bool) -> None:
        changes, self._ready_changes = self._ready_changes, {}
        if not committed:
            return
        if self.on_keys_taken is not None and any(d is None or d < 0 for d in changes.values()):
            self.on_keys_taken()
        for pair, delta in changes.items():
            if delta is None:
                (held,) = self._db.execute(
                    "SELECT coalesce(sum(remaining), 0) FROM key_chunks WHERE master_sae=?"
                    " AND slave_sae=? AND state='ready'",
                    pair,
                ).fetchone()
                self._ready[pair] = int(held)
            else:
                self._ready[pair] = self._ready.get(pair, 0) + delta

    def ready_count(self, master_sae_id: str, slave_sae_id: str) -> int:
        return self._ready.get((master_sae_id, slave_sae_id), 0)

    def newest_ready_at(self, master_sae_id: str, slave_sae_id: str) -> float | None:
        """When the pair's newest ready key was made (Unix time), or None if none is ready."""
        # One step down the pair's index (SQLite's min/max optimisation), not a scan.
        row = self._db.execute(
            "SELECT max(created_at) FROM key_chunks WHERE master_sae=? AND slave_sae=?"
            " AND state='ready'",
            (master_sae_id, slave_sae_id),
        ).fetchone()
        return float(row[0]) if row and row[0] is not None else None

    # -- a batch's chunks -------------------------------------------------------------------

    def _insert_blocks(
        self,
        db: sqlite3.Connection,
        peer_site: str,
        batch_id: int,
        blocks: Sequence[NewKeyBlock],
        now: float,
    ) -> None:
        """Inside a transaction: a batch's blocks as pending chunks. StoreError if a key ID
        of a block is held already (IDs would no longer name one key)."""
        for block in blocks:
            row = db.execute(
                "SELECT first_index + count FROM key_chunks WHERE id_prefix=? AND first_index<=?"
                " ORDER BY first_index DESC LIMIT 1",
                (bytes(block.id_prefix), block.last_index),
            ).fetchone()
            if row is not None and int(row[0]) > block.first_index:
                raise StoreError(
                    f"keys {key_id(block.id_prefix, block.first_index)} to "
                    f"{key_id(block.id_prefix, block.last_index)} overlap keys held already"
                )
            insert_chunk_rows(
                db, seal_chunk_rows(self._sealer, peer_site, batch_id, block, "pending", now)
            )

    def _commit_chunks(self, db: sqlite3.Connection, peer_site: str, batch_id: int) -> int:
        """Inside a transaction: make a batch's chunks ready; returns how many keys."""
        made = 0
        for master, slave, remaining in db.execute(
            "UPDATE key_chunks SET state='ready' WHERE peer_site=? AND batch_id=?"
            " AND state='pending' RETURNING master_sae, slave_sae, remaining",
            (peer_site, batch_id),
        ).fetchall():
            self._ready_changed(master, slave, remaining)
            made += remaining
        return int(made)

    def _abort_chunks(self, db: sqlite3.Connection, peer_site: str, batch_id: int) -> None:
        for master, slave, state, remaining in db.execute(
            "DELETE FROM key_chunks WHERE peer_site=? AND batch_id=?"
            " RETURNING master_sae, slave_sae, state, remaining",
            (peer_site, batch_id),
        ).fetchall():
            if state == "ready":
                self._ready_changed(master, slave, -remaining)

    def _erase_chunks(
        self, db: sqlite3.Connection, where: str, params: tuple[object, ...]
    ) -> list[ErasedKey]:
        """Inside a transaction: delete the chunks ``where`` selects; their untaken keys."""
        gone: list[ErasedKey] = []
        for row in db.execute(
            f"DELETE FROM key_chunks WHERE {where} RETURNING {_CHUNK_COLUMNS}", params
        ).fetchall():
            chunk = _chunk_row(row)
            if chunk.state == "ready":
                self._ready_changed(chunk.master_sae, chunk.slave_sae, -chunk.remaining)
            gone += chunk.untaken_keys()
        return gone

    def _drop_peer_chunks(self, db: sqlite3.Connection, peer_site: str) -> list[ErasedKey]:
        return self._erase_chunks(db, "peer_site=?", (peer_site,))

    def _expire_chunks(self, db: sqlite3.Connection, created_before: float) -> list[ErasedKey]:
        """Inside a transaction: erase ready chunks made before ``created_before``, pair by
        pair along the pair index (pairs with ready keys are known without a scan)."""
        gone: list[ErasedKey] = []
        for master, slave in [pair for pair, n in self._ready.items() if n > 0]:
            gone += self._erase_chunks(
                db,
                "master_sae=? AND slave_sae=? AND state='ready' AND created_at < ?",
                (master, slave, created_before),
            )
        return gone

    # -- opening a chunk --------------------------------------------------------------------

    def _open_chunk(self, chunk: ChunkRow, sealed: bytes) -> _OpenChunk | None:
        """The chunk opened for a hand-out, or None if it does not open (or its row
        contradicts its sealed bitmap); the caller then sets it aside (``_set_chunk_aside``)."""
        if chunk.remaining != chunk.count - taken_count(chunk.taken):
            return None
        try:
            plain = self._sealer.open(chunk.aad(chunk.taken), bytes(sealed))
        except RowDoesNotOpen:
            return None
        if len(plain) != chunk.count * chunk.key_bytes:
            return None
        return _OpenChunk(chunk, bytearray(plain), bytearray(chunk.taken))

    def _set_chunk_aside(self, chunk: ChunkRow) -> None:
        # Its keys are withdrawn (keys_withdrawn): no application here gets them. Their
        # twins at the peer site may still be handed out there; an application asking for
        # one here by ID is told it is not held, never given other material.
        self._set_aside(
            Unopened("key_chunks", (chunk.seq,), chunk.name, tuple(chunk.untaken_keys()))
        )

    def _quarantine_chunk(self, db: sqlite3.Connection, row: Unopened) -> None:
        """Inside a transaction: the ready count loses what the set-aside chunk held. What
        its row says it held may be as damaged as its material, so the pair is counted
        again from the store once the quarantine commits (a rare event)."""
        found = db.execute(
            "SELECT master_sae, slave_sae FROM key_chunks WHERE seq=?", row.key
        ).fetchone()
        if found is not None:
            self._ready_changes[(str(found[0]), str(found[1]))] = None

    def _write_back(self, db: sqlite3.Connection, chunks: Iterable[_OpenChunk]) -> None:
        """Inside a transaction: seal each chunk again without the keys taken from it, or
        delete it once every key is out; then wipe the plaintext held here."""
        updates, deletes = [], []
        for chunk in chunks:
            if not chunk.out:
                chunk.wipe()
                continue
            remaining = chunk.row.remaining - chunk.out
            if chunk.row.state == "ready":
                self._ready_changed(chunk.row.master_sae, chunk.row.slave_sae, -chunk.out)
            if remaining:
                sealed = self._sealer.seal(chunk.row.aad(chunk.taken), bytes(chunk.plain))
                updates.append((bytes(chunk.taken), remaining, sealed, chunk.row.seq))
            else:
                deletes.append((chunk.row.seq,))
            chunk.wipe()
        if updates:
            db.executemany(
                "UPDATE key_chunks SET taken=?, remaining=?, material=? WHERE seq=?", updates
            )
        if deletes:
            db.executemany("DELETE FROM key_chunks WHERE seq=?", deletes)

    # -- handing keys out ---------------------------------------------------------------------

    def take_ready(self, master_sae_id: str, slave_sae_id: str, number: int) -> list[HybridKey]:
        """Hand out the ``number`` oldest ready keys of the pair and erase them (all or none).
        A chunk that does not open is withdrawn and the next one taken in its place."""
        ids, materials = self.hand_out(master_sae_id, slave_sae_id, number)
        return list(map(HybridKey, ids, materials))

    def hand_out(
        self, master_sae_id: str, slave_sae_id: str, number: int
    ) -> tuple[list[str], list[bytes]]:
        """``take_ready``, as the IDs and the materials of the keys: ([], []) when short.
        Inside ``handing_out`` it joins that block's transaction."""
        if number <= 0 or self.ready_count(master_sae_id, slave_sae_id) < number:
            return [], []
        gathered = self._gathered
        if gathered is not None:
            pair = (master_sae_id, slave_sae_id)
            oldest = gathered.oldest.get(pair)
            if oldest is not None and sum(c.row.remaining - c.out for c in oldest) >= number:
                return _take_from(oldest, number)
            oldest = gathered.oldest[pair] = []
            return self._take_oldest(
                gathered.db, gathered.opened, master_sae_id, slave_sae_id, number, oldest
            )
        opened: dict[int, _OpenChunk] = {}
        try:
            with self.transaction() as db:
                taken = self._take_oldest(db, opened, master_sae_id, slave_sae_id, number, [])
                self._write_back(db, opened.values())
        finally:
            for chunk in opened.values():
                chunk.wipe()
        return taken

    @contextlib.contextmanager
    def handing_out(self) -> Iterator[None]:
        """Hand-outs made inside the block (``hand_out``, ``take_ready``) share one
        transaction, which commits as the block ends (and undoes every one of them if the
        block raises): each chunk they take keys from is opened, sealed again and written
        once, however many of them took from it. The block must not await: nothing else
        may use the store meanwhile."""
        if self._gathered is not None:
            raise RuntimeError("hand-outs are being gathered already")
        opened: dict[int, _OpenChunk] = {}
        try:
            with self.transaction() as db:
                self._gathered = _Gathered(db, opened)
                try:
                    yield
                finally:
                    self._gathered = None
                self._write_back(db, opened.values())
        finally:
            for chunk in opened.values():
                chunk.wipe()

    def _take_oldest(
        self,
        db: sqlite3.Connection,
        opened: dict[int, _OpenChunk],
        master: str,
        slave: str,
        number: int,
        read: list[_OpenChunk],
    ) -> tuple[list[str], list[bytes]]:
        """Inside a transaction: take the ``number`` oldest ready keys of the pair (all or
        none: ([], []) when short) in memory, from chunks opened earlier in the transaction
        (``opened``) or opened now (added to it). The caller writes them back. The chunks
        read, oldest first, are appended to ``read``."""
        chosen: list[_OpenChunk] = []
        unopened: list[ChunkRow] = []
        have = 0
        cursor = db.execute(_OLDEST_READY, (master, slave))
        try:
            for *fields, sealed in cursor:
                chunk = opened.get(fields[0])
                if chunk is None:
                    row = _chunk_row(fields)
                    chunk = self._open_chunk(row, sealed)
                    if chunk is None:
                        unopened.append(row)
                        continue
                    opened[row.seq] = chunk
                read.append(chunk)
                left = chunk.row.remaining - chunk.out
                if left > 0:
                    chosen.append(chunk)
                    have += left
                    if have >= number:
                        break
        finally:
            cursor.close()  # before any write to the table it reads
        for row in unopened:
            self._set_chunk_aside(row)
        if have < number:
            return [], []  # short: nothing handed out (withdrawals still commit)
        return _take_from(chosen, number)

    def _take_agreed_in(
        self, db: sqlite3.Connection, wanted: Sequence[str], master: str, slave: str
    ) -> list[HybridKey | None]:
        """Inside a transaction: these keys of the pair (ready or pending), each erased if
        the transaction commits; None in the place of each key not held (unknown, taken,
        of another pair, asked for twice, or in a chunk that does not open). Each chunk is
        opened and sealed again once, however many of its keys are asked for."""
        found: list[HybridKey | None] = [None] * len(wanted)
        chunks: dict[int, ChunkRow] = {}
        by_chunk: dict[int, list[tuple[int, int]]] = {}  # seq -> (place in wanted, index)
        asked: set[tuple[bytes, int]] = set()
        for place, text in enumerate(wanted):
            try:
                prefix, index = split_key_id(text)
            except KeyIdError:
                continue
            if (prefix, index) in asked or key_id(prefix, index) != text:
                continue  # asked for twice, or not the canonical form of the ID
            asked.add((prefix, index))
            row = db.execute(
                f"SELECT {_CHUNK_COLUMNS} FROM key_chunks WHERE id_prefix=? AND first_index<=?"
                " ORDER BY first_index DESC LIMIT 1",
                (prefix, index),
            ).fetchone()
            if row is None:
                continue
            chunk = chunks.setdefault(int(row[0]), _chunk_row(row))
            within = index - chunk.first_index
            if (
                within >= chunk.count
                or (chunk.master_sae, chunk.slave_sae) != (master, slave)
                or is_taken(chunk.taken, within)
            ):
                continue
            by_chunk.setdefault(chunk.seq, []).append((place, within))
        opened = []
        for seq, places in by_chunk.items():
            chunk = chunks[seq]
            (sealed,) = db.execute("SELECT material FROM key_chunks WHERE seq=?", (seq,)).fetchone()
            opening = self._open_chunk(chunk, sealed)
            if opening is None:
                self._set_chunk_aside(chunk)
                continue
            opened.append(opening)
            places.sort(key=lambda item: item[1])
            materials = opening.take([within for _, within in places])
            for (place, _), material in zip(places, materials, strict=True):
                found[place] = HybridKey(wanted[place], material)
        self._write_back(db, opened)
        return found
