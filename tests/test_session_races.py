"""Sessions between two real peer links over TCP (real handshakes, real SQLite stores,
peer listeners and dial loops in the test's Trio loop).

- Both sites dial each other at the same moment, round after round, with a random pause
  before every send (the durability barrier's place) so the two handshakes finish in
  every order. Each round, every session whose handshake completed is recorded with the
  messages sent and received on it: exactly one session per site is taken up, the same
  one at both ends, it agrees keys (a new authentication key commits at both sites), and
  every other session carried no message either way.
- A session replaced while its agreement is stuck in a durability barrier that cannot be
  cancelled (an fdatasync in progress): the new session's agreement starts only once the
  old one's has ended, never beside it."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import trio
import trio.testing
from link_pair import qkd_keys
from timeouts import timeout

import qkdd.peer_sessions
from qkdd.config import load_config
from qkdd.crypto.select import select_backend
from qkdd.demo import prepare_directory
from qkdd.demo_sites import SITE_A, SITE_B
from qkdd.identity import load_identity
from qkdd.keystore import KeyStore
from qkdd.peer.connection import MessageReceived, PeerConnection
from qkdd.peer_listener import serve_peers
from qkdd.peer_sessions import Session
from qkdd.peering import PeerLink

KEK = bytes(range(32))
SITES = (SITE_A.site_id, SITE_B.site_id)


class Recorder:
    """Every session created, and the session messages each connection sent and got."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sessions: list[Session] = []
        self.sent: Counter[int] = Counter()
        self.received: Counter[int] = Counter()
        recorder = self

        class Recorded(Session):
            def __init__(self, *args: object, **kwargs: object) -> None:
                super().__init__(*args, **kwargs)  # type: ignore[arg-type]
                recorder.sessions.append(self)
                recorder.received[id(self.conn)] += len(self.events)

        send_message = PeerConnection.send_message
        receive_data = PeerConnection.receive_data

        def counting_send(conn: PeerConnection, payload: bytes) -> None:
            self.sent[id(conn)] += 1
            send_message(conn, payload)

        def counting_receive(conn: PeerConnection, data: bytes | bytearray) -> list[object]:
            events = receive_data(conn, data)
            self.received[id(conn)] += sum(isinstance(e, MessageReceived) for e in events)
            return events  # type: ignore[return-value]

        monkeypatch.setattr(qkdd.peer_sessions, "Session", Recorded)
        monkeypatch.setattr(PeerConnection, "send_message", counting_send)
        monkeypatch.setattr(PeerConnection, "receive_data", counting_receive)

    def round(self, first: int) -> Iterator[tuple[str, Session]]:
        """(site, session) for the sessions created since index ``first``."""
        for session in self.sessions[first:]:
            site = SITE_A.site_id if session.done.peer_site_id == SITE_B.site_id else SITE_B.site_id
            yield site, session


def jittery(rng: random.Random) -> Callable[[], Awaitable[None]]:
    """A durability barrier that takes 0-5 ms: awaited before every send to the peer."""

    async def durable() -> None:
        await trio.sleep(rng.uniform(0, 0.005))

    return durable


async def one_round(
    tmp_path: Path, stores: dict[str, KeyStore], rng: random.Random, recorder: Recorder
) -> bool:
    """Start both sites' listeners, then both dial loops together; return once a new
    authentication key is committed at both sites. Returns whether two handshakes completed
    (the dials crossed)."""
    backend = select_backend("cryptography")
    configs = {site: load_config(tmp_path / f"{site}.toml") for site in SITES}
    links = {
        site: PeerLink(
            config,
            config.peers[0],
            store=stores[site],
            backend=backend,
            signing_key=load_identity(config.identity_key, backend),
            durable=jittery(rng),
        )
        for site, config in configs.items()
    }
    before = {
        site: stores[site].newest_ready_auth_key(configs[site].peers[0].site_id) for site in SITES
    }
    first = len(recorder.sessions)

    def rotated(site: str) -> bool:
        now = stores[site].newest_ready_auth_key(configs[site].peers[0].site_id)
        return now is not None and (before[site] is None or now.key_id != before[site].key_id)

    with trio.fail_after(timeout(60)):
        async with trio.open_nursery() as nursery:
            for site in SITES:
                await nursery.start(
                    lambda task_status, site=site: serve_peers(
                        configs[site],
                        {configs[site].peers[0].site_id: links[site]},
                        backend,
                        load_identity(configs[site].identity_key, backend),
                        task_status=task_status,
                    )
                )
            for site in rng.sample(SITES, 2):
                nursery.start_soon(links[site].dial_forever)
            while not all(rotated(site) for site in SITES):
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()

    sessions = list(recorder.round(first))
    taken = {site: [s for st, s in sessions if st == site and s.taken_up] for site in SITES}
    assert all(len(taken[site]) == 1 for site in SITES), taken
    survivor = taken[SITE_A.site_id][0].conn.session_id
    assert taken[SITE_B.site_id][0].conn.session_id == survivor
    for site, session in sessions:
        if not session.taken_up:
            assert session.conn.session_id != survivor
            assert recorder.sent[id(session.conn)] == 0, (site, session)
            assert recorder.received[id(session.conn)] == 0, (site, session)
    return len({s.conn.session_id for _, s in sessions}) > 1


