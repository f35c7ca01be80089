"""The sessions of one link at one site, from a completed handshake to the key agreement:
the Trio side of ``qkdd.peer.arbiter``.

Each session whose handshake completed (dialled by this site or accepted by the peer
listener) is reported to the link's ``SessionArbiter`` and kept open, unused, until it
decides. Meanwhile its incoming bytes are read through its ``PeerConnection``, so its end
is noticed and, at the link slave, the master's first message takes it up. A session
taken up runs the key agreement (the link's ``run`` callback) only once the session that
ran before it has ended: one agreement per peer at a time. A session the arbiter closes is
cancelled wherever it is; one that waits longer than ``CLAIM_TIMEOUT`` is closed. The
link's dial loop asks here whether to dial (``busy``, ``until_idle``) and runs each
attempt under ``attempt()``, whose scope is cancelled when a session is taken up while
the attempt still connects.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Final

import trio

from qkdd.link_params import LinkError
from qkdd.peer.agreement import PEER_SILENCE_TIMEOUT
from qkdd.peer.arbiter import AbandonDial, Action, CloseSession, Origin, Run, SessionArbiter
from qkdd.peer.connection import HandshakeComplete, MessageReceived, PeerConnection
from qkdd.peer.peer_errors import PeerProtocolError
from qkdd.wakeup import Wakeup

RECEIVE_SIZE: Final = 64 * 1024
# A session not taken up within this long is closed: longer than the link master keeps one
# waiting (until its own handshake ends, at most 10 s, or until the running session ends,
# at the latest when the agreement declares the peer silent).
CLAIM_TIMEOUT: Final = 2 * PEER_SILENCE_TIMEOUT
# Why a session closed unused at the peer's end shows up here as an end of the connection.
PEER_CLOSED_UNUSED: Final = "the peer closed the connection before the session was taken up"


class PeerClosed(Exception):
    pass


# Everything that ends one session but must never end the daemon. They may arrive wrapped
# in an ExceptionGroup from the session's nursery, hence ``except*``.
SESSION_ERRORS = (
    PeerProtocolError,
    LinkError,
    PeerClosed,
    trio.TooSlowError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    OSError,
)


def first_error(group: BaseExceptionGroup[Exception]) -> Exception:
    """The first real error in a group, for the log line."""
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    assert isinstance(exc, Exception)
    return exc


@dataclass(eq=False)
class Session:
    """One authenticated connection with the peer, and what became of it."""

    token: int
    stream: trio.abc.Stream
    conn: PeerConnection
    done: HandshakeComplete
    origin: Origin
    # Session messages read before the key agreement started (handled first by it).
    events: list[MessageReceived]
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    decided: trio.Event = field(default_factory=trio.Event)
    taken_up: bool = False
    closed: CloseSession | None = None  # the arbiter (or the claim timeout) closed it, and why
    error: Exception | None = None  # it ended with this error


class LinkSessions:
    """The sessions with one peer at this site. ``run(session)`` runs the key agreement
    on a session taken up, until the session ends."""

    def __init__(self, is_master: bool, run: Callable[[Session], Awaitable[None]]) -> None:
        self.arbiter = SessionArbiter(is_master)
        self.changed = Wakeup()  # set whenever a session is added, decided or ended
        self._run = run
        self._sessions: dict[int, Session] = {}
        self._tokens = itertools.count(1)
        self._agreement = trio.Lock()  # held by the session running the key agreement
        self._dial_scope: trio.CancelScope | None = None

    @property
    def busy(self) -> bool:
        return self.arbiter.busy

    def running(self, session: Session) -> bool:
        return self.arbiter.running == session.token

    def apply(self, actions: Sequence[Action]) -> None:
        for action in actions:
            if isinstance(action, Run):
                session = self._sessions[action.token]
                session.taken_up = True
                session.decided.set()
            elif isinstance(action, CloseSession):
                closing = self._sessions.get(action.token)
                if closing is not None:
                    closing.closed = action
                    closing.decided.set()
                    closing.scope.cancel()
            elif isinstance(action, AbandonDial) and self._dial_scope is not None:
                self._dial_scope.cancel()
        self.changed.set()

    def heard(self, session: Session) -> None:
        """A session message from the peer arrived on ``session``."""
        self.apply(self.arbiter.heard(session.token))

    # -- this site's dial -----------------------------------------------------------------

    async def until_idle(self) -> None:
        """Return once no session with the peer runs or waits."""
        while True:
            self.changed.arm()
            if not self.busy:
                return
            await self.changed.wait()

    @contextlib.contextmanager
    def attempt(self) -> Iterator[trio.CancelScope]:
        """One dial, in a scope that is cancelled when a session is taken up before the
        dial connected (``dial_handshaking``). A dial that completed its handshake goes on
        to ``serve`` at once (the arbiter learns of the completion there); one that did not
        must call ``dial_failed``."""
        self.arbiter.dial_started()
        with trio.CancelScope() as scope:
            self._dial_scope = scope
            try:
                yield scope
            finally:
                self._dial_scope = None

    def dial_handshaking(self) -> None:
        self.arbiter.dial_handshaking()

    def dial_failed(self) -> None:
        self.apply(self.arbiter.dial_ended())

    # -- sessions -------------------------------------------------------------------------

    async def serve(
        self,
        stream: trio.abc.Stream,
        conn: PeerConnection,
        done: HandshakeComplete,
        leftover: list[MessageReceived],
        origin: Origin,
        hello_mark: int = 0,
    ) -> Session:
        """A handshake completed: keep the session until it is decided, then run the key
        agreement on it or let it go. Returns the session once it is over; its errors
        (``SESSION_ERRORS``) are in ``session.error``, not raised."""
        session = Session(next(self._tokens), stream, conn, done, origin, list(leftover))
        self._sessions[session.token] = session
        try:
            with session.scope:
                # Nothing awaits between the handshake and this: the arbiter learns of the
                # completion before anything else can happen on this link.
                self.apply(self.arbiter.completed(session.token, origin, hello_mark))
                if not session.decided.is_set():
                    await self._wait(session)
                if session.taken_up and session.closed is None:
                    async with self._agreement:  # the previous session's agreement ended
                        await self._run(session)
        except* SESSION_ERRORS as group:
            session.error = first_error(group)
        finally:
            del self._sessions[session.token]
            self.apply(self.arbiter.ended(session.token))
        return session

    async def _wait(self, session: Session) -> None:
        """Keep a session open and unused until it is decided, reading what arrives."""
        with trio.move_on_after(CLAIM_TIMEOUT) as claim:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read_waiting, session)
                await session.decided.wait()
                nursery.cancel_scope.cancel()
        if claim.cancelled_caught:
            session.closed = CloseSession(
                session.token, f"not taken up within {CLAIM_TIMEOUT:g} s of its handshake"
            )

    async def _read_waiting(self, session: Session) -> None:
        while True:
            data = await session.stream.receive_some(RECEIVE_SIZE)
            if not data:
                raise PeerClosed(PEER_CLOSED_UNUSED)
            messages = [
                e for e in session.conn.receive_data(data) if isinstance(e, MessageReceived)
            ]
            if messages:
                session.events += messages
                self.heard(session)
