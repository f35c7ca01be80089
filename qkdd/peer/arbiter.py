"""Which of the sessions with one peer runs the key agreement, now that both sites of a
link dial (sans-IO: no sockets, no clock, no trio). The I/O layer (``qkdd.peering``) says
when its own dial starts, reaches its handshake and ends, when a handshake completes, when
a session message arrives and when a session ends; it carries out the actions returned.

Theory of operation. Each site dials its peer while it has no session with it, so two
sessions can complete at about the same time (one dialled by each site, finishing in
either order at either end), and a peer that restarted dials while its old session still
looks alive here. Three things must hold: at a site, at most one session per peer runs the
key agreement at a time (one ``LinkAgreement`` per peer); both ends run the same session;
and a session that loses carried nothing either way (no message of the key agreement was
sent or read on it), so closing it can leave nothing half-done at either site.

1. The link master speaks first, and decides. A session is *taken up* at the master when
   the master starts its key agreement on it (its first message, STORE_ID). The slave
   sends nothing on a session until the master's first message arrives on it; it then
   takes that session up and closes every other session with the master. So both ends run
   the session the master chose, and a session the master did not choose carried nothing.
2. The master decides when a handshake completes (``master_verdict``):
   - its own dial is taken up, unless a session already runs (the dial started before
     that session came up): then it is closed unused;
   - the slave's dial, while no session runs, is taken up, unless the master's own dial is
     in its handshake: it then waits for that handshake. If that completes, the master's
     dial wins (the session dialled by the site whose ID sorts first) and the slave's is
     closed unused; if it fails, the slave's is taken up;
   - the slave's dial while a session the slave dialled runs replaces it: the slave dials
     only when it has no session, so it lost that one (it restarted, or its end broke);
   - the slave's dial while a session the master dialled runs: either the two dials
     crossed, or the slave lost the running session without the master noticing (its
     host went down). It waits. A message from the slave on the running session after
     this handshake's HELLO was answered shows the slave took the running session up after
     it dialled: the dials crossed, and this one is closed unused. If the running session
     ends first, this one is taken up at once.
3. A site dials only while it has no session with the peer (running or waiting), and
   abandons a dial still connecting once a session is taken up. A dial already in its
   handshake is left to complete and is then decided like any other (closed unused): cut
   short, it would look to the peer like a handshake that failed.

So a healthy session is never torn down by a dial that crossed it, and a peer that
restarted has its new session taken up as soon as the old one is known to be gone: at once
when the peer had dialled the old one; else when the old connection reports the peer's
close or reset, or at the latest when the agreement declares the peer silent.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final


class Origin(enum.Enum):
    """Who dialled a session, seen from this site."""

    OURS = "ours"
    PEERS = "peers"


class Verdict(enum.Enum):
    RUN = "run"  # take it up: run the key agreement on it
    WAIT = "wait"  # keep it open and unused until it is decided
    CLOSE = "close"  # close it unused


# Why a session is closed (the log line says it).
ALREADY_RUNNING: Final = "a session with the peer was already running"
MASTER_DIAL_WON: Final = "both sites dialled at once: the session the link master dialled is kept"
CROSSED: Final = "the dials crossed: the peer took up the session already running"
NEWER_TAKEN_UP: Final = "a newer session with the peer was taken up"
MASTER_CHOSE_OTHER: Final = "the link master took up another session"


def master_verdict(
    new: Origin, running: Origin | None, *, dial_in_handshake: bool, peer_spoke_since_hello: bool
) -> Verdict:
    """The link master's decision on a session whose handshake just completed.

    ``new``: who dialled it; ``running``: who dialled the session running now (None: none);
    ``dial_in_handshake``: the master's own dial is past its TCP connect and has not ended;
    ``peer_spoke_since_hello``: the slave sent a message on the running session after the
    master answered the new session's HELLO (meaningful for the slave's dials only)."""
    if new is Origin.OURS:
        return Verdict.RUN if running is None else Verdict.CLOSE
    if running is None:
        return Verdict.WAIT if dial_in_handshake else Verdict.RUN
    if running is Origin.PEERS:
        return Verdict.RUN  # the slave dialled again: it lost the running session
    return Verdict.CLOSE if peer_spoke_since_hello else Verdict.WAIT


@dataclass(frozen=True)
class Run:
    """Take the session up: run the key agreement on it (after the one running now ended)."""

    token: int


@dataclass(frozen=True)
class CloseSession:
    """CloseSession the session. ``used``: it ran the key agreement (it is being replaced)."""

    token: int
    reason: str
    used: bool = False


@dataclass(frozen=True)
class AbandonDial:
    """Give up this site's dial, still connecting: a session was taken up."""


Action = Run | CloseSession | AbandonDial


class _Dial(enum.Enum):
    IDLE = "idle"
    CONNECTING = "connecting"
    HANDSHAKING = "handshaking"


@dataclass(frozen=True)
class _WaitingSession:
    origin: Origin
    hello_mark: int


