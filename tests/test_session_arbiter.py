"""Which session with a peer runs the key agreement when both sites dial
(``qkdd.peer.arbiter``, sans-IO): the master's rule as a table, the arbiter's answers to the
races one by one, and both ends driven together over a simulated network (random delays,
TCP order per direction, the real dial backoff, restarts with and without the kernel's
FIN) for many seeds: at every moment a site runs at most one session, the slave never
speaks on a session before the master has, a session the master never took up carried
nothing either way, and once things settle both ends run the same single session."""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from qkdd.peer.agreement import PEER_SILENCE_TIMEOUT
from qkdd.peer.arbiter import (
    CROSSED,
    MASTER_CHOSE_OTHER,
    MASTER_DIAL_WON,
    AbandonDial,
    Action,
    CloseSession,
    Origin,
    Run,
    SessionArbiter,
    Verdict,
    master_verdict,
)
from qkdd.peer.horizon import HEARTBEAT_INTERVAL
from qkdd.peer_sessions import CLAIM_TIMEOUT
from qkdd.peering import DIAL_BACKOFF_FIRST, DIAL_BACKOFF_MAX

OURS, PEERS = Origin.OURS, Origin.PEERS
RUN, WAIT, CLOSE = Verdict.RUN, Verdict.WAIT, Verdict.CLOSE


# -- the master's rule ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("new", "running", "dialling", "spoke", "verdict"),
    [
        # Its own dial: taken up unless a session already runs.
        (OURS, None, False, False, RUN),
        (OURS, OURS, False, False, CLOSE),
        (OURS, PEERS, False, False, CLOSE),
        # The slave's dial with nothing running: waits only for the master's own handshake.
        (PEERS, None, False, False, RUN),
        (PEERS, None, True, False, WAIT),
        # The slave dialled again while its own session runs: it lost that one.
        (PEERS, PEERS, False, False, RUN),
        (PEERS, PEERS, False, True, RUN),
        # While the master's dial runs: closed once the slave shows it took that one up.
        (PEERS, OURS, False, False, WAIT),
        (PEERS, OURS, False, True, CLOSE),
    ],
)
def test_master_verdict(
    new: Origin, running: Origin | None, dialling: bool, spoke: bool, verdict: Verdict
) -> None:
    assert (
        master_verdict(new, running, dial_in_handshake=dialling, peer_spoke_since_hello=spoke)
        is verdict
    )


# -- the arbiter, race by race ----------------------------------------------------------------


def runs(actions: list[Action]) -> list[int]:
    return [a.token for a in actions if isinstance(a, Run)]


def closes(actions: list[Action]) -> dict[int, str]:
    return {a.token: a.reason for a in actions if isinstance(a, CloseSession)}


def test_both_handshakes_complete_the_masters_dial_wins_at_both_ends_in_either_order() -> None:
    # Session 1 was dialled by the master, session 2 by the slave.
    for master_sees_first in (1, 2):
        for slave_sees_first in (1, 2):
            master, slave = SessionArbiter(True), SessionArbiter(False)
            master.dial_started()
            master.dial_handshaking()
            slave.dial_started()
            slave.dial_handshaking()
            mark = master.hello_answered()  # the slave's HELLO, answered
            words: list[int] = []  # sessions the master spoke on
            for token in (master_sees_first, 3 - master_sees_first):
                origin = OURS if token == 1 else PEERS
                actions = master.completed(token, origin, mark)
                words += runs(actions)
            assert words == [1] and master.running == 1
            assert not master.busy or master.running == 1
            for token in (slave_sees_first, 3 - slave_sees_first):
                assert slave.completed(token, OURS if token == 2 else PEERS) == []
            # The slave takes up the session the master spoke on, and closes the other.
            actions = slave.heard(1)
            assert runs(actions) == [1] and closes(actions) == {2: MASTER_CHOSE_OTHER}
            assert AbandonDial() not in actions  # its dial had completed


def test_the_slaves_dial_waits_for_the_masters_handshake_and_runs_if_that_fails() -> None:
    master = SessionArbiter(True)
    master.dial_started()
    assert master.completed(2, PEERS, master.hello_answered()) == [Run(2), AbandonDial()]
    master = SessionArbiter(True)
    master.dial_started()
    master.dial_handshaking()
    assert master.completed(2, PEERS, master.hello_answered()) == []
    assert master.dial_ended() == [Run(2)]


def test_the_masters_dial_wins_over_a_waiting_slave_dial() -> None:
    master = SessionArbiter(True)
    master.dial_started()
    master.dial_handshaking()
    master.completed(2, PEERS, master.hello_answered())
    assert master.completed(1, OURS) == [CloseSession(2, MASTER_DIAL_WON), Run(1)]


