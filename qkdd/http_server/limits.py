"""How many API connections the daemon holds open, and which one gives way when it is full.

Without I/O or clock: the listeners (`qkdd.http_server.unix_socket`, `qkdd.http_server.tls`,
the metrics listener) ask `ConnectionTable.admit` about each connection they accept and tell it
when a connection starts or stops waiting idle for a request, and when it ends.

Theory of operation. Every connection costs a file descriptor, and the daemon needs
descriptors of its own (the key store, the QKD device, the peer site, the listeners, logs).
So the API may hold at most `max_total` connections, well below the descriptor limit
(`ConnectionLimits.for_fd_limit` leaves a reserve), and one owner (a local uid, or a remote
address for TLS) at most `max_per_owner` of them, so that one application cannot shut out
the others. The operator (uid 0) and the daemon's own uid get `privileged_reserve`
connections beyond both caps, so `qkdctl status` still works while an application floods
the socket.

A new connection over a cap does not wait: the oldest *idle* connection (one waiting for a
request, with none in progress) gives way, first among the newcomer's own connections, else
among those of the owner holding the most. Closing an idle HTTP/1.1 connection is always
allowed (clients retry a request on a kept-alive connection closed under them), so a flood
of idle connections costs its owner its own oldest ones and never an answer to anyone. Only
when nothing is idle is the newcomer refused. Connections in progress are bounded by the
server's request timeout, so a refusal lasts no longer than that.
"""

from __future__ import annotations

import contextlib
import resource
from collections import Counter
from collections.abc import Collection, Hashable
from dataclasses import dataclass
from typing import Final

from qkdd.constants import (
    FD_RESERVE_FRACTION,
    FD_RESERVE_MIN,
    MAX_API_CONNECTIONS,
    MIN_API_CONNECTIONS,
    PRIVILEGED_RESERVE,
)


@dataclass(frozen=True)
class ConnectionLimits:
    max_total: int
    max_per_owner: int
    privileged_reserve: int
    # The limit on open files the caps were made for (0: not derived from one).
    fd_limit: int = 0

    @classmethod
    def for_fd_limit(cls, fd_limit: int) -> ConnectionLimits:
        """Caps that leave the daemon `FD_RESERVE_MIN` descriptors, or 1/`FD_RESERVE_FRACTION`
        of `fd_limit` if more, whatever the API's callers do. One owner may hold half."""
        reserve = max(FD_RESERVE_MIN, fd_limit // FD_RESERVE_FRACTION)
        privileged = min(PRIVILEGED_RESERVE, max(1, fd_limit // 64))
        total = min(MAX_API_CONNECTIONS, fd_limit - reserve - privileged)
        total = max(MIN_API_CONNECTIONS, total)
        return cls(
            max_total=total,
            max_per_owner=max(1, total // 2),
            privileged_reserve=privileged,
            fd_limit=fd_limit,
        )


def raise_open_file_limit() -> int:
    """Raise this process's soft limit on open files to its hard limit, where allowed; return
    the soft limit in force. (systemd sets both with LimitNOFILE=; a sandbox that forbids
    setrlimit(2) leaves the soft limit as it is.)"""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 1 << 20) if soft != resource.RLIM_INFINITY else soft
    if soft != resource.RLIM_INFINITY and soft < hard:
        with contextlib.suppress(OSError, ValueError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return MAX_API_CONNECTIONS * 4 if soft == resource.RLIM_INFINITY else soft


@dataclass(frozen=True)
class Admission:
    """What to do with a new connection: serve it or not, and which idle connection (if any)
    must be closed first to make room. The table already counts the newcomer and no longer
    counts the one evicted."""

    admitted: bool
    evict: Hashable | None = None


REFUSED: Final = Admission(False)


class ConnectionTable:
    """Open API connections by owner, and which of them sit idle (oldest first).

    Connections and owners are any hashable values (the servers use a per-connection object,
    and a uid or a remote address). A connection is busy from admission until `idle()`.
    """

    def __init__(self, limits: ConnectionLimits, privileged: Collection[Hashable] = ()) -> None:
        self.limits = limits
        self._privileged = frozenset(privileged)
        self._owner_of: dict[Hashable, Hashable] = {}
        self._open = Counter[Hashable]()
        # Per owner, its idle connections in the order they became idle (dicts keep order).
        self._idle: dict[Hashable, dict[Hashable, None]] = {}
        self.admitted = 0
        self.evicted = 0
        self.refused = 0

    @property
    def open_count(self) -> int:
        return len(self._owner_of)

    def open_of(self, owner: Hashable) -> int:
        return self._open[owner]

    def idle_count(self) -> int:
        return sum(len(conns) for conns in self._idle.values())

    def admit(self, conn: Hashable, owner: Hashable) -> Admission:
        """Admit `conn` of `owner`, making room by evicting an idle connection if a cap is
        reached, or refuse it when nothing can give way."""
        extra = self.limits.privileged_reserve if owner in self._privileged else 0
        victim: Hashable | None = None
        if self._open[owner] >= self.limits.max_per_owner + extra:
            victim = self._oldest_idle(owner)
        elif self.open_count >= self.limits.max_total + extra:
            victim = self._oldest_idle(owner)
            if victim is None:
                victim = self._oldest_idle_of_the_heaviest()
        else:
            return self._add(conn, owner, None)
        if victim is None:
            self.refused += 1
            return REFUSED
        self.release(victim)
        self.evicted += 1
        return self._add(conn, owner, victim)

    def idle(self, conn: Hashable) -> None:
        """`conn` waits for a request with none in progress: it may be evicted from now."""
        if conn in self._owner_of:
            self._idle.setdefault(self._owner_of[conn], {})[conn] = None

    def busy(self, conn: Hashable) -> None:
        """`conn` has a request in progress (or is being answered): it stays."""
        if conn not in self._owner_of:
            return
        owner = self._owner_of[conn]
        idle = self._idle.get(owner)
        if idle is not None:
            idle.pop(conn, None)
            if not idle:
                del self._idle[owner]

    def is_open(self, conn: Hashable) -> bool:
        """False once `conn` was released or evicted."""
        return conn in self._owner_of

    def release(self, conn: Hashable) -> None:
        """`conn` ended (or was evicted); releasing it again does nothing."""
        if conn not in self._owner_of:
            return
        self.busy(conn)
        owner = self._owner_of.pop(conn)
        self._open[owner] -= 1
        if not self._open[owner]:
            del self._open[owner]

    def _add(self, conn: Hashable, owner: Hashable, victim: Hashable | None) -> Admission:
        self._owner_of[conn] = owner
        self._open[owner] += 1
        self.admitted += 1
        return Admission(True, victim)

    def _oldest_idle(self, owner: Hashable) -> Hashable | None:
        idle = self._idle.get(owner)
        return next(iter(idle)) if idle else None

    def _oldest_idle_of_the_heaviest(self) -> Hashable | None:
        if not self._idle:
            return None
        heaviest = max(self._idle, key=lambda owner: self._open[owner])
        return self._oldest_idle(heaviest)