class SessionArbiter:
    """The sessions of one link at one site: which runs, which wait, which are closed.

    Sessions are named by tokens the I/O layer chooses (unique per link). Every method
    returns the actions to carry out, in order."""

    def __init__(self, is_master: bool) -> None:
        self.is_master = is_master
        self._running: tuple[int, Origin] | None = None
        self._waiting: dict[int, _WaitingSession] = {}  # in order of completion
        self._dial = _Dial.IDLE
        # A logical clock: it orders HELLOs answered against messages heard.
        self._clock = 0
        self._peer_spoke_at = 0  # the clock at the last message on the running session

    def __repr__(self) -> str:
        role = "master" if self.is_master else "slave"
        return (
            f"<SessionArbiter {role} running={self._running} waiting={list(self._waiting)} "
            f"dial={self._dial.value}>"
        )

    @property
    def running(self) -> int | None:
        return self._running[0] if self._running is not None else None

    @property
    def busy(self) -> bool:
        """A session runs or waits: this site does not dial."""
        return self._running is not None or bool(self._waiting)

    def waiting(self, token: int) -> bool:
        return token in self._waiting

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    # -- this site's dial -----------------------------------------------------------------

    def dial_started(self) -> None:
        """Our dial began (its TCP connect)."""
        self._dial = _Dial.CONNECTING

    def dial_handshaking(self) -> None:
        """Our dial connected and sent its HELLO."""
        self._dial = _Dial.HANDSHAKING

    def dial_ended(self) -> list[Action]:
        """Our dial ended without completing its handshake (it failed or was abandoned)."""
        self._dial = _Dial.IDLE
        return self._settle()

    # -- sessions -------------------------------------------------------------------------

    def hello_answered(self) -> int:
        """A peer's dial: its HELLO was accepted and is being answered. Returns the mark to
        pass to ``completed`` for that session."""
        return self._tick()

    def completed(self, token: int, origin: Origin, hello_mark: int = 0) -> list[Action]:
        """A handshake completed: the session ``token``, dialled by ``origin``."""
        if origin is Origin.OURS:
            self._dial = _Dial.IDLE
        if not self.is_master:
            self._waiting[token] = _WaitingSession(origin, hello_mark)  # for the master's word
            return []
        verdict = master_verdict(
            origin,
            self._running[1] if self._running is not None else None,
            dial_in_handshake=self._dial is _Dial.HANDSHAKING,
            peer_spoke_since_hello=self._peer_spoke_at > hello_mark,
        )
        if verdict is Verdict.RUN:
            others = MASTER_DIAL_WON if origin is Origin.OURS else NEWER_TAKEN_UP
            return self._take_up(token, origin, others)
        if verdict is Verdict.WAIT:
            self._waiting[token] = _WaitingSession(origin, hello_mark)
            return []
        return [CloseSession(token, ALREADY_RUNNING if origin is Origin.OURS else CROSSED)]

    def heard(self, token: int) -> list[Action]:
        """A session message from the peer arrived on ``token``."""
        if self._running is not None and self._running[0] == token:
            if not self.is_master:
                return []
            # The slave spoke on the running session: its dials answered before now crossed.
            self._peer_spoke_at = self._tick()
            crossed = [t for t, w in self._waiting.items() if w.hello_mark < self._peer_spoke_at]
            for other in crossed:
                del self._waiting[other]
            return [CloseSession(other, CROSSED) for other in crossed]
        if not self.is_master and token in self._waiting:
            # The master's first message: it chose this session.
            return self._take_up(token, self._waiting[token].origin, MASTER_CHOSE_OTHER)
        return []

    def ended(self, token: int) -> list[Action]:
        """The session ``token`` is closed (whatever the reason); nothing refers to it now."""
        self._waiting.pop(token, None)
        if self._running is not None and self._running[0] == token:
            self._running = None
            self._peer_spoke_at = 0
        return self._settle()

    def _settle(self) -> list[Action]:
        """At the master, with no session running and its own dial not in its handshake,
        the newest waiting session is taken up."""
        if (
            not self.is_master
            or self._running is not None
            or self._dial is _Dial.HANDSHAKING
            or not self._waiting
        ):
            return []
        token = next(reversed(self._waiting))
        return self._take_up(token, self._waiting[token].origin, NEWER_TAKEN_UP)

    def _take_up(self, token: int, origin: Origin, others: str) -> list[Action]:
        actions: list[Action] = []
        self._waiting.pop(token, None)
        if self._running is not None:
            replaced = NEWER_TAKEN_UP if self.is_master else MASTER_CHOSE_OTHER
            actions.append(CloseSession(self._running[0], replaced, used=True))
        actions += [CloseSession(other, others) for other in self._waiting]
        self._waiting.clear()
        self._running = (token, origin)
        self._peer_spoke_at = 0
        actions.append(Run(token))
        if self._dial is _Dial.CONNECTING:
            actions.append(AbandonDial())
        return actions
