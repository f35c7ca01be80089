"""The I/O of one link to a peer site: its QKD device feeding the key store, and the TCP
sessions with the peer daemon, each pumping bytes through a sans-IO ``PeerConnection`` and
a ``LinkAgreement``. Both sites of a link dial (with backoff) while they have no session
with each other; sessions the peer dials arrive through the site's peer listener, which
runs the responder handshake and hands them here. Which session runs the key agreement
when two complete at once, or when a restarted peer dials while its old session still
looks alive, is decided by ``qkdd.peer.arbiter`` (wired in ``qkdd.peer_sessions``). Each
handshake's outcome is told to an optional ``HandshakeObserver`` (the daemon's metrics).

Peer calls (``qkdd.peer.calls``) ride the same session: ``PeerLink.call`` sends one and
waits for its reply; a call from the peer is answered by the handler registered for its
kind in ``PeerLink.call_handlers``, in arrival order, before the next message is read.

Each send to the peer (handshake included) and each return to the device driver (which
then acknowledges the keys) first awaits the store's durability barrier (``durable``,
``qkdd.durability``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import trio
from qkdd_drivers.base import DeviceError, FetchByIdDevice, QkdDevice

from qkdd.config import PeerConfig, SiteConfig
from qkdd.constants import (
    DIAL_BACKOFF_FIRST,
    DIAL_BACKOFF_MAX,
    FETCH_RETRY_DELAY,
    HANDSHAKE_TIMEOUT,
    REKEY_SECONDS,
)
from qkdd.crypto import PqcBackend, SigningKey
from qkdd.durability import Durable, already_durable
from qkdd.errors import PeerError
from qkdd.keystore import KeyStore
from qkdd.link_device import StoreSink, built_device
from qkdd.link_params import LinkParameters
from qkdd.peer.agreement import BATCH_KEYS, PAD_BITS_MAX, QKD_KEY_WAIT_SECONDS, LinkAgreement
from qkdd.peer.agreement_messages import CallReply, LinkMessage, PeerCall, decode_message
from qkdd.peer.arbiter import Origin
from qkdd.peer.bootstrap import DialAuth, InitiatorAuthChoice
from qkdd.peer.calls import CallRefused, CallTable, done, refusal, reply_body
from qkdd.peer.connection import (
    MODE_PSK,
    AuthKey,
    HandshakeComplete,
    MessageReceived,
    PeerConnection,
    Role,
)
from qkdd.peer.network_messages import NetworkMessage
from qkdd.peer.peer_errors import PeerAuthenticationError, PeerProtocolError
from qkdd.peer_sessions import (
    PEER_CLOSED_UNUSED,
    RECEIVE_SIZE,
    SESSION_ERRORS,
    LinkSessions,
    PeerClosed,
    Session,
    first_error,
)
from qkdd.wakeup import Wakeup

log = logging.getLogger("qkdd.peer")


class HandshakeEvicted(PeerClosed):
    """A connection still waiting for its HELLO lost its slot to a newcomer."""


class PeerUnavailable(PeerError):
    """A peer call could not be completed: no session, or the session ended or the reply
    did not come in time (its outcome is then unknown)."""


# Answers one kind of peer call: gets the call body, returns the reply body, raises
# CallRefused to decline. It runs before the session reads its next message.
CallHandler = Callable[[bytes], Awaitable[bytes]]
# Takes a QKD-network message from the named peer; it runs before the next message is read.
NetworkHandler = Callable[[str, NetworkMessage], Awaitable[None]]


@dataclass
class _OpenCalls:
    """The calls of one session that wait for a reply: call ID -> (event, reply)."""

    table: CallTable = field(default_factory=CallTable)
    waiting: dict[int, trio.Event] = field(default_factory=dict)
    replies: dict[int, CallReply] = field(default_factory=dict)
    send: Callable[[list[LinkMessage]], Awaitable[None]] | None = None

    def close(self) -> None:
        self.send = None
        for event in self.waiting.values():
            event.set()


class PskChainLost(PeerError):
    """We share no PSK with the peer any more and a signature bootstrap is not allowed."""


# Told of each handshake: (peer site ID, mode, outcome). Mode is "bootstrap", "psk", or
# "unknown" (the peer never said who it is); outcome is "ok" (its session was taken up) or
# ``handshake_outcome``'s word. A handshake whose session was closed unused is not told.
HandshakeObserver = Callable[[str, str, str], None]


def no_observer(peer: str, mode: str, outcome: str) -> None:
    pass


def mode_name(conn: PeerConnection) -> str:
    if conn.peer_site_id is None:  # a responder before a valid HELLO
        return "unknown"
    return "psk" if conn.mode == MODE_PSK else "bootstrap"


def handshake_outcome(exc: BaseException) -> str:
    """Why a handshake failed, in one word from a fixed set (a metric label)."""
    if isinstance(exc, PeerAuthenticationError):
        return "authentication_failed"
    if isinstance(exc, trio.TooSlowError):
        return "timeout"
    if isinstance(exc, HandshakeEvicted):
        return "evicted"
    if isinstance(exc, PeerClosed):
        return "closed"
    if isinstance(exc, PeerProtocolError):
        return "protocol_error"
    return "connection_error"


class PeerLink:
    def __init__(
        self,
        config: SiteConfig,
        peer: PeerConfig,
        *,
        store: KeyStore,
        backend: PqcBackend,
        signing_key: SigningKey,
        on_handshake: HandshakeObserver = no_observer,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        durable: Durable = already_durable,
        device: QkdDevice | None = None,
    ) -> None:
        self.config = config
        self.peer = peer
        self.params = LinkParameters(
            local_site_id=config.site_id,
            peer_site_id=peer.site_id,
            local_sae_ids=config.local_sae_ids,
            remote_sae_ids=frozenset(peer.remote_sae_ids),
            key_size_bits=config.key_size,
            pool_size=peer.pool_size,
            auth_key_bits=peer.auth_key_bits,
            pad_keys=-(-peer.otp_pad_bytes // (PAD_BITS_MAX // 8)),
            # Relay pads seal relayed material hop by hop: direct links only.
            relay_pads=0 if peer.relayed else config.relay_pad_bytes // (PAD_BITS_MAX // 8),
            qkd_buffer_keys=peer.qkd_buffer_keys,
            pool_pairs=config.talking_pairs(),
        )
        # A remote link brings its own (relayed) device; a direct link's is built here.
        self.device = device or built_device(config, peer, self.params.is_master)
        # Set when the device delivered keys or keys of this site were handed out (the
        # pools may want refilling): the session's agreement runs then.
        self.store_changed = Wakeup()
        # Awaited before bytes go to the peer or keys are acknowledged to the device.
        self._durable = durable
        self.sink = StoreSink(
            store, peer.site_id, peer.qkd_buffer_keys, self.store_changed, durable=durable
        )
        self.batch_keys = BATCH_KEYS
        self._store = store
        self._backend = backend
        self._signing_key = signing_key
        self._on_handshake = on_handshake
        self._dial_auth = InitiatorAuthChoice()
        self.handshake_timeout = handshake_timeout
        # Which of the sessions with the peer runs the key agreement (qkdd.peer.arbiter).
        self.sessions = LinkSessions(self.params.is_master, self._run_agreement)
        self._calls: _OpenCalls | None = None
        self.call_handlers: dict[int, CallHandler] = {}
        # The QKD network's messages from this peer (qkdd.relay_node), if it relays.
        self.network_handler: NetworkHandler | None = None
        # Told True when a session with the peer starts running, False when none runs.
        self.session_watchers: list[Callable[[bool], None]] = []
        self.session_up = False
        self.last_error = "no session yet"
        self.sessions_established = 0

    # -- PeerTrust: what the handshake asks about this peer ---------------------------------

    def pinned_key(self, site_id: str) -> bytes | None:
        return self.peer.public_key if site_id == self.peer.site_id else None

    def bootstrap_allowed(self, site_id: str) -> bool:
        return site_id == self.peer.site_id and self._store.bootstrap_allowed(site_id)

    def auth_key(self, site_id: str, key_id: str) -> bytes | None:
        if site_id != self.peer.site_id:
            return None
        record = self._store.auth_key(site_id, key_id)
        return record.material if record else None

    def _initiator_auth_key(self) -> tuple[AuthKey | None, DialAuth]:
        """The PSK to dial with (None for a bootstrap) and the choice it came from;
        PskChainLost when neither may be used. An operator's allowance only permits a
        bootstrap (qkdd.peer.bootstrap)."""
        peer = self.peer.site_id
        record = self._store.newest_ready_auth_key(peer)
        # Only the slave: the master commits a batch first, so a key pending at the master
        # is pending or gone at the slave, never ready there (qkdd.peer.bootstrap).
        pending = None if self.params.is_master else self._store.newer_pending_auth_key(peer)
        chain = self._store.chain_established(peer)
        choice = self._dial_auth.choose(
            holds_psk=record is not None,
            chain_established=chain,
            operator_allowed=self._store.operator_allowed_bootstrap(peer),
            holds_pending_psk=pending is not None,
        )
        if choice is DialAuth.PENDING_PSK:
            assert pending is not None
            log.info("event=dial_with_pending_psk peer=%s key=%s", peer, pending.key_id)
            return AuthKey(pending.key_id, pending.material), choice
        if choice is DialAuth.NONE:
            raise PskChainLost
        if choice is DialAuth.PSK:
            assert record is not None
            return AuthKey(record.key_id, record.material), choice
        if chain:  # else first contact: no PSK chain yet
            log.warning("event=bootstrap peer=%s reason=allowed-by-operator", peer)
        return None, choice

    def why_unavailable(self) -> str | None:
        if self.device.status.state != "up":
            status = self.device.status
            return f"QKD device {self.peer.device.describe()} is {status.state}: {status.detail}"
        if not self.session_up:
            return f"no authenticated session with site {self.peer.site_id}: {self.last_error}"
        return None

    # -- peer calls ---------------------------------------------------------------------

    async def call(self, kind: int, body: bytes, *, timeout: float) -> bytes:
        """Make a peer call and return the reply body. CallRefused if the peer declined;
        PeerUnavailable if there is no session, or it ended, or no reply came in time."""
        calls = self._calls
        if calls is None or calls.send is None:
            raise PeerUnavailable(self.why_unavailable() or "no session with the peer")
        message = calls.table.call(kind, body)
        event = calls.waiting[message.call_id] = trio.Event()
        try:
            try:
                await calls.send([message])
            except _SEND_FAILURES as exc:
                raise PeerUnavailable(f"the session with site {self.peer.site_id} broke") from exc
            with trio.move_on_after(timeout):
                await event.wait()
            reply = calls.replies.pop(message.call_id, None)
        finally:
            calls.waiting.pop(message.call_id, None)
        if reply is None:
            if calls.send is None:
                raise PeerUnavailable(f"the session with site {self.peer.site_id} ended")
            raise PeerUnavailable(f"site {self.peer.site_id} did not answer in {timeout:g} s")
        return reply_body(reply)

    async def send_network(self, messages: Sequence[NetworkMessage]) -> None:
        """Send QKD-network messages on the running session (after the store's durability
        barrier, like every send). PeerUnavailable if none runs or it broke."""
        calls = self._calls
        if calls is None or calls.send is None:
            raise PeerUnavailable(self.why_unavailable() or "no session with the peer")
        try:
            await calls.send(list(messages))
        except _SEND_FAILURES as exc:
            raise PeerUnavailable(f"the session with site {self.peer.site_id} broke") from exc

    async def _answer(self, call: PeerCall) -> CallReply:
        handler = self.call_handlers.get(call.kind)
        if handler is None:
            return refusal(call, f"site {self.config.site_id} does not serve call kind {call.kind}")
        try:
            return done(call, await handler(call.body))
        except CallRefused as exc:
            log.warning(
                "event=peer_call_refused peer=%s kind=%d reason=%r",
                self.peer.site_id,
                call.kind,
                str(exc),
            )
            return refusal(call, str(exc))

    # -- dialling (both sites) --------------------------------------------------------------

    async def dial_forever(self) -> None:
        """Dial the peer whenever this site has no session with it (running or waiting to
        be decided), with backoff; each completed dial is served as a session here."""
        delay = DIAL_BACKOFF_FIRST
        while True:
            if self.sessions.busy:
                await self.sessions.until_idle()
                delay = DIAL_BACKOFF_FIRST
            else:
                try:
                    auth_key, auth_choice = self._initiator_auth_key()
                except PskChainLost:
                    # Fail closed: never fall back to signatures on our own (docs/protocol.md).
                    self.last_error = (
                        "the PSK chain with this peer is lost and a signature bootstrap is not "
                        "allowed; run `qkdd allow-bootstrap` on both sites if that is intended"
                    )
                    log.error("event=psk_chain_lost peer=%s", self.peer.site_id)
                    await trio.sleep(DIAL_BACKOFF_MAX)
                    continue
                if await self._dial_once(auth_key, auth_choice, delay):
                    delay = DIAL_BACKOFF_FIRST
            await trio.sleep(delay)
            delay = min(delay * 2, DIAL_BACKOFF_MAX)

    async def _dial_once(
        self, auth_key: AuthKey | None, auth_choice: DialAuth, retry_in: float
    ) -> bool:
        """Connect and run the initiator handshake; if it completes, serve the session until
        it is over. Returns whether the handshake completed. The attempt is abandoned,
        silently, if a session is taken up while it still connects (one the peer dialled)."""
        conn = PeerConnection(
            Role.INITIATOR,
            backend=self._backend,
            local_site_id=self.config.site_id,
            signing_key=self._signing_key,
            trust=self,
            expected_peer=self.peer.site_id,
            auth_key=auth_key,
        )
        # One deadline for connect, HELLO and the handshake: a responder that goes silent at
        # any point (even before accepting) is given up at the same time.
        deadline = trio.current_time() + self.handshake_timeout
        stream: trio.abc.Stream | None = None
        handshake: tuple[HandshakeComplete, list[MessageReceived]] | None = None
        failure: Exception | None = None
        with self.sessions.attempt():
            try:
                with trio.fail_at(deadline):
                    stream = await self.connect()
            except (OSError, trio.TooSlowError) as exc:
                if isinstance(exc, OSError):
                    reason = exc.strerror or str(exc)
                else:
                    reason = f"connect timed out after {self.handshake_timeout:g} s"
                if not self.session_up:
                    self.last_error = f"cannot reach {self.address_text()} ({reason})"
                log.debug(
                    "event=dial_failed peer=%s address=%s retry_in=%.2f",
                    self.peer.site_id,
                    self.address_text(),
                    retry_in,
                )
            else:
                self.sessions.dial_handshaking()
                try:
                    with trio.fail_at(deadline):
                        conn.initiate()
                        await self._durable()  # the PSK it proves must outlive a power cut
                        await stream.send_all(conn.data_to_send())
                        handshake = await complete_handshake(stream, conn, durable=self._durable)
                except* SESSION_ERRORS as group:
                    failure = first_error(group)
        # Nothing awaits from the handshake's completion to serve_session: the session
        # arbiter learns of it before anything else can happen on this link.
        if handshake is None:
            self.sessions.dial_failed()
            if stream is not None:
                await stream.aclose()
            if failure is not None:
                outcome = handshake_outcome(failure)
                self._on_handshake(self.peer.site_id, mode_name(conn), outcome)
                self._dial_auth.handshake_failed(auth_choice, outcome)
                self.session_failed(failure)
            elif stream is not None:
                log.debug(
                    "event=dial_abandoned peer=%s reason='a session was taken up'",
                    self.peer.site_id,
                )
            return False
        assert stream is not None
        self._dial_auth.handshake_completed()
        async with stream:
            await self.serve_session(stream, conn, *handshake, origin=Origin.OURS)
        return True

    async def connect(self) -> trio.abc.Stream:
        """A new byte stream to the peer: a TCP connection to its address. OSError if it
        cannot be reached."""
        host, port = self.peer.address
        return await trio.open_tcp_stream(host, port)

    def address_text(self) -> str:
        host, port = self.peer.address
        return f"{host}:{port}"

    def session_failed(self, exc: BaseException) -> None:
        """Our own dial, or an authenticated session, ended with ``exc``. If another
        session is up now (it replaced the one that failed), only the log says so."""
        replaced = self.sessions.arbiter.running is not None
        if isinstance(exc, PeerAuthenticationError):
            reason = f"authentication failed: {exc}"
            log.error(
                "event=peer_authentication_failed peer=%s reason=%r", self.peer.site_id, str(exc)
            )
        else:
            reason = str(exc) or type(exc).__name__
            if isinstance(exc, trio.TooSlowError):
                reason = "handshake timed out"
            log.warning(
                "event=session_ended peer=%s reason=%r%s",
                self.peer.site_id,
                reason,
                " replaced=yes" if replaced else "",
            )
        if not replaced:
            self.session_up = False
            self.last_error = reason

    def handshake_failed(self, exc: BaseException, address: str) -> None:
        """A connection from ``address`` that claimed to be this peer failed before
        authenticating. Whoever it was proved nothing, so a live session is not touched;
        with no session, the reason is kept for the status (with the address, since it may
        be anybody's)."""
        if isinstance(exc, PeerAuthenticationError):
            reason = f"authentication failed: {exc}"
            log.error(
                "event=peer_authentication_failed peer=%s address=%s reason=%r",
                self.peer.site_id,
                address,
                str(exc),
            )
        else:
            reason = str(exc) or type(exc).__name__
            log.warning(
                "event=handshake_failed peer=%s address=%s reason=%r",
                self.peer.site_id,
                address,
                reason,
            )
        if not self.session_up:
            self.last_error = f"{reason} (a connection from {address})"

    # -- sessions (both roles) --------------------------------------------------------------

    def hello_answered(self) -> int:
        """The listener accepted a HELLO from this peer and answers it now: the mark to pass
        to ``serve_session`` once that handshake completes (``qkdd.peer.arbiter``)."""
        return self.sessions.arbiter.hello_answered()

    async def serve_session(
        self,
        stream: trio.abc.Stream,
        conn: PeerConnection,
        done: HandshakeComplete,
        leftover: list[MessageReceived],
        *,
        origin: Origin,
        hello_mark: int = 0,
    ) -> None:
        """A handshake with this peer completed (our dial, or one the listener accepted).
        The session waits, unused, until ``qkdd.peer.arbiter`` decides; then it runs the key
        agreement until it breaks or is replaced, or it is closed unused. Returns when it is
        over; how it ended is logged here."""
        session = await self.sessions.serve(stream, conn, done, leftover, origin, hello_mark)
        dialled_by = self.config.site_id if origin is Origin.OURS else self.peer.site_id
        if session.taken_up:
            if session.error is not None:
                self.session_failed(session.error)
            elif session.closed is not None:
                log.info(
                    "event=session_replaced peer=%s dialled_by=%s reason=%r",
                    self.peer.site_id,
                    dialled_by,
                    session.closed.reason,
                )
            return
        error = session.error
        if error is not None and not isinstance(error, _CLOSED):
            self.session_failed(error)  # a check failed: not a session that merely lost
            return
        if session.closed is not None:
            reason = session.closed.reason
        elif isinstance(error, PeerClosed):
            reason = str(error)
        else:
            reason = f"{PEER_CLOSED_UNUSED} ({error})"
        log.info(
            "event=session_unused peer=%s dialled_by=%s auth=%s reason=%r",
            self.peer.site_id,
            dialled_by,
            _auth_name(session.done),
            reason,
        )

    async def _run_agreement(self, session: Session) -> None:
        """Run key agreement over a session taken up, until it breaks or is replaced."""
        stream, conn, done = session.stream, session.conn, session.done
        assert conn.session_id is not None
        if done.auth_key_id is not None:
            self._store.auth_key_proven(self.peer.site_id, done.auth_key_id)
        agreement = LinkAgreement(
            self.params,
            store=self._store,
            backend=self._backend,
            session_id=conn.session_id,
            batch_keys=self.batch_keys,
            # A slave whose device hands keys out by ID must be told the IDs of each run.
            list_qkd_ids=isinstance(self.device, FetchByIdDevice),
        )
        send_lock = trio.Lock()

        async def send(messages: list[LinkMessage]) -> None:
            if not messages:
                return
            # Whatever the agreement did may have used buffered QKD keys: a device held
            # back by a full buffer may go on.
            self.sink.space.set()
            for message in messages:
                conn.send_message(message.encode())
            # Take the bytes under the lock: frames carry implicit counters, so they must
            # leave in the order they were sealed, whichever task sealed them.
            async with send_lock:
                data = conn.data_to_send()
                if data:
                    # What the messages say (batches stored, keys taken) must be durable
                    # before the peer hears it.
                    await self._durable()
                    await stream.send_all(data)

        calls = _OpenCalls(send=send)

        async def handle(events: Sequence[object]) -> None:
            for event in events:
                if isinstance(event, MessageReceived):
                    agreement.heard(trio.current_time())  # any message keeps it alive
                    message = decode_message(event.payload)
                    if isinstance(message, NetworkMessage):
                        if self.network_handler is not None:
                            await self.network_handler(self.peer.site_id, message)
                    elif isinstance(message, PeerCall):
                        await send([await self._answer(message)])
                    elif isinstance(message, CallReply):
                        reply = calls.table.on_reply(message)
                        waiter = calls.waiting.get(reply.call_id)
                        if waiter is not None:  # else the caller gave up: drop it
                            calls.replies[reply.call_id] = reply
                            waiter.set()
                    else:
                        await send(agreement.on_message(message, trio.current_time()))

        fetching = False

        async def fetch(key_ids: list[str]) -> None:
            """Ask a fetch-by-ID device (an ETSI 014 KME) for the QKD keys a batch names."""
            nonlocal fetching
            assert isinstance(self.device, FetchByIdDevice)
            try:
                with trio.move_on_after(QKD_KEY_WAIT_SECONDS):
                    await self.device.fetch_keys(key_ids)
            except DeviceError as exc:
                log.warning("event=qkd_fetch_failed peer=%s reason=%r", self.peer.site_id, str(exc))
                await trio.sleep(FETCH_RETRY_DELAY)  # the KMEs may still be syncing
            finally:
                fetching = False

        async def wake_loop(nursery: trio.Nursery) -> None:
            """Run the agreement when it asked to be woken, or when the store changed."""
            nonlocal fetching
            rekey_at = trio.current_time() + REKEY_SECONDS
            while True:
                self.store_changed.arm()
                now = trio.current_time()
                if now >= rekey_at:
                    conn.update_send_key()  # rekey by time; by volume happens in send
                    rekey_at = now + REKEY_SECONDS
                if isinstance(self.device, FetchByIdDevice) and not fetching:
                    awaited = agreement.awaited_qkd_keys()
                    if awaited:
                        fetching = True
                        nursery.start_soon(fetch, awaited)
                # Raises SessionDead when the peer's reply or heartbeat is overdue.
                await send(agreement.poll(now))
                # The first of: a deadline, keys from the device, keys handed out.
                deadline = min(rekey_at, agreement.next_deadline() or math.inf)
                await self.store_changed.wait_until(deadline)

        self._calls = calls
        self.session_up = True
        self.sessions_established += 1
        for watcher in self.session_watchers:
            watcher(True)
        # A handshake counts as "ok" once its session runs; one whose session was closed
        # unused (both sites dialled at once) is only logged.
        self._on_handshake(self.peer.site_id, mode_name(conn), "ok")
        if (
            session.origin is not Origin.OURS
            and _auth_name(done) == "ml-dsa-bootstrap"
            and self._store.chain_established(self.peer.site_id)
        ):
            # The peer dialled with a bootstrap over our chain: only an operator's
            # allowance lets that in (the dialling side logs its own).
            log.warning("event=bootstrap peer=%s reason=allowed-by-operator", self.peer.site_id)
        log.info(
            "event=session_established peer=%s role=%s auth=%s dialled_by=%s",
            self.peer.site_id,
            "master" if self.params.is_master else "slave",
            _auth_name(done),
            self.config.site_id if session.origin is Origin.OURS else self.peer.site_id,
        )
        try:
            # The link master's first message takes the session up at the slave too.
            await send(agreement.start(trio.current_time()))
            await handle(session.events)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(wake_loop, nursery)
                while True:
                    data = await stream.receive_some(RECEIVE_SIZE)
                    if not data:
                        raise PeerClosed("peer closed the connection")
                    events = conn.receive_data(data)
                    if events:
                        self.sessions.heard(session)
                    await handle(events)
        finally:
            calls.close()
            if self._calls is calls:
                self._calls = None
            # Still up if the session that replaced this one was taken up already.
            self.session_up = self.sessions.arbiter.running not in (None, session.token)
            if not self.session_up:
                for watcher in self.session_watchers:
                    watcher(False)


def _auth_name(done: HandshakeComplete) -> str:
    return f"psk:{done.auth_key_id}" if done.auth_key_id else "ml-dsa-bootstrap"


# How a send on a session fails once it broke: its stream, or its connection refusing to
# seal (it failed on something it received, in the moment before the session ends).
_SEND_FAILURES = (trio.BrokenResourceError, trio.ClosedResourceError, OSError, PeerProtocolError)

# How a connection ends when the other side merely closed it (or the network cut it).
_CLOSED = (PeerClosed, trio.BrokenResourceError, trio.ClosedResourceError, OSError)


async def complete_handshake(
    stream: trio.abc.Stream,
    conn: PeerConnection,
    on_hello: Callable[[], None] | None = None,
    durable: Durable = already_durable,
) -> tuple[HandshakeComplete, list[MessageReceived]]:
    """Pump bytes until the handshake completes; return it and the session messages that
    came with it. A responder's ``on_hello`` is called once its HELLO has been accepted,
    before RESPONSE is sent. ``durable`` is awaited before each send."""
    while True:
        data = await stream.receive_some(RECEIVE_SIZE)
        if not data:
            raise PeerClosed(
                "peer closed the connection during the handshake (it refused us: see its "
                "log; a different qkdd release there is one reason)"
            )
        events = conn.receive_data(data)
        if on_hello is not None and not conn.awaiting_hello:
            on_hello()
            on_hello = None
        out = conn.data_to_send()
        if out:
            await durable()
            await stream.send_all(out)
        for index, event in enumerate(events):
            if isinstance(event, HandshakeComplete):
                return event, [e for e in events[index + 1 :] if isinstance(e, MessageReceived)]
