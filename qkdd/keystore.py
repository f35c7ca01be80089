"""The site's durable key state in SQLite: QKD keys received from devices, QKD key IDs
already consumed, hybrid keys and the batches they were agreed in. ``KeyStore`` joins
the parts that each own some of it over one database and its transactions: QKD keys
(``qkdd.qkd_buffer``), application keys (``qkdd.store.key_blocks``), assigned keys
(``qkdd.store.assigned_keys``) and one-time pads (``qkdd.store.pads``) are mixed in;
this module holds the batches, authentication keys, the PSK-chain flags and the
quarantine of rows that do not open.

Durability rules that the rest of the daemon relies on:
- A QKD key is stored before the device is told so (``store_qkd_keys`` commits first; with
  group commit the daemon's sink also waits until the commit is durable).
- A QKD key serves once: consuming it records its ID in ``qkd_consumed`` and erases its
  material in the same transaction; a device that re-sends it later is ignored. The QKD
  buffer and that memory, and how two buffers that fell out of step line up again, are
  ``qkdd.qkd_buffer``.
- A hybrid key is ``pending`` until both sites are known to hold it, then ``ready``; only
  ready keys are handed out from the pool, each exactly once, and erased in the
  transaction that hands it out (a key asked for by ID may be pending: see take_by_ids).
  Keys are held as chunks of the blocks agreement makes, never a row per key
  (``qkdd.store.key_blocks``).
- A key of another size, or for several slave SAEs, is *assigned* by the master's site
  from ready keys of the pair (``assign_keys`` at the slave's site): the slave's site
  erases those keys and holds the assigned key once per slave SAE, until each collects it.
- One-time pads (raw QKD material for one-time-pad messages, one sender -> recipient
  pair each) follow the same batch life cycle in their own table; they are never handed
  to an application as keys, and each byte is used once (``take_pads``).
- Authentication keys (PSKs for later handshakes) follow the same batch life cycle in
  their own table and never reach an application. When a newer one becomes ready the
  older ones are erased: the previous PSK is kept until the peer has proved it holds the
  next. Once one is ready the PSK chain with that peer is *established*, and a signature
  bootstrap is refused until an operator allows one (``allow_bootstrap``); the allowance
  ends when the next one is committed, or when withdrawn (``revoke_bootstrap``).

The database uses WAL and secure_delete, and is created 0600. By default a COMMIT is
durable when it returns (synchronous=FULL: SQLite fsyncs the WAL on every commit). The
daemon opens its store with ``group_commit=True`` (synchronous=NORMAL): a COMMIT then
writes its frames to the WAL without an fsync, and ``qkdd.durability.GroupCommit`` makes
them durable, one fdatasync of the WAL for every commit made so far, before anything
outside the process may depend on them (an API response, bytes to the peer, a device's
acknowledgement, a WireGuard PSK). Why that is as safe as FULL: a process killed at any
point (kill -9, a crash) loses nothing committed, since the frames are in the kernel's
page cache, which outlives the process and reaches the disk on its own; only a power loss
or an OS crash can lose a commit whose WAL was not yet synced, and no effect of such a
commit has left the process, so the site simply acts as if it never happened (keys not
handed out, keys not acknowledged to the device, which re-sends them). WAL frames are
appended in order, so syncing the WAL once makes every earlier commit durable; SQLite
still syncs the WAL before each checkpoint copies it into the database, so the database
file never holds what the WAL on disk does not. ``commits`` counts the commits (and any
write outside ``transaction()``: every such write calls ``_wrote``), so the barrier knows
when there is nothing to sync.

Key material is sealed at rest with AES-256-GCM under a key derived from the site's
key-encryption key; each sealed row's associated data is its identity (peer, key ID, SAE
pair, size), so a ciphertext moved to another row does not open (``qkdd.sealing``).
Opening a store refuses one written by a newer qkdd, checks the key-encryption key against
the store's key-check value before anything is written, and upgrades an older store
(``qkdd.store.schema``). A sealed row that does not open later is quarantined and
reported, and the store goes on as if it were not held (``_open_row``, ``_set_aside``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qkdd.qkd_buffer import QKD_BUFFER_SCHEMA, QkdBuffer
from qkdd.qkd_buffer import StoredQkdKey as StoredQkdKey
from qkdd.sealing import KEK_SIZE as KEK_SIZE
from qkdd.sealing import (
    QUARANTINE_SCHEMA,
    RowDoesNotOpen,
    Sealer,
    StoreError,
    check_key_encryption_key,
    move_to_quarantine,
    record_key_check,
)
from qkdd.sealing import WrongKeyEncryptionKey as WrongKeyEncryptionKey
from qkdd.sealing import auth_row_aad as _auth_aad
from qkdd.store.assigned_keys import ASSIGNED_KEYS_SCHEMA, AssignedKeys
from qkdd.store.assigned_keys import Assignment as Assignment
from qkdd.store.assigned_keys import compose_key as compose_key
from qkdd.store.key_blocks import KEY_BLOCKS_SCHEMA, KeyBlocks
from qkdd.store.key_blocks import NewKeyBlock as NewKeyBlock
from qkdd.store.pads import PADS_SCHEMA, OneTimePads
from qkdd.store.records import ErasedKey as ErasedKey
from qkdd.store.records import HybridKey as HybridKey
from qkdd.store.records import NewHybridKey as NewHybridKey
from qkdd.store.records import Unopened
from qkdd.store.schema import (
    check_schema_version,
    record_schema_version,
    upgrade_hybrid_rows,
)

log = logging.getLogger("qkdd.keystore")

SCHEMA = (
    QKD_BUFFER_SCHEMA
    + """
