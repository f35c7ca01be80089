"""Batches in the key store (``batches``) and the peer's store identity.

Key agreement makes keys a batch at a time: application keys in blocks
(``qkdd.store.key_blocks``), authentication keys (``qkdd.store.auth_keys``) and one-time
pads (``qkdd.store.pads``). A batch is stored ``pending`` in one transaction that also
consumes the QKD keys it was made from (``add_batch``); committing it makes all its keys
ready at once (``commit_batch``), aborting it erases them while its QKD keys stay used
(``abort_batch``). The master numbers its batches per peer and never reuses a number
(``next_batch_id``, the ``batch:`` counter). Records of decided batches are dropped once
the peer cannot ask about them any more, so the table stays small.

The peer's store identity (``peer-store:`` in ``meta``) tells when the peer lost its
state: every application key, pad and batch shared with it is then dropped
(``check_peer_store``), and the ``peer-reset:`` flag stands until a batch commits again.

``KeyStore`` inherits these methods; they share its database and transactions.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Final

from qkdd.store.database import Database
from qkdd.store.key_blocks import NewKeyBlock
from qkdd.store.qkd_ids import QkdRun, StoredQkdKey
from qkdd.store.records import ErasedKey, NewHybridKey

BATCHES_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS batches (
    peer_site TEXT NOT NULL,
    batch_id  INTEGER NOT NULL,
    state     TEXT NOT NULL CHECK (state IN ('pending', 'committed')),
    PRIMARY KEY (peer_site, batch_id)
) WITHOUT ROWID;
"""


class Batches(Database):
    """Batches and the peer's store identity; mixed into ``KeyStore``."""

    if TYPE_CHECKING:
        # The parts that hold a batch's keys (``key_blocks``, ``auth_keys``, ``pads``)
        # and its QKD keys (``qkd_buffer``).
        def _insert_blocks(
            self,
            db: sqlite3.Connection,
            peer_site: str,
            batch_id: int,
            blocks: Sequence[NewKeyBlock],
            now: float,
        ) -> None: ...

        def _commit_chunks(self, db: sqlite3.Connection, peer_site: str, batch_id: int) -> int: ...

        def _abort_chunks(self, db: sqlite3.Connection, peer_site: str, batch_id: int) -> None: ...

        def _drop_peer_chunks(self, db: sqlite3.Connection, peer_site: str) -> list[ErasedKey]: ...

        def _insert_auth_keys(
            self,
            db: sqlite3.Connection,
            peer_site: str,
            batch_id: int,
            auth_keys: Sequence[StoredQkdKey],
        ) -> None: ...

        def _commit_auth_keys(
            self, db: sqlite3.Connection, peer_site: str, batch_id: int
        ) -> None: ...

        def _abort_auth_keys(
            self, db: sqlite3.Connection, peer_site: str, batch_id: int
        ) -> None: ...

        def _insert_pads(
            self,
            db: sqlite3.Connection,
            peer_site: str,
            batch_id: int,
            pads: Sequence[NewHybridKey],
            now: float,
        ) -> None: ...

        def _consume_qkd_keys(
            self, db: sqlite3.Connection, peer_site: str, key_ids: QkdRun | Iterable[str | bytes]
        ) -> None: ...

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
        consumed_qkd_ids: QkdRun | Iterable[str],
        auth_keys: Sequence[StoredQkdKey] = (),
        pads: Sequence[NewHybridKey] = (),
    ) -> None:
        """Store a batch's keys (blocks of application keys, authentication keys or
        one-time pads, whose master/slave SAE are sender/recipient) as pending and consume
        its QKD keys (a run read from the buffer, or IDs), atomically. StoreError if a
        block's key IDs overlap keys held."""
        now = time.time()
        with self.transaction() as db:
            db.execute("INSERT INTO batches VALUES (?, ?, 'pending')", (peer_site, batch_id))
            db.execute(
                "INSERT INTO counters VALUES (?, ?) ON CONFLICT (name) DO UPDATE"
                " SET value = max(value, excluded.value)",
                (f"batch:{peer_site}", batch_id),
            )
            self._insert_blocks(db, peer_site, batch_id, keys, now)
            self._insert_auth_keys(db, peer_site, batch_id, auth_keys)
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
            self._commit_auth_keys(db, peer_site, batch_id)
        return cursor.rowcount > 0

    def abort_batch(self, peer_site: str, batch_id: int) -> None:
        """Erase a batch's keys; its QKD keys stay consumed (one purpose, once)."""
        with self.transaction() as db:
            self._abort_chunks(db, peer_site, batch_id)
            self._abort_auth_keys(db, peer_site, batch_id)
            db.execute(
                "DELETE FROM pad_keys WHERE peer_site=? AND batch_id=?", (peer_site, batch_id)
            )
            db.execute(
                "DELETE FROM batches WHERE peer_site=? AND batch_id=?", (peer_site, batch_id)
            )

    def hybrid_keys_made(self, peer_site: str) -> int:
        """Hybrid keys agreed with the peer and made ready here, ever (survives restarts)."""
        row = self._db.execute(
            "SELECT value FROM counters WHERE name=?", (f"made:{peer_site}",)
        ).fetchone()
        return int(row[0]) if row else 0

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

    # -- batch records --------------------------------------------------------------------

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

    def forget_committed_batches(self, peer_site: str) -> None:
        """Drop batch records whose keys are all handed out (bounded table size)."""
        self._db.execute(
            "DELETE FROM batches WHERE peer_site=? AND state='committed' AND NOT EXISTS"
            " (SELECT 1 FROM key_chunks WHERE key_chunks.peer_site=batches.peer_site"
            " AND key_chunks.batch_id=batches.batch_id)",
            (peer_site,),
        )
        self._wrote()