def test_a_crossing_slave_dial_never_tears_down_the_running_session() -> None:
    master = SessionArbiter(True)
    master.dial_started()
    master.dial_handshaking()
    mark = master.hello_answered()  # the slave's HELLO was answered first...
    assert master.completed(1, OURS) == [Run(1)]  # ...the master's own dial completed
    master.heard(1)  # the slave took session 1 up, after its own dial's RESPONSE
    assert master.completed(2, PEERS, mark) == [CloseSession(2, CROSSED)]
    assert master.running == 1
    # Heard only later: the waiting session is closed then.
    master = SessionArbiter(True)
    master.completed(1, OURS)
    mark = master.hello_answered()
    assert master.completed(2, PEERS, mark) == []
    assert master.heard(1) == [CloseSession(2, CROSSED)]
    assert master.running == 1 and not master.waiting(2)


def test_a_restarted_slaves_dial_runs_once_the_old_session_is_gone() -> None:
    master = SessionArbiter(True)
    master.completed(1, OURS)
    master.heard(1)  # the old session was alive, before the restart
    mark = master.hello_answered()
    assert master.completed(2, PEERS, mark) == []  # the old one still looks alive
    assert master.ended(1) == [Run(2)]
    # A session the slave dialled is replaced at once by its next dial.
    assert master.completed(3, PEERS, master.hello_answered()) == [
        CloseSession(2, "a newer session with the peer was taken up", used=True),
        Run(3),
    ]


def test_a_dial_already_in_its_handshake_is_left_to_complete() -> None:
    # Cut short, it would look to the peer like a failed handshake; it is decided instead.
    slave = SessionArbiter(False)
    slave.dial_started()
    slave.dial_handshaking()
    slave.completed(5, PEERS)
    assert slave.heard(5) == [Run(5)]
    assert slave.completed(6, OURS) == []  # it waits, unused, for the master's decision
    assert slave.ended(6) == [] and slave.running == 5


def test_the_slave_follows_the_master_and_never_speaks_first() -> None:
    slave = SessionArbiter(False)
    slave.dial_started()
    assert slave.completed(5, PEERS) == []
    assert slave.busy and slave.running is None
    assert slave.heard(5) == [Run(5), AbandonDial()]
    assert slave.dial_ended() == []  # the I/O abandoned its dial
    # A restarted master's new session replaces the running one when the master speaks.
    assert slave.completed(6, PEERS) == []
    assert slave.heard(5) == []
    assert slave.heard(6) == [CloseSession(5, MASTER_CHOSE_OTHER, used=True), Run(6)]


# -- both ends over a simulated network ----------------------------------------------------

HANDSHAKE_TIMEOUT = 10.0


@dataclass
class Conn:
    id: int
    dialler: str
    epochs: dict[str, int] = field(default_factory=dict)  # each end's daemon incarnation
    mark: int = 0
    words: dict[str, int] = field(default_factory=dict)  # session messages sent, per site
    last: dict[str, float] = field(default_factory=dict)  # last delivery, per sender


@dataclass
class SimSite:
    name: str
    is_master: bool
    arbiter: SessionArbiter
    up: bool = True
    epoch: int = 0
    attempt: Conn | None = None
    dial_at: float | None = None
    backoff: float = DIAL_BACKOFF_FIRST
    known: dict[int, str] = field(default_factory=dict)  # conn: handshake|waiting|running|closed
    heard_at: dict[int, float] = field(default_factory=dict)
    taken_up: set[int] = field(default_factory=set)