CREATE TABLE IF NOT EXISTS batches (
    peer_site TEXT NOT NULL,
    batch_id  INTEGER NOT NULL,
    state     TEXT NOT NULL CHECK (state IN ('pending', 'committed')),
    PRIMARY KEY (peer_site, batch_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS auth_keys (
    seq       INTEGER PRIMARY KEY,
    peer_site TEXT NOT NULL,
    key_id    TEXT NOT NULL UNIQUE,
    batch_id  INTEGER NOT NULL,
    material  BLOB NOT NULL,
    state     TEXT NOT NULL CHECK (state IN ('pending', 'ready'))
);
CREATE INDEX IF NOT EXISTS auth_by_batch ON auth_keys (peer_site, batch_id);
CREATE TABLE IF NOT EXISTS meta (
    name  TEXT PRIMARY KEY,
    value BLOB NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS counters (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
"""
    + KEY_BLOCKS_SCHEMA
    + ASSIGNED_KEYS_SCHEMA
    + PADS_SCHEMA
)


class _KeyMissing(Exception):
    """Internal: abort a hand-out transaction because a requested key is not held."""


@dataclass(frozen=True)
class AuthKeyRecord:
    key_id: str
    material: bytes = field(repr=False)
    ready: bool


class KeyStore(KeyBlocks, AssignedKeys, OneTimePads, QkdBuffer):
    def __init__(self, path: Path, key_encryption_key: bytes, group_commit: bool = False) -> None:
        """Open (or create) the store. ``group_commit``: commits are made durable by a
        ``qkdd.durability.GroupCommit`` barrier instead of one fsync each (the daemon)."""
        self.path = path
        # Grows with every commit and every write outside a transaction (``_wrote``).
        self.commits = 0
        self.group_commit = False  # set once WAL mode is known to be on
        self._sealer = Sealer(key_encryption_key)
        # Told (reason, keys) after keys were erased uncollected: "expired" or "withdrawn".
        self.on_erased: Callable[[str, list[ErasedKey]], None] | None = None
        self._unopened: list[Unopened] = []  # quarantined, not yet reported
        self._ready: dict[tuple[str, str], int] = {}  # counted once the store is open
        self._ready_changes: dict[tuple[str, str], int | None] = {}
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            if not path.exists():
                os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open key store {path}: {exc}") from None
        try:
            mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            # Group commit relies on WAL frames being appended in order; a file system
            # that cannot hold a WAL keeps SQLite in rollback mode, with a sync per commit.
            self.group_commit = group_commit and str(mode).lower() == "wal"
            synchronous = "NORMAL" if self.group_commit else "FULL"
            self._db.execute(f"PRAGMA synchronous={synchronous}")
            self._db.execute("PRAGMA secure_delete=ON")
            self._db.execute("PRAGMA foreign_keys=ON")
            # Before any write, schema changes included: a store of a newer qkdd is left
            # alone, and a wrong key must not seal a row.
            check_schema_version(self._db, path)
            check_key_encryption_key(self._db, self._sealer, path)
            self._db.executescript(SCHEMA + QUARANTINE_SCHEMA)
            self._wrote()
            self._upgrade_qkd_buffer()
            with self.transaction() as db:
                upgrade_hybrid_rows(db, self._sealer)
                self.store_id = record_key_check(db, self._sealer, path)
                record_schema_version(db)
            self._count_ready_keys()
        except (OSError, sqlite3.Error) as exc:
            self._db.close()
            raise StoreError(f"cannot open key store {path}: {exc}") from None
        except StoreError:
            self._db.close()
            raise

    def health_check(self) -> None:
        """Raise StoreError unless the database answers a query."""
        try:
            self._db.execute("SELECT count(*) FROM batches").fetchone()
        except sqlite3.Error as exc:
            raise StoreError(f"key store {self.path} does not answer: {exc}") from None

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self._db.close()

    @property
    def sealer(self) -> Sealer:
        return self._sealer

    def run_schema(self, script: str) -> None:
        """Create the tables of a module that keeps its own rows in this database."""
        try:
            self._db.executescript(script)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot set up tables in key store {self.path}: {exc}") from None
        finally:
            self._wrote()

    def _wrote(self) -> None:
        """A write was made outside ``transaction()`` (autocommit): count it as a commit."""
        self.commits += 1

    def query_one(self, sql: str, params: tuple[object, ...]) -> tuple[Any, ...] | None:
        """One row of a read-only query (for modules with their own tables)."""
        row = self._db.execute(sql, params).fetchone()
        return tuple(row) if row is not None else None

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction (BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any exception);
        also for modules that keep their own tables in this database (``qkdd.inbox``)."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            self._settle_ready_changes(committed=False)
            self._settle_unopened(moved=False)
            raise
        else:
            try:
                self._db.execute("COMMIT")
            except BaseException:
                self._settle_ready_changes(committed=False)
                raise
            finally:
                # Counted even if COMMIT failed: it may have written frames before failing.
                self.commits += 1
            self._settle_ready_changes(committed=True)
            self._settle_unopened(moved=True)

    # -- sealed rows that do not open ------------------------------------------------------

    def _open_row(
        self,
        table: str,
        key: tuple[str, ...],
        associated: bytes,
        sealed: bytes,
        withdrawn: ErasedKey | None = None,
    ) -> bytes | None:
        """A sealed row's material, or None if it does not open (damaged, or sealed under
        another key-encryption key): the row is then quarantined and reported, and the
        caller goes on as if it were not held. Inside a transaction the row is moved at
        once, so the rest of the transaction no longer sees it; if that transaction rolls
        back, ``transaction()`` moves it again on its own."""
        try:
            return self._sealer.open(associated, bytes(sealed))
        except RowDoesNotOpen:
            pass
        self._set_aside(Unopened(table, key, "/".join(key), (withdrawn,) if withdrawn else ()))
        return None

    def _set_aside(self, row: Unopened) -> None:
        """Quarantine a sealed row that does not open, and report it once that commits."""
        self._unopened.append(row)
        if self._db.in_transaction:
            self._quarantine(self._db, [row])
        else:
            self._settle_unopened(moved=False)

    def _quarantine(self, db: sqlite3.Connection, rows: Sequence[Unopened]) -> None:
        for row in rows:
            if row.table == "key_chunks":
                self._quarantine_chunk(db, row)  # the pool's count loses its keys
            move_to_quarantine(db, row.table, row.key, row.name)
            if row.table == "qkd_keys":
                # Used up like any consumed key: a device that re-sends it is ignored.
                self._consume_qkd_keys(db, str(row.key[0]), [str(row.key[1])])

    def _settle_unopened(self, *, moved: bool) -> None:
        """Report the rows that did not open, once their quarantine is committed (moving
        them first unless the committed transaction already did)."""
        rows, self._unopened = self._unopened, []
        if not rows:
            return
        if not moved:
            with self.transaction() as db:
                self._quarantine(db, rows)
        for row in rows:
            log.error(
                "event=row_quarantined table=%s row=%s reason=does-not-open", row.table, row.name
            )
        self._tell_erased("withdrawn", [key for row in rows for key in row.withdrawn])

    def quarantined_row_count(self) -> int:
        """Sealed rows that did not open and were set aside (``quarantined_rows``)."""
        return int(self._db.execute("SELECT count(*) FROM quarantined_rows").fetchone()[0])

    # -- batches and hybrid keys ----------------------------------------------------------

    def next_batch_id(self, peer_site: str) -> int:
        """The ID the master's next batch takes; ``add_batch`` records it as used, in the
        same transaction, so an ID is never reused (one batch is made at a time)."""
        row = self._db.execute(
            "SELECT value FROM counters WHERE name=?", (f"batch:{peer_site}",)
        ).fetchone()
        return int(row[0] if row else 0) + 1

    def add_batch(
        self,
        peer_site: str,
        batch_id: int,
        keys: Sequence[NewKeyBlock],
        consumed_qkd_ids: Iterable[str],
        auth_keys: Sequence[StoredQkdKey] = (),
        pads: Sequence[NewHybridKey] = (),
    ) -> None:
        """Store a batch's keys (blocks of application keys, authentication keys or
        one-time pads, whose master/slave SAE are sender/recipient) as pending and consume
        its QKD keys, atomically. StoreError if a block's key IDs overlap keys held."""
        now = time.time()
        with self.transaction() as db:
            db.execute("INSERT INTO batches VALUES (?, ?, 'pending')", (peer_site, batch_id))
            db.execute(
                "INSERT INTO counters VALUES (?, ?) ON CONFLICT (name) DO UPDATE"
                " SET value = max(value, excluded.value)",
                (f"batch:{peer_site}", batch_id),
            )
            self._insert_blocks(db, peer_site, batch_id, keys, now)
            db.executemany(
                "INSERT INTO auth_keys (peer_site, key_id, batch_id, material, state)"
                " VALUES (?, ?, ?, ?, 'pending')",
                [
                    (
                        peer_site,
                        k.key_id,
                        batch_id,
                        self._sealer.seal(_auth_aad(peer_site, k.key_id), k.material),
                    )
                    for k in auth_keys
                ],
            )
            self._insert_pads(db, peer_site, batch_id, pads, now)
            self._consume_qkd_keys(db, peer_site, consumed_qkd_ids)

    def commit_batch(self, peer_site: str, batch_id: int) -> bool:
        """Make a batch's keys deliverable; False if the batch is unknown.

        A committed authentication key replaces every older one of the peer and marks the
        PSK chain established (which also withdraws an operator's bootstrap allowance)."""
        with self.transaction() as db:
            cursor = db.execute(
                "UPDATE batches SET state='committed' WHERE peer_site=? AND batch_id=?",
                (peer_site, batch_id),
            )
            if cursor.rowcount:
                self._set_flag(db, f"peer-reset:{peer_site}", False)  # the buffers line up
            made = self._commit_chunks(db, peer_site, batch_id)
            if made:
                db.execute(
                    "INSERT INTO counters VALUES (?, ?) ON CONFLICT (name) DO UPDATE"
                    " SET value = value + excluded.value",
                    (f"made:{peer_site}", made),
                )
            db.execute(
                "UPDATE pad_keys SET state='ready'"
                " WHERE peer_site=? AND batch_id=? AND state='pending'",
                (peer_site, batch_id),
            )
            newest = db.execute(
                "SELECT min(seq) FROM auth_keys WHERE peer_site=? AND batch_id=?",
                (peer_site, batch_id),
            ).fetchone()[0]
            if newest is not None:
                db.execute(
                    "UPDATE auth_keys SET state='ready' WHERE peer_site=? AND batch_id=?",
                    (peer_site, batch_id),
                )
                db.execute(
                    "DELETE FROM auth_keys WHERE peer_site=? AND seq < ?", (peer_site, newest)
                )
                self._set_flag(db, f"chain:{peer_site}", True)
                self._set_flag(db, f"allow-bootstrap:{peer_site}", False)
        return cursor.rowcount > 0

    def abort_batch(self, peer_site: str, batch_id: int) -> None:
        """Erase a batch's keys; its QKD keys stay consumed (one purpose, once)."""
        with self.transaction() as db:
            self._abort_chunks(db, peer_site, batch_id)
            db.execute(
                "DELETE FROM auth_keys WHERE peer_site=? AND batch_id=?", (peer_site, batch_id)
            )
            db.execute(
                "DELETE FROM pad_keys WHERE peer_site=? AND batch_id=?", (peer_site, batch_id)
            )
            db.execute(
                "DELETE FROM batches WHERE peer_site=? AND batch_id=?", (peer_site, batch_id)
            )

    # -- the peer's store identity ------------------------------------------------------

    def check_peer_store(self, peer_site: str, peer_store_id: bytes) -> int:
        """Record the peer's store identity; if it changed, the peer lost its state, so
        every application key and batch shared with it is dropped. Returns how many keys."""
        name = f"peer-store:{peer_site}"
        with self.transaction() as db:
            row = db.execute("SELECT value FROM meta WHERE name=?", (name,)).fetchone()
            dropped = 0
            gone: list[ErasedKey] = []
            if row is not None and bytes(row[0]) != peer_store_id:
                # Until a batch commits again, the peer's buffer may lag all of ours.
                self._set_flag(db, f"peer-reset:{peer_site}", True)
                gone = self._drop_peer_chunks(db, peer_site)
                dropped = len(gone)
                db.execute("DELETE FROM pad_keys WHERE peer_site=?", (peer_site,))
                db.execute(
                    "DELETE FROM batches WHERE peer_site=? AND batch_id NOT IN "
                    "(SELECT batch_id FROM auth_keys WHERE peer_site=?)",
                    (peer_site, peer_site),
                )
            db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (name, peer_store_id))
        self._tell_erased("withdrawn", gone)
        return dropped

    # -- the PSK chain --------------------------------------------------------------------

    @staticmethod
    def _set_flag(db: sqlite3.Connection, name: str, value: bool) -> None:
        db.execute("INSERT OR REPLACE INTO counters VALUES (?, ?)", (name, int(value)))

    def _flag(self, name: str) -> bool:
        row = self._db.execute("SELECT value FROM counters WHERE name=?", (name,)).fetchone()
        return bool(row and row[0])

    def chain_established(self, peer_site: str) -> bool:
        return self._flag(f"chain:{peer_site}")

    def bootstrap_allowed(self, peer_site: str) -> bool:
        """A signature bootstrap is allowed before the first PSK, or when an operator says so."""
        return not self.chain_established(peer_site) or self.operator_allowed_bootstrap(peer_site)

    def operator_allowed_bootstrap(self, peer_site: str) -> bool:
        """An operator's allowance of a new bootstrap stands (it permits one, it does not
        ask for one: a PSK that still works is used; ``qkdd.peer.bootstrap``)."""
        return self._flag(f"allow-bootstrap:{peer_site}")

    def allow_bootstrap(self, peer_site: str) -> bool:
        """The operator's explicit consent to one new signature bootstrap with this peer,
        until the next authentication key is committed. False if it was already given."""
        return self._set_allowance(peer_site, True)

    def revoke_bootstrap(self, peer_site: str) -> bool:
        """Withdraw the operator's allowance; False if there was none."""
        return self._set_allowance(peer_site, False)

    def _set_allowance(self, peer_site: str, allowed: bool) -> bool:
        name = f"allow-bootstrap:{peer_site}"
        with self.transaction() as db:
            row = db.execute("SELECT value FROM counters WHERE name=?", (name,)).fetchone()
            changed = bool(row and row[0]) != allowed
            self._set_flag(db, name, allowed)
        return changed

    def newest_ready_auth_key(self, peer_site: str) -> AuthKeyRecord | None:
        rows = self._db.execute(
            "SELECT key_id, material FROM auth_keys WHERE peer_site=? AND state='ready'"
            " ORDER BY seq DESC",
            (peer_site,),
        ).fetchall()
        for key_id, sealed in rows:
            material = self._open_auth(peer_site, key_id, sealed)
            if material is not None:
                return AuthKeyRecord(key_id, material, True)
        return None

    def _open_auth(self, peer_site: str, key_id: str, sealed: bytes) -> bytes | None:
        # A PSK that does not open is as good as lost: the handshake goes on as without
        # it (a bootstrap only if allowed, see psk_chain_lost), never with other material.
        return self._open_row(
            "auth_keys", (peer_site, key_id), _auth_aad(peer_site, key_id), sealed
        )

    def auth_key(self, peer_site: str, key_id: str) -> AuthKeyRecord | None:
        """An authentication key we hold, ready or still pending."""
        row = self._db.execute(
            "SELECT material, state FROM auth_keys WHERE peer_site=? AND key_id=?",
            (peer_site, key_id),
        ).fetchone()
        if row is None:
            return None
        material = self._open_auth(peer_site, key_id, row[0])
        return None if material is None else AuthKeyRecord(key_id, material, row[1] == "ready")

    def auth_key_proven(self, peer_site: str, key_id: str) -> None:
        """The peer completed a handshake with this key, so it holds it as ready: commit
        the key's batch here too if our copy was still pending (its decision was lost)."""
        row = self._db.execute(
            "SELECT batch_id, state FROM auth_keys WHERE peer_site=? AND key_id=?",
            (peer_site, key_id),
        ).fetchone()
        if row is not None and row[1] == "pending":
            self.commit_batch(peer_site, int(row[0]))

    def batch_state(self, peer_site: str, batch_id: int) -> str | None:
        row = self._db.execute(
            "SELECT state FROM batches WHERE peer_site=? AND batch_id=?", (peer_site, batch_id)
        ).fetchone()
        return None if row is None else str(row[0])

    def pending_batches(self, peer_site: str) -> list[int]:
        rows = self._db.execute(
            "SELECT batch_id FROM batches WHERE peer_site=? AND state='pending' ORDER BY batch_id",
            (peer_site,),
        )
        return [int(r[0]) for r in rows]

    def forget_decided_batches(
        self, peer_site: str, *, before: int | None = None, keep: Iterable[int] = ()
    ) -> int:
        """At the link master: drop the records of committed batches the slave is known to
        have decided too, so a later RESYNC can never list them: those below ``before``
        (the slave acknowledged a later batch, sent after their decisions), or, with
        ``before`` None, all but ``keep`` (a RESYNC did not list them). Returns how many."""
        keep = list(keep)
        limit = before if before is not None else 2**63 - 1
        marks = ",".join("?" * len(keep))
        cursor = self._db.execute(
            "DELETE FROM batches WHERE peer_site=? AND state='committed' AND batch_id < ?"
            + (f" AND batch_id NOT IN ({marks})" if keep else ""),
            (peer_site, limit, *keep),
        )
        self._wrote()
        return cursor.rowcount

    def batch_count(self, peer_site: str) -> int:
        """Batch records held for the peer (pending, or committed and not yet forgotten)."""
        row = self._db.execute("SELECT count(*) FROM batches WHERE peer_site=?", (peer_site,))
        return int(row.fetchone()[0])

    def forget_committed_batches(self, peer_site: str) -> None:
        """Drop batch records whose keys are all handed out (bounded table size)."""
        self._db.execute(
            "DELETE FROM batches WHERE peer_site=? AND state='committed' AND NOT EXISTS"
            " (SELECT 1 FROM key_chunks WHERE key_chunks.peer_site=batches.peer_site"
            " AND key_chunks.batch_id=batches.batch_id)",
            (peer_site,),
        )
        self._wrote()

    def erase_expired(self, created_before: float) -> int:
        """Erase keys nobody collected in time; returns how many."""
        # RETURNING (SQLite 3.35): one pass deletes and names what went, for key events.
        with self.transaction() as db:
            gone = self._expire_chunks(db, created_before)
            gone += [
                ErasedKey(*row)
                for row in db.execute(
                    "DELETE FROM assigned_keys WHERE created_at < ?"
                    " RETURNING key_id, master_sae, slave_sae",
                    (created_before,),
                ).fetchall()
            ]
        self._tell_erased("expired", gone)
        return len(gone)

    def _tell_erased(self, reason: str, keys: list[ErasedKey]) -> None:
        if keys and self.on_erased is not None:
            self.on_erased(reason, keys)

    def hybrid_keys_made(self, peer_site: str) -> int:
        """Hybrid keys agreed with the peer and made ready here, ever (survives restarts)."""
        row = self._db.execute(
            "SELECT value FROM counters WHERE name=?", (f"made:{peer_site}",)
        ).fetchone()
        return int(row[0]) if row else 0

    def take_by_ids(
        self, master_sae_id: str, slave_sae_id: str, key_ids: Sequence[str]
    ) -> list[HybridKey] | None:
        """Hand out exactly these keys of the pair and erase them; None if any is missing.

        A key asked for by ID may still be pending here: its ID reaches an application
        only through the other site, which hands a key out only once it has committed the
        batch, so the decision on its way here can only be "commit". Serving it now means
        a lost or late BATCH_DECISION never makes an application wait."""
        if len(set(key_ids)) != len(key_ids):
            return None
        try:
            with self.transaction() as db:
                found = self._take_keys_in(db, key_ids, master_sae_id, slave_sae_id)
                keys = [key for key in found if key is not None]
                if len(keys) < len(key_ids):
                    raise _KeyMissing  # rolls back what was taken
        except _KeyMissing:
            return None
        return keys

    def take_one_in(
        self, db: sqlite3.Connection, key_id: str, master: str, slave: str
    ) -> HybridKey | None:
        """Inside ``transaction()``: open and erase one key of the pair by ID (agreed or
        assigned; ready or pending); None if it is not held. Erased only if the caller's
        transaction commits."""
        return self._take_keys_in(db, [key_id], master, slave)[0]

    def _take_keys_in(
        self, db: sqlite3.Connection, key_ids: Sequence[str], master: str, slave: str
    ) -> list[HybridKey | None]:
        """Inside a transaction: these keys of the pair, agreed or assigned, each erased if
        the transaction commits; None in the place of each one not held."""
        found = self._take_agreed_in(db, key_ids, master, slave)
        for place, key in enumerate(found):
            if key is None:
                found[place] = self._take_assigned_in(db, key_ids[place], master, slave)
        return found