@pytest.mark.parametrize("rounds", [pytest.param(20), pytest.param(150, marks=pytest.mark.slow)])
async def test_both_sites_dial_at_once_round_after_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rounds: int
) -> None:
    prepare_directory(tmp_path)
    shared = qkd_keys(4000)
    stores = {site: KeyStore(tmp_path / f"{site}.sqlite3", KEK) for site in SITES}
    for site, peer in zip(SITES, reversed(SITES), strict=True):
        stores[site].store_qkd_keys(peer, shared)
    recorder = Recorder(monkeypatch)
    rng = random.Random(11)
    crossed = 0
    try:
        for _ in range(rounds):
            crossed += await one_round(tmp_path, stores, rng, recorder)
    finally:
        for store in stores.values():
            store.close()
    # Both dials completed their handshakes in some rounds: the race was really run.
    assert crossed > 0


async def test_a_replaced_sessions_agreement_ends_before_the_next_one_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prepare_directory(tmp_path)
    backend = select_backend("cryptography")
    configs = {site: load_config(tmp_path / f"{site}.toml") for site in SITES}
    shared = qkd_keys(1000)
    stores = {site: KeyStore(tmp_path / f"{site}.sqlite3", KEK) for site in SITES}
    for site, peer in zip(SITES, reversed(SITES), strict=True):
        stores[site].store_qkd_keys(peer, shared)
    runs: list[tuple[str, int]] = []
    run_agreement = PeerLink._run_agreement

    async def recorded(link: PeerLink, session: Session) -> None:
        if link.config.site_id == SITE_B.site_id:
            runs.append(("start", session.token))
        try:
            await run_agreement(link, session)
        finally:
            if link.config.site_id == SITE_B.site_id:
                runs.append(("end", session.token))

    monkeypatch.setattr(PeerLink, "_run_agreement", recorded)
    stuck = trio.Event()  # the slave's agreement is inside its barrier
    release = trio.Event()
    block = False

    async def barrier() -> None:
        """The slave's durability barrier: when ``block`` is set, an fdatasync that
        cancellation cannot interrupt, until ``release``."""
        if block:
            stuck.set()
            with trio.CancelScope(shield=True):
                await release.wait()

    def link(site: str, durable: Callable[[], Awaitable[None]] | None = None) -> PeerLink:
        config = configs[site]
        return PeerLink(
            config,
            config.peers[0],
            store=stores[site],
            backend=backend,
            signing_key=load_identity(config.identity_key, backend),
            **({"durable": durable} if durable else {}),
        )

    slave = link(SITE_B.site_id, barrier)
    try:
        with trio.fail_after(timeout(60)):
            async with trio.open_nursery() as nursery:
                await nursery.start(
                    lambda task_status: serve_peers(
                        configs[SITE_B.site_id],
                        {SITE_A.site_id: slave},
                        backend,
                        load_identity(configs[SITE_B.site_id].identity_key, backend),
                        task_status=task_status,
                    )
                )
                try:
                    async with trio.open_nursery() as first_master:
                        first_master.start_soon(link(SITE_A.site_id).dial_forever)
                        while stores[SITE_B.site_id].newest_ready_auth_key(SITE_A.site_id) is None:
                            await trio.sleep(0.01)
                        (old,) = [token for kind, token in runs if kind == "start"]
                        first_key = stores[SITE_B.site_id].newest_ready_auth_key(SITE_A.site_id)
                        block = True
                        await stuck.wait()  # its next send (a heartbeat at the latest) got stuck
                        first_master.cancel_scope.cancel()  # the master restarts
                    nursery.start_soon(link(SITE_A.site_id).dial_forever)
                    while slave.sessions.arbiter.running in (None, old):
                        await trio.sleep(0.01)
                    new = slave.sessions.arbiter.running
                    # The master took the new session up: the old one is cancelled, but its
                    # agreement is still inside the barrier, so the new one has not started.
                    await trio.testing.wait_all_tasks_blocked()
                    assert runs == [("start", old)]
                    block = False
                    release.set()
                    while ("start", new) not in runs:
                        await trio.sleep(0.01)
                    assert runs == [("start", old), ("end", old), ("start", new)]
                    # The new session agrees keys: the next authentication key commits.
                    while stores[SITE_B.site_id].newest_ready_auth_key(SITE_A.site_id) == first_key:
                        await trio.sleep(0.01)
                finally:
                    release.set()  # a failed check must not leave a task stuck in it
                nursery.cancel_scope.cancel()
    finally:
        for store in stores.values():
            store.close()