class Simulation:
    """Two sites with their arbiters and dial loops (the real backoff), connections whose
    messages take 1-300 ms and keep their order per direction. A handshake is SYN, SYN-ACK,
    HELLO, RESPONSE, FINISH; a session message is DATA (heartbeats every 5 s; a session
    silent for 15 s is ended). A daemon that dies has its kernel send FIN, or (its host
    down) sends nothing and, once back, answers old connections with a reset."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.now = 0.0
        self.queue: list[tuple[float, int, Callable[[], None]]] = []
        self.seq = itertools.count()
        self.ids = itertools.count(1)
        self.sites = {
            "a": SimSite("a", True, SessionArbiter(True), up=False),
            "b": SimSite("b", False, SessionArbiter(False), up=False),
        }
        self.conns: dict[int, Conn] = {}
        self.violations: list[str] = []

    def other(self, site: SimSite) -> SimSite:
        return self.sites["b" if site.name == "a" else "a"]

    def at(self, when: float, what: Callable[[], None]) -> None:
        heapq.heappush(self.queue, (when, next(self.seq), what))

    def later(self, site: SimSite, delay: float, what: Callable[[], None]) -> None:
        """Run ``what`` after ``delay`` unless the site's daemon restarted meanwhile."""
        epoch = site.epoch
        self.at(self.now + delay, lambda: what() if site.epoch == epoch and site.up else None)

    def send(self, conn: Conn, sender: SimSite, what: str) -> None:
        when = max(self.now + self.rng.uniform(0.001, 0.3), conn.last.get(sender.name, 0.0))
        conn.last[sender.name] = when
        receiver = self.other(sender)
        self.at(when, lambda: self.deliver(conn, receiver, what))

    # -- one site's I/O ------------------------------------------------------------------

    def apply(self, site: SimSite, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Run):
                if any(s == "running" for s in site.known.values()):
                    self.violations.append(f"{site.name} runs two sessions at {self.now:.3f}")
                site.known[action.token] = "running"
                site.heard_at[action.token] = self.now
                site.taken_up.add(action.token)
                self.speak(site, self.conns[action.token])
            elif isinstance(action, CloseSession):
                self.close(site, self.conns[action.token])
            elif site.attempt is not None:  # AbandonDial: the attempt's scope is cancelled
                self.close(site, site.attempt)

    def speak(self, site: SimSite, conn: Conn) -> None:
        if site.known.get(conn.id) != "running":
            return
        if not site.is_master and not conn.words.get("a"):
            self.violations.append(f"the slave spoke first on {conn.id}")
        conn.words[site.name] = conn.words.get(site.name, 0) + 1
        self.send(conn, site, "DATA")
        self.later(site, HEARTBEAT_INTERVAL, lambda: self.heartbeat(site, conn))

    def heartbeat(self, site: SimSite, conn: Conn) -> None:
        if site.known.get(conn.id) != "running":
            return
        if self.now - site.heard_at[conn.id] > PEER_SILENCE_TIMEOUT:
            self.close(site, conn)  # the agreement declares the peer silent
        else:
            self.speak(site, conn)

    def close(self, site: SimSite, conn: Conn) -> None:
        state = site.known.get(conn.id)
        if state in (None, "closed"):
            return
        site.known[conn.id] = "closed"
        self.send(conn, site, "FIN")
        if site.attempt is conn:
            site.attempt = None
            self.apply(site, site.arbiter.dial_ended())
            self.dial_after(site, site.backoff)
            site.backoff = min(site.backoff * 2, DIAL_BACKOFF_MAX)
        elif state != "handshake":
            self.apply(site, site.arbiter.ended(conn.id))
        self.dial_when_idle(site)

    def dial_after(self, site: SimSite, delay: float) -> None:
        site.dial_at = self.now + delay
        self.later(site, delay, lambda: self.dial(site))

    def dial_when_idle(self, site: SimSite) -> None:
        """The dial loop, woken when the site has no session: it dials after 0.25 s."""
        if site.up and site.attempt is None and site.dial_at is None and not site.arbiter.busy:
            site.backoff = DIAL_BACKOFF_FIRST
            self.dial_after(site, DIAL_BACKOFF_FIRST)

    def dial(self, site: SimSite) -> None:
        if site.dial_at is None or self.now < site.dial_at:
            return
        site.dial_at = None
        if site.arbiter.busy or site.attempt is not None:
            return  # woken again once idle
        conn = Conn(next(self.ids), site.name, {site.name: site.epoch})
        self.conns[conn.id] = conn
        site.attempt = conn
        site.known[conn.id] = "handshake"
        site.arbiter.dial_started()
        self.send(conn, site, "SYN")
        self.later(site, HANDSHAKE_TIMEOUT, lambda: self.timeout(site, conn))

    def timeout(self, site: SimSite, conn: Conn) -> None:
        if site.known.get(conn.id) == "handshake":
            self.close(site, conn)

    # -- deliveries ------------------------------------------------------------------------

    def deliver(self, conn: Conn, site: SimSite, what: str) -> None:
        if not site.up:
            if what == "SYN":
                self.send(conn, site, "FIN")  # connection refused
            return
        if what == "SYN":
            conn.epochs[site.name] = site.epoch
            site.known[conn.id] = "handshake"
            self.send(conn, site, "SYN-ACK")
            self.later(site, HANDSHAKE_TIMEOUT, lambda: self.timeout(site, conn))
            return
        if conn.epochs.get(site.name) != site.epoch:
            if what != "FIN":
                self.send(conn, site, "FIN")  # an old connection: the kernel resets it
            return
        state = site.known.get(conn.id)
        if state in (None, "closed"):
            return
        if what == "FIN":
            self.close(site, conn)
        elif what == "SYN-ACK":
            site.arbiter.dial_handshaking()
            self.send(conn, site, "HELLO")
        elif what == "HELLO":
            conn.mark = site.arbiter.hello_answered()
            self.send(conn, site, "RESPONSE")
        elif what == "RESPONSE":
            self.send(conn, site, "FINISH")  # and, with nothing awaited, completed:
            site.attempt = None
            self.completed(site, conn, OURS)
        elif what == "FINISH":
            self.completed(site, conn, PEERS)
        elif what == "DATA":
            site.heard_at[conn.id] = self.now
            self.apply(site, site.arbiter.heard(conn.id))

    def completed(self, site: SimSite, conn: Conn, origin: Origin) -> None:
        site.known[conn.id] = "waiting"
        self.later(site, CLAIM_TIMEOUT, lambda: self.claim_timeout(site, conn))
        self.apply(site, site.arbiter.completed(conn.id, origin, conn.mark))
        self.dial_when_idle(site)

    def claim_timeout(self, site: SimSite, conn: Conn) -> None:
        if site.known.get(conn.id) == "waiting":
            self.close(site, conn)

    # -- daemons starting and dying -------------------------------------------------------

    def stop(self, site: SimSite, fin: bool) -> None:
        """The daemon dies: with ``fin`` its kernel closes its connections; without, its
        host went down (nothing is sent)."""
        if not site.up:
            return
        for conn_id, state in site.known.items():
            if fin and state != "closed":
                self.send(self.conns[conn_id], site, "FIN")
        site.up, site.epoch = False, site.epoch + 1
        site.known, site.heard_at, site.attempt, site.dial_at = {}, {}, None, None

    def start(self, site: SimSite) -> None:
        if site.up:
            return
        site.arbiter = SessionArbiter(site.is_master)
        site.up, site.backoff = True, DIAL_BACKOFF_FIRST
        site.dial_at = self.now
        self.dial(site)

    def run_until(self, end: float) -> None:
        while self.queue and self.queue[0][0] <= end:
            self.now, _, what = heapq.heappop(self.queue)
            what()
        self.now = end

    # -- what must hold ----------------------------------------------------------------------

    def check_settled(self) -> None:
        assert not self.violations, self.violations
        a, b = self.sites["a"], self.sites["b"]
        running_a = [t for t, s in a.known.items() if s == "running"]
        running_b = [t for t, s in b.known.items() if s == "running"]
        assert running_a == running_b and len(running_a) == 1, (running_a, running_b, a, b)
        assert a.arbiter.running == b.arbiter.running == running_a[0]
        assert not a.arbiter.busy or not [t for t, s in a.known.items() if s == "waiting"]
        for conn in self.conns.values():
            if not any(conn.id in site.taken_up for site in (a, b)):
                assert not conn.words, conn  # never taken up: nothing said on it
            if conn.words.get("b"):
                assert conn.words.get("a"), conn  # the master spoke first

    def start_both(self) -> None:
        for site in self.sites.values():
            self.at(self.rng.uniform(0, 0.6), lambda site=site: self.start(site))


