"""The site's durable key state in SQLite: QKD keys received from devices, QKD key IDs
already consumed, hybrid keys and the batches they were agreed in. ``KeyStore`` joins
the parts of ``qkdd.store``, each owning some of it, over one database and its
transactions:

- ``database``: the connection, ``transaction()`` and the commit count, opening the store
  (tables, key check, upgrades), the ``meta`` and ``counters`` tables and their flags, and
  the quarantine of sealed rows that do not open: the base the other parts build on;
- ``qkd_buffer`` (with ``qkd_frames`` and ``qkd_ids``): QKD keys waiting to be agreed, and
  the QKD key IDs already used;
- ``batches``: the batches keys are agreed in, from pending to committed or aborted, and
  the peer's store identity;
- ``key_blocks``: application keys as chunks of the blocks a batch makes, the pool's
  hand-outs and its ready counts;
- ``assigned_keys``: keys of other sizes or for several slave SAEs, made from whole keys;
- ``application_keys``: application keys by ID wherever held, and their expiry;
- ``pads``: one-time pads; ``auth_keys``: authentication keys, the PSK chain and the
  bootstrap allowance;
- ``records``, ``schema``: the records the parts share, the schema version and upgrades.

A part that works on another's rows (a batch stores blocks, pads and authentication keys
and consumes QKD keys) calls that part's methods, declared in the caller for type
checking. ``Database`` comes right after the parts that subclass it in the method order,
before the other parts, so the plumbing every part calls (``transaction()``,
``_open_row``, ``_set_aside``, ``_flag``) is its. This module only joins them: the class,
every part's tables (``SCHEMA``) and the names callers import from here.

Durability rules that the rest of the daemon relies on:
- A QKD key is stored before the device is told so (``store_qkd_keys`` commits first; with
  group commit the daemon's sink also waits until the commit is durable).
- A QKD key serves once: consuming it records its ID in ``qkd_consumed`` and erases its
  material in the same transaction; a device that re-sends it later is ignored. The QKD
  buffer and that memory, and how two buffers that fell out of step line up again, are
  ``qkdd.store.qkd_buffer``.
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
reported, and the store goes on as if it were not held (``qkdd.store.database``).
"""

from __future__ import annotations

from pathlib import Path

from qkdd.sealing import KEK_SIZE as KEK_SIZE
from qkdd.sealing import Sealer as Sealer
from qkdd.sealing import StoreError as StoreError
from qkdd.sealing import WrongKeyEncryptionKey as WrongKeyEncryptionKey
from qkdd.store.application_keys import ApplicationKeys
from qkdd.store.assigned_keys import ASSIGNED_KEYS_SCHEMA, AssignedKeys
from qkdd.store.assigned_keys import Assignment as Assignment
from qkdd.store.assigned_keys import compose_key as compose_key
from qkdd.store.auth_keys import AUTH_KEYS_SCHEMA, AuthKeys
from qkdd.store.auth_keys import AuthKeyRecord as AuthKeyRecord
from qkdd.store.batches import BATCHES_SCHEMA, Batches
from qkdd.store.database import DATABASE_SCHEMA
from qkdd.store.key_blocks import KEY_BLOCKS_SCHEMA, KeyBlocks
from qkdd.store.key_blocks import NewKeyBlock as NewKeyBlock
from qkdd.store.pads import PADS_SCHEMA, OneTimePads
from qkdd.store.qkd_alignment import QkdAlignment
from qkdd.store.qkd_buffer import QKD_BUFFER_SCHEMA
from qkdd.store.qkd_ids import QkdRun as QkdRun
from qkdd.store.qkd_ids import StoredQkdKey as StoredQkdKey
from qkdd.store.records import ErasedKey as ErasedKey
from qkdd.store.records import HybridKey as HybridKey
from qkdd.store.records import NewHybridKey as NewHybridKey

# Every table of the store, in the order they are created at open.
SCHEMA = (
    QKD_BUFFER_SCHEMA
    + BATCHES_SCHEMA
    + AUTH_KEYS_SCHEMA
    + DATABASE_SCHEMA
    + KEY_BLOCKS_SCHEMA
    + ASSIGNED_KEYS_SCHEMA
    + PADS_SCHEMA
)


class KeyStore(
    Batches,
    AuthKeys,
    ApplicationKeys,
    AssignedKeys,
    OneTimePads,
    QkdAlignment,
    KeyBlocks,
):
    """The key store: every part over one database (``qkdd.store.database.Database``,
    which the parts build on; ``KeyBlocks`` only declares what it uses of it, so it comes
    after it and the database's methods are the ones every part calls)."""

    _schema = SCHEMA

    def __init__(self, path: Path, key_encryption_key: bytes, group_commit: bool = False) -> None:
        """Open (or create) the store. ``group_commit``: commits are made durable by a
        ``qkdd.durability.GroupCommit`` barrier instead of one fsync each (the daemon)."""
        # The pool's ready counts (``key_blocks``): transactions while opening settle
        # their changes; counted once the store is open.
        self._ready = {}
        self._ready_changes = {}
        super().__init__(path, key_encryption_key, group_commit)
