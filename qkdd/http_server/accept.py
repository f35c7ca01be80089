"""Accepting API connections without running out of file descriptors, with Trio: the accept
loop every API listener runs, and the admission of each connection into the shared
`ConnectionTable` (`qkdd.http_server.limits`, which decides; this module acts).

`accept_forever` hands each accepted connection to the transport, which asks its
`ConnectionGate` for a `ConnectionSlot`: admitted (perhaps after the oldest idle connection
was evicted: its idle wait is cancelled and it closes), or refused (the transport answers what
it can and closes it at once, without a task). When accept(2) itself fails for want of
descriptors or memory, the loop logs one warning, backs off briefly and carries on: pending
connections stay queued in the kernel meanwhile. Warnings about such lasting conditions are
throttled, with counts, so a flood cannot flood the log too.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections.abc import Callable, Hashable
from types import TracebackType
from typing import NoReturn

import trio

from qkdd.constants import ACCEPT_BACKOFF, PRESSURE_LOG_INTERVAL
from qkdd.http_server.limits import ConnectionLimits, ConnectionTable, raise_open_file_limit

__all__ = [
    "ACCEPT_CAPACITY_ERRNOS",
    "ConnectionGate",
    "ConnectionSlot",
    "accept_forever",
    "api_connection_table",
    "refuse_now",
]

log = logging.getLogger("qkdd.api")

# accept(2) errors that mean "out of resources right now", not "this listener is broken".
ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})


def api_connection_table() -> ConnectionTable:
    """The connection caps for this process: the soft limit on open files is first raised to
    the hard limit where allowed, then the caps leave the daemon its reserve of descriptors.
    The operator (uid 0) and the daemon's own uid get the privileged reserve. Share one table
    between the API's listeners: they draw on the same descriptors."""
    limits = ConnectionLimits.for_fd_limit(raise_open_file_limit())
    return ConnectionTable(limits, privileged={0, os.getuid()})


class ConnectionSlot:
    """An admitted connection's entry in the `ConnectionTable`. While the connection waits
    idle it may be evicted: that cancels the wait and the connection closes."""

    def __init__(self, table: ConnectionTable) -> None:
        self._table = table
        self._idle_wait: trio.CancelScope | None = None
        self.evicted = False

    def idle(self, timeout: float) -> _IdleWait:
        """A scope for waiting idle, at most `timeout` seconds; cancelled on eviction."""
        return _IdleWait(self, timeout)

    def evict(self) -> None:
        self.evicted = True
        if self._idle_wait is not None:
            self._idle_wait.cancel()

    def release(self) -> None:
        self._table.release(self)


class _IdleWait:
    """`ConnectionSlot.idle`: entered once per request a connection waits for."""

    __slots__ = ("_slot", "_scope")

    def __init__(self, slot: ConnectionSlot, timeout: float) -> None:
        self._slot = slot
        self._scope = trio.CancelScope(deadline=trio.current_time() + timeout)

    def __enter__(self) -> trio.CancelScope:
        scope = self._scope.__enter__()
        self._slot._idle_wait = scope
        self._slot._table.idle(self._slot)
        return scope

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool:
        slot = self._slot
        slot._idle_wait = None
        slot._table.busy(slot)
        return self._scope.__exit__(kind, value, traceback)


class ConnectionGate:
    """Admits each accepted connection into the table (evicting an idle one to make room, or
    refusing it), and logs what the caps did without flooding the log."""

    def __init__(self, table: ConnectionTable, transport: str) -> None:
        self.table = table
        self._transport = transport
        self._warning = _Throttled()
        # What this listener's newcomers met: admitted (some after an eviction), refused.
        self.admitted = 0
        self.evicted = 0
        self.refused = 0

    def admit(self, owner: Hashable, who: str) -> ConnectionSlot | None:
        """The new connection's slot, or None if it must be refused."""
        slot = ConnectionSlot(self.table)
        admission = self.table.admit(slot, owner)
        if isinstance(admission.evict, ConnectionSlot):
            admission.evict.evict()
        self.admitted += admission.admitted
        self.evicted += admission.evict is not None
        self.refused += not admission.admitted
        if admission.evict is not None or not admission.admitted:
            self._log_pressure(owner, who, "refused" if not admission.admitted else "evicted")
        return slot if admission.admitted else None

    def log_totals(self) -> None:
        """When the listener stops: what the caps did over its life, if anything."""
        if self.evicted or self.refused:
            log.info(
                "event=api_connection_totals transport=%s admitted=%d evicted=%d refused=%d",
                self._transport,
                self.admitted,
                self.evicted,
                self.refused,
            )

    def _log_pressure(self, owner: Hashable, who: str, outcome: str) -> None:
        repeats = self._warning.due(trio.current_time())
        if repeats is None:
            return
        limits = self.table.limits
        log.warning(
            "event=api_connection_limit transport=%s %s outcome=%s open=%d owner_open=%d "
            "max_total=%d max_per_owner=%d fd_limit=%d admitted=%d evicted=%d refused=%d "
            "since_last=%d hint=%r",
            self._transport,
            who,
            outcome,
            self.table.open_count,
            self.table.open_of(owner),
            limits.max_total,
            limits.max_per_owner,
            limits.fd_limit,
            self.admitted,
            self.evicted,
            self.refused,
            repeats,
            "idle connections are closed to make room, oldest first; with none idle, "
            "a newcomer is refused (503)",
        )


class _Throttled:
    """Lets a repeated warning through at once, then at most every PRESSURE_LOG_INTERVAL."""

    def __init__(self) -> None:
        self._last: float | None = None
        self._since = 0

    def due(self, now: float) -> int | None:
        """The occurrences held back since the last one logged, if this one is to be logged."""
        if self._last is not None and now - self._last < PRESSURE_LOG_INTERVAL:
            self._since += 1
            return None
        held_back, self._since, self._last = self._since, 0, now
        return held_back


async def accept_forever(
    listener: trio.SocketListener,
    on_accept: Callable[[trio.SocketStream], None],
    *,
    transport: str,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Accept connections and hand each to `on_accept` (which must not block), until
    cancelled; the listener is closed on the way out.

    When accept(2) fails for want of descriptors or memory, the pending connection stays
    queued: the failure is logged as one warning (then at most every PRESSURE_LOG_INTERVAL,
    counted), and accepting resumes after ACCEPT_BACKOFF. Any other error is raised.
    """
    warning = _Throttled()
    async with listener:
        task_status.started()
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno not in ACCEPT_CAPACITY_ERRNOS:
                    raise
                repeats = warning.due(trio.current_time())
                if repeats is not None:
                    log.warning(
                        "event=api_accept_failed transport=%s reason=%s since_last=%d "
                        "retry_in=%g hint=%r",
                        transport,
                        errno.errorcode.get(exc.errno or 0, str(exc.errno)),
                        repeats,
                        ACCEPT_BACKOFF,
                        "the daemon is out of file descriptors (or memory); raise "
                        "LimitNOFILE= or find what holds them",
                    )
                await trio.sleep(ACCEPT_BACKOFF)
                continue
            on_accept(stream)


# Sent, best effort, to a Unix-socket connection refused at the cap, before it is closed.
_REFUSAL_BODY = (
    b'{"message":"too many API connections with requests in progress; retry shortly","details":[]}'
)
_REFUSAL = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
    b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(_REFUSAL_BODY), _REFUSAL_BODY)
)


def refuse_now(stream: trio.SocketStream) -> None:
    """Answer 503 if the socket takes it at once, and close it; never waits."""
    with contextlib.suppress(OSError):
        os.write(stream.socket.fileno(), _REFUSAL)
    stream.socket.close()
