"""Authentication keys in the key store (``auth_keys``) and the PSK-chain flags.

Authentication keys are PSKs for later handshakes with the peer. They follow the batch
life cycle (pending, then ready once the batch commits; erased with an aborted batch) in
their own table, sealed, and never reach an application. When a newer one becomes ready
the older ones of the peer are erased: the previous PSK is kept until the peer has proved
it holds the next (``auth_key_proven``). Once one is ready the PSK chain with that peer is
*established* (the ``chain:`` flag), and a signature bootstrap is refused until an
operator allows one (``allow_bootstrap``, the ``allow-bootstrap:`` flag); the allowance
ends when the next one is committed, or when withdrawn (``revoke_bootstrap``).

``KeyStore`` inherits these methods; they share its database and transactions.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from qkdd.sealing import auth_row_aad as _auth_aad
from qkdd.store.database import Database
from qkdd.store.qkd_ids import StoredQkdKey

AUTH_KEYS_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS auth_keys (
    seq       INTEGER PRIMARY KEY,
    peer_site TEXT NOT NULL,
    key_id    TEXT NOT NULL UNIQUE,
    batch_id  INTEGER NOT NULL,
    material  BLOB NOT NULL,
    state     TEXT NOT NULL CHECK (state IN ('pending', 'ready'))
);
CREATE INDEX IF NOT EXISTS auth_by_batch ON auth_keys (peer_site, batch_id);
"""


@dataclass(frozen=True)
class AuthKeyRecord:
    key_id: str
    material: bytes = field(repr=False)
    ready: bool


class AuthKeys(Database):
    """Authentication keys and the PSK chain; mixed into ``KeyStore``."""

    if TYPE_CHECKING:
        # ``qkdd.store.batches``.
        def commit_batch(self, peer_site: str, batch_id: int) -> bool: ...

    # -- in a batch's transactions ------------------------------------------------------------

    def _insert_auth_keys(
        self,
        db: sqlite3.Connection,
        peer_site: str,
        batch_id: int,
        auth_keys: Sequence[StoredQkdKey],
    ) -> None:
        """Inside a transaction: a batch's authentication keys, pending."""
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

    def _commit_auth_keys(self, db: sqlite3.Connection, peer_site: str, batch_id: int) -> None:
        """Inside a transaction: a committed authentication key replaces every older one of
        the peer and marks the PSK chain established (which also withdraws an operator's
        bootstrap allowance)."""
        newest = db.execute(
            "SELECT min(seq) FROM auth_keys WHERE peer_site=? AND batch_id=?",
            (peer_site, batch_id),
        ).fetchone()[0]
        if newest is not None:
            db.execute(
                "UPDATE auth_keys SET state='ready' WHERE peer_site=? AND batch_id=?",
                (peer_site, batch_id),
            )
            db.execute("DELETE FROM auth_keys WHERE peer_site=? AND seq < ?", (peer_site, newest))
            self._set_flag(db, f"chain:{peer_site}", True)
            self._set_flag(db, f"allow-bootstrap:{peer_site}", False)

    def _abort_auth_keys(self, db: sqlite3.Connection, peer_site: str, batch_id: int) -> None:
        """Inside a transaction: erase an aborted batch's authentication keys."""
        db.execute("DELETE FROM auth_keys WHERE peer_site=? AND batch_id=?", (peer_site, batch_id))

    # -- the PSK chain --------------------------------------------------------------------

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

    # -- the keys -------------------------------------------------------------------------

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

    def newer_pending_auth_key(self, peer_site: str) -> AuthKeyRecord | None:
        """The newest authentication key if it is still pending here, newer than every
        ready one: the peer may already hold it ready (``qkdd.peer.bootstrap``)."""
        row = self._db.execute(
            "SELECT key_id, material, state FROM auth_keys WHERE peer_site=?"
            " ORDER BY seq DESC LIMIT 1",
            (peer_site,),
        ).fetchone()
        if row is None or row[2] != "pending":
            return None
        material = self._open_auth(peer_site, row[0], row[1])
        return None if material is None else AuthKeyRecord(row[0], material, False)

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