SEEDS = range(200)


@pytest.mark.parametrize("seed", SEEDS)
def test_both_sites_start_together(seed: int) -> None:
    sim = Simulation(random.Random(seed))
    sim.start_both()
    sim.run_until(60.0)
    sim.check_settled()
    # A clean start never replaces a session: a dial that crossed it was closed unused.
    assert all(len(site.taken_up) == 1 for site in sim.sites.values())


@pytest.mark.parametrize("seed", range(60))
@pytest.mark.parametrize("who", ["a", "b"])
@pytest.mark.parametrize("fin", [True, False], ids=["killed", "host-down"])
def test_one_site_restarts_while_the_session_runs(seed: int, who: str, fin: bool) -> None:
    sim = Simulation(random.Random(seed))
    sim.start_both()
    sim.run_until(30.0)
    sim.check_settled()
    site = sim.sites[who]
    sim.stop(site, fin)
    down_for = sim.rng.uniform(0.0, 20.0)
    sim.at(sim.now + down_for, lambda: sim.start(site))
    dialled_before = max(sim.conns)
    sim.run_until(sim.now + down_for + 2 * CLAIM_TIMEOUT + DIAL_BACKOFF_MAX)
    sim.check_settled()
    if who == "b" and not fin and down_for < HEARTBEAT_INTERVAL:
        # The master's old session still looked alive when the slave's first new dial
        # completed: that dial waited for it to end and was taken up, not redialled.
        first = min(
            c for c, conn in sim.conns.items() if c > dialled_before and conn.dialler == "b"
        )
        assert sim.sites["a"].arbiter.running == first


@pytest.mark.parametrize("seed", range(100))
def test_both_sites_restart_again_and_again(seed: int) -> None:
    sim = Simulation(random.Random(seed))
    sim.start_both()
    for _ in range(6):
        sim.run_until(sim.now + sim.rng.uniform(0.0, 3.0))
        for site in sim.sites.values():
            if sim.rng.random() < 0.6:
                sim.stop(site, fin=sim.rng.random() < 0.8)
                sim.at(sim.now + sim.rng.uniform(0, 1.0), lambda s=site: sim.start(s))
    sim.run_until(sim.now + 2 * CLAIM_TIMEOUT + DIAL_BACKOFF_MAX)
    sim.check_settled()
