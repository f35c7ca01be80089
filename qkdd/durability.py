"""The daemon's durability barrier over its key store: group commit.

The daemon's store commits without an fsync (``KeyStore(..., group_commit=True)``, SQLite
WAL with synchronous=NORMAL); ``GroupCommit.durable()`` is awaited before anything outside
the process may depend on a write: an API response, bytes to the peer daemon, returning to
a QKD device driver (which then acknowledges the keys), installing a WireGuard PSK. It
fdatasyncs the store's ``-wal`` file once for every commit made so far: WAL frames are
appended in order, so one sync makes all earlier commits durable. Callers that arrive
while a sync runs wait for the next one, which covers all of them: 64 hand-outs arriving
together cost one or two fdatasyncs, not 64. When nothing was committed since the last
sync, ``durable()`` returns at once.

Why this is safe is set out in ``qkdd.keystore``: a killed process loses no commit (the
page cache keeps it), and after a power loss or OS crash a commit that was not synced has
had no effect outside, so losing it is as if it never happened.

The sync runs in a worker thread (``trio.to_thread``) so the event loop keeps serving
meanwhile; the thread only calls fdatasync on a file descriptor of its own (SQLite's
connection is never used there). When no other task is ready to run, the loop would have
nothing to do during the sync, and handing it to a thread and back only adds two wake-ups
(about 0.2 ms, as much as the sync itself on a fast disk): a lone caller's sync then runs
in the loop's own thread, as SQLite's per-commit sync did. So does the sync of a caller
that asks for it (``durable(inline=True)``: one that gathered every write ready to be made,
e.g. a block of API hand-outs, has nothing the loop could add to it meanwhile) as long as
syncs are fast (under ``INLINE_SYNC_SECONDS`` on average lately, as on any SSD).

A failed fdatasync cannot be retried safely (the kernel may have dropped the dirty pages it
failed to write), so the barrier then fails closed: every later ``durable()`` raises
``DurabilityLost``, nothing that depends on an unsynced write leaves the process, and
``watch`` ends the daemon so that SQLite recovers from what is on disk at restart.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Final

import trio

from qkdd.constants import INLINE_SYNC_SECONDS
from qkdd.keystore import KeyStore, StoreError

log = logging.getLogger("qkdd.keystore")

# Awaited before an effect outside the process that may depend on a store write.
Durable = Callable[[], Awaitable[None]]

# The weight of the latest sync in the average that INLINE_SYNC_SECONDS bounds (see above).
_RECENT_WEIGHT: Final = 0.25
# What a sync's duration is measured with (a test replaces it: a real disk's speed cannot
# be set, and a loaded machine makes any measured duration noisy).
_sync_clock = time.perf_counter


async def already_durable() -> None:
    """The barrier of a store whose every commit is durable when it returns."""


class DurabilityLost(StoreError):
    """The store's write-ahead log could not be synced: commits may not be on disk."""


class GroupCommit:
    """One fdatasync of the store's WAL for all the commits made since the last one.

    ``syncs`` counts the fdatasyncs done (what the batching saved is visible beside the
    number of commits, ``store.commits``)."""

    def __init__(self, store: KeyStore, *, inline_when_idle: bool = True) -> None:
        """``inline_when_idle``: a sync wanted while no other task is ready to run runs
        in the loop's thread (see the module docstring); False always uses a worker."""
        self._store = store
        self._inline_when_idle = inline_when_idle
        self._recent = 0.0  # seconds a sync took lately (a moving average)
        self._wal_path = f"{store.path}-wal"
        self._wal_fd: int | None = None
        self._dir_synced = False  # the WAL's directory entry, once per WAL file
        self._synced = 0  # every commit counted up to here is durable
        self._running: trio.Event | None = None  # set when the sync in progress ends
        self._lost: str | None = None
        self._lost_event: trio.Event | None = None
        self.syncs = 0

    async def durable(self, *, inline: bool = False) -> None:
        """Return once every commit made before this call is durable (DurabilityLost if
        that can no longer be assured). ``inline``: a sync this starts runs in the loop's
        thread if syncs are fast (see the module docstring)."""
        if not self._store.group_commit:
            return  # each commit synced itself
        target = self._store.commits
        while self._synced < target:
            if self._lost is not None:
                raise DurabilityLost(self._lost)
            running = self._running
            if running is None:
                await self._sync(inline and self._recent < INLINE_SYNC_SECONDS)
            else:
                # A sync in progress covers us only if it started after our commit; if not,
                # the next one does, started by whichever waiter gets there first.
                await running.wait()

    async def quiet(self) -> None:
        """Return once the sync in progress, if any, has ended: what is committed from
        then on goes into the next one, which starts only when asked for."""
        running = self._running
        if running is not None:
            await running.wait()

    async def _sync(self, inline: bool) -> None:
        done = self._running = trio.Event()
        try:
            idle = trio.lowlevel.current_statistics().tasks_runnable == 0
            if (idle or inline) and self._inline_when_idle:
                covers = self._timed_sync()  # nothing else could run, or be covered
            else:
                # Not abandoned on cancel: the thread always finishes; its outcome is kept.
                covers = await trio.to_thread.run_sync(self._timed_sync)
        except OSError as exc:
            self._fail(f"syncing key store {self._wal_path} failed: {exc}")
            raise DurabilityLost(self._lost or "") from exc
        else:
            self._synced = max(self._synced, covers)
            self.syncs += 1
        finally:
            self._running = None
            done.set()

    def _timed_sync(self) -> int:
        """``_sync_files``, counted into the recent average (one float, written by one
        sync at a time: safe from the worker thread)."""
        start = _sync_clock()
        covers = self._sync_files()
        self._recent += _RECENT_WEIGHT * (_sync_clock() - start - self._recent)
        return covers

    def _sync_files(self) -> int:
        """In the worker thread (or the loop's, see ``_sync``): fdatasync the WAL (and, the
        first time, its directory, so the WAL file itself survives a power loss); return
        the commit count it covers."""
        # Each commit is counted after its frames were written, so every commit counted
        # now is in the file the sync below flushes (reading an int: no SQLite here).
        covers = self._store.commits
        if self._wal_fd is None:
            try:
                self._wal_fd = os.open(self._wal_path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                # No WAL yet, so nothing was committed through one: whatever was written
                # is in the database file.
                self._sync_path(str(self._store.path))
                return covers
            self._dir_synced = False
        os.fdatasync(self._wal_fd)
        if os.fstat(self._wal_fd).st_nlink == 0:
            # The WAL was checkpointed (SQLite synced the database) and deleted; later
            # commits went to a new one.
            os.close(self._wal_fd)
            self._wal_fd = None
            return min(covers, self._sync_files())
        if not self._dir_synced:
            self._sync_path(os.path.dirname(self._wal_path) or ".")
            self._dir_synced = True
        return covers

    @staticmethod
    def _sync_path(path: str) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _fail(self, reason: str) -> None:
        self._lost = reason
        log.critical("event=store_sync_failed reason=%r", reason)
        if self._lost_event is not None:
            self._lost_event.set()

    async def watch(self) -> None:
        """Run beside the daemon's tasks: raise DurabilityLost (ending the daemon) once a
        sync failed, so it restarts from what is on disk instead of serving on."""
        if self._lost is None:
            self._lost_event = trio.Event()
            await self._lost_event.wait()
        raise DurabilityLost(f"{self._lost}; restart the daemon")

    def close(self) -> None:
        if self._wal_fd is not None:
            os.close(self._wal_fd)
            self._wal_fd = None
