"""The key store's database: the SQLite connection and what every part builds on.

``Database`` opens (or creates, 0600) the file with WAL and secure_delete, synchronous
FULL or, under group commit, NORMAL (why that is as safe: ``qkdd.keystore``); refuses a
store of a newer qkdd and a wrong key-encryption key before anything is written; creates
every part's tables (``_schema``, which the class joining the parts sets) and upgrades an
older store (``qkdd.store.schema``). It owns ``transaction()`` and the count of commits
that ``qkdd.durability`` syncs by; the ``meta`` and ``counters`` tables and the flags kept
in ``counters``; the quarantine of sealed rows that do not open (``_open_row``,
``_set_aside``: moved to ``quarantined_rows`` and reported once that commits, the store
going on as if they were not held); and the report of keys erased before anyone
collected them (``on_erased``).

Some of this touches the rows of other parts (the pool's ready counts, the QKD buffer's
frames, key chunks set aside): those methods are declared below for type checking and
supplied by the parts ``qkdd.keystore.KeyStore`` joins.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Final

from qkdd.sealing import (
    QUARANTINE_SCHEMA,
    RowDoesNotOpen,
    Sealer,
    StoreError,
    check_key_encryption_key,
    move_to_quarantine,
    record_key_check,
)
from qkdd.store.records import ErasedKey, Unopened
from qkdd.store.schema import (
    check_schema_version,
    record_schema_version,
    upgrade_hybrid_rows,
)

log = logging.getLogger("qkdd.keystore")

# The database's own tables: named values (store identities, the schema version, the key
# check) and named integers (counters, and flags as 0 or 1).
DATABASE_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS meta (
    name  TEXT PRIMARY KEY,
    value BLOB NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS counters (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
"""


class Database:
    """The connection, its transactions and the quarantine of rows that do not open; the
    base of the key store's parts."""

    # Every table of the store, created at open; the class that joins the parts sets it.
    _schema: ClassVar[str] = DATABASE_SCHEMA

    if TYPE_CHECKING:
        # Supplied by the parts (``qkdd.store.key_blocks``, ``qkdd.store.qkd_buffer``).
        def _upgrade_qkd_buffer(self) -> None: ...

        def _count_ready_keys(self) -> None: ...

        def _settle_ready_changes(self, *, committed: bool) -> None: ...

        def _quarantine_chunk(self, db: sqlite3.Connection, row: Unopened) -> None: ...

        def _quarantine_frame(
            self, db: sqlite3.Connection, peer_site: str, first_seq: int
        ) -> None: ...

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
            self._db.executescript(self._schema + QUARANTINE_SCHEMA)
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
        also for modules that keep their own tables in this database (``qkdd.messaging.inbox``)."""
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

    # -- flags and counters -----------------------------------------------------------------

    @staticmethod
    def _set_flag(db: sqlite3.Connection, name: str, value: bool) -> None:
        db.execute("INSERT OR REPLACE INTO counters VALUES (?, ?)", (name, int(value)))

    def _flag(self, name: str) -> bool:
        row = self._db.execute("SELECT value FROM counters WHERE name=?", (name,)).fetchone()
        return bool(row and row[0])

    # -- keys erased uncollected --------------------------------------------------------------

    def _tell_erased(self, reason: str, keys: list[ErasedKey]) -> None:
        if keys and self.on_erased is not None:
            self.on_erased(reason, keys)

    # -- sealed rows that do not open ------------------------------------------------------

    def _open_row(
        self,
        table: str,
        key: tuple[str, ...],
        associated: bytes,
        sealed: bytes,
        withdrawn: ErasedKey | None = None,
        name: str | None = None,
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
        name = name if name is not None else "/".join(key)
        self._set_aside(Unopened(table, key, name, (withdrawn,) if withdrawn else ()))
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
            if row.table == "qkd_frames":
                # Its keys are used up, their IDs remembered: a re-sent one is ignored.
                self._quarantine_frame(db, str(row.key[0]), int(str(row.key[1])))
                continue
            if row.table == "key_chunks":
                self._quarantine_chunk(db, row)  # the pool's count loses its keys
            move_to_quarantine(db, row.table, row.key, row.name)

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
