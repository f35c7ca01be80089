"""Messages received from other sites, held in the key store's database until their
recipient acknowledges them.

Rules the messaging layer relies on:
- A message is stored, and the one-time key (or pads) that protected it erased, in one
  transaction; only then does the sending site hear "stored".
- A message ID from one sender SAE is accepted once: a re-sent message (its sender never
  heard "stored") is answered "stored" again and not kept twice. IDs are remembered for
  ``REMEMBER_IDS_SECONDS`` after the message arrived.
- Messages are delivered in the order they were stored, per recipient; a message stays
  until its recipient acknowledges it, across restarts. Bodies are sealed at rest like keys.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from qkdd import labels
from qkdd.constants import REMEMBER_IDS_SECONDS
from qkdd.errors import MessagingError
from qkdd.hybrid import lp
from qkdd.keystore import KeyStore

SCHEMA = """
CREATE TABLE IF NOT EXISTS inbox (
    seq           INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id    TEXT NOT NULL,
    sender_site   TEXT NOT NULL,
    sender_sae    TEXT NOT NULL,
    recipient_sae TEXT NOT NULL,
    protection    TEXT NOT NULL,
    body          BLOB NOT NULL,
    received_at   REAL NOT NULL,
    UNIQUE (recipient_sae, message_id)
);
CREATE INDEX IF NOT EXISTS inbox_by_recipient ON inbox (recipient_sae, seq);
CREATE TABLE IF NOT EXISTS message_ids_seen (
    sender_sae TEXT NOT NULL,
    message_id TEXT NOT NULL,
    seen_at    REAL NOT NULL,
    PRIMARY KEY (sender_sae, message_id)
) WITHOUT ROWID;
"""


class InboxError(MessagingError):
    """A message cannot be accepted; the message says why (it goes back to the sender)."""


@dataclass(frozen=True)
class ReceivedMessage:
    seq: int
    message_id: str
    sender_site: str
    sender_sae: str
    recipient_sae: str
    protection: str
    received_at: float
    body: bytes = field(repr=False)


def _row_aad(message_id: str, sender_sae: str, recipient_sae: str) -> bytes:
    return (
        lp(labels.AAD_MESSAGE_ROW)
        + lp(message_id.encode())
        + lp(sender_sae.encode())
        + lp(recipient_sae.encode())
    )


class Inbox:
    def __init__(self, store: KeyStore, max_pending: int) -> None:
        self._store = store
        self._max_pending = max_pending
        store.run_schema(SCHEMA)

    def accept(
        self,
        *,
        message_id: str,
        sender_site: str,
        sender_sae: str,
        recipient_sae: str,
        protection: str,
        open_body: Callable[[sqlite3.Connection], bytes],
        now: float | None = None,
    ) -> bool:
        """Store a message: ``open_body(db)`` takes the keys that protect it inside this
        transaction and returns the body (raising InboxError if they are missing or it does
        not open); the body is stored and the keys erased, all or nothing. False if this
        message was already stored (nothing changes, ``open_body`` is not called)."""
        now = time.time() if now is None else now
        with self._store.transaction() as db:
            if self._seen(db, sender_sae, message_id):
                return False
            pending = db.execute(
                "SELECT count(*) FROM inbox WHERE recipient_sae=?", (recipient_sae,)
            ).fetchone()[0]
            if pending >= self._max_pending:
                raise InboxError(
                    f"the inbox of {recipient_sae} is full ({pending} messages not yet "
                    "acknowledged); retry once it has read some"
                )
            body = open_body(db)
            db.execute(
                "INSERT INTO inbox (message_id, sender_site, sender_sae, recipient_sae,"
                " protection, body, received_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    message_id,
                    sender_site,
                    sender_sae,
                    recipient_sae,
                    protection,
                    self._store.sealer.seal(_row_aad(message_id, sender_sae, recipient_sae), body),
                    now,
                ),
            )
            db.execute(
                "INSERT INTO message_ids_seen VALUES (?, ?, ?)", (sender_sae, message_id, now)
            )
            db.execute(
                "DELETE FROM message_ids_seen WHERE seen_at < ?", (now - REMEMBER_IDS_SECONDS,)
            )
        return True

    @staticmethod
    def _seen(db: sqlite3.Connection, sender_sae: str, message_id: str) -> bool:
        row = db.execute(
            "SELECT 1 FROM message_ids_seen WHERE sender_sae=? AND message_id=?",
            (sender_sae, message_id),
        ).fetchone()
        return row is not None

    def next_for(self, recipient_sae: str, after_seq: int = 0) -> ReceivedMessage | None:
        """The oldest unacknowledged message for the recipient stored after ``after_seq``."""
        row = self._store.query_one(
            "SELECT seq, message_id, sender_site, sender_sae, recipient_sae, protection,"
            " received_at, body FROM inbox WHERE recipient_sae=? AND seq > ? ORDER BY seq"
            " LIMIT 1",
            (recipient_sae, after_seq),
        )
        if row is None:
            return None
        seq, message_id, sender_site, sender_sae, recipient, protection, received_at, sealed = row
        body = self._store.sealer.open(_row_aad(message_id, sender_sae, recipient), bytes(sealed))
        return ReceivedMessage(
            int(seq),
            message_id,
            sender_site,
            sender_sae,
            recipient,
            protection,
            float(received_at),
            body,
        )

    def acknowledge(self, recipient_sae: str, message_id: str) -> bool:
        """Erase the recipient's message; False if it holds no such message."""
        with self._store.transaction() as db:
            cursor = db.execute(
                "DELETE FROM inbox WHERE recipient_sae=? AND message_id=?",
                (recipient_sae, message_id),
            )
        return cursor.rowcount == 1
