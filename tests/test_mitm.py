"""A man in the middle between two real site daemons: every tampered exchange fails, no key
comes out of it, both daemons stay up and the link recovers by itself.

Site A (the link master, which dials) reaches site B through ``MitmProxy`` (tests/
mitm_proxy.py), which alters one chosen frame of one connection and then behaves. One
pair of daemons serves the whole module; each case plans a tamper for the next
connection and cuts the current one, so the master redials into it:

- bootstrap cases (mode 1, ML-DSA) run before the first PSK exists. The connection after
  each tampered one completes a clean bootstrap handshake and is cut at its first session
  frame, before any key batch, so the next case is a first-contact bootstrap again.
- PSK cases (mode 2) run once the chain is established; the connection after each tampered
  one must re-key by itself: a new authentication key and a refilled pool, and the keys
  site A hands out are fetched at site B with identical material.

The master redials 0.25 s after a session that had completed its handshake and 0.5 s
after one failed handshake; a case takes a few seconds (a tampered KEY_BATCH about ten, as
the pool refills after it). The default run covers every frame and every kind of tampering;
``-m slow`` runs each action on each frame.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from mitm_proxy import A_TO_B, B_TO_A, Action, MitmProxy, Record, Tamper, Target, point_a_at
from timeouts import timeout

from qkdd.client import BlockingKeyClient
from qkdd.demo import RunningSite, exchange_keys, running_demo, wait_for_keys
from qkdd.demo_sites import SITE_A, SITE_B
from qkdd.keystore import KeyStore, StoredQkdKey
from qkdd.link_params import LinkError, LinkParameters
from qkdd.peer.agreement import LinkAgreement
from qkdd.peer.agreement_messages import KeyBatch
from qkdd.peer.wire import FrameType

POOL_SIZE = 64  # pool_size in the demo configs
WAIT = timeout(20.0)  # seconds any one step may take before the test fails

# Sealed link messages are told apart by size: a KEY_BATCH holds an ML-KEM ciphertext
# (1088 bytes).
KEY_BATCH_MIN_BODY = 1088

HELLO = Target(A_TO_B, FrameType.HELLO)
RESPONSE = Target(B_TO_A, FrameType.RESPONSE)
FINISH = Target(A_TO_B, FrameType.FINISH)
DATA_A0 = Target(A_TO_B, FrameType.DATA)  # A's first session frame: STORE_ID
DATA_B0 = Target(B_TO_A, FrameType.DATA)  # B's first: STORE_ID (then RESYNC, KEM_OFFER)
AUTH_BATCH = Target(A_TO_B, FrameType.DATA, min_body=KEY_BATCH_MIN_BODY)  # the PSK batch
APP_BATCH = Target(A_TO_B, FrameType.DATA, min_body=KEY_BATCH_MIN_BODY, nth=1)
TARGET_NAMES = {
    HELLO: "HELLO",
    RESPONSE: "RESPONSE",
    FINISH: "FINISH",
    DATA_A0: "DATA-a0",
    DATA_B0: "DATA-b0",
    AUTH_BATCH: "KEY_BATCH-psk",
    APP_BATCH: "KEY_BATCH-app",
}

FAILURE = re.compile(r"event=(peer_authentication_failed|session_ended|peer_connection_dropped) .*")
# Failures that only say the other side went away (not that a check tripped).
CLOSED = re.compile(r"closed the connection|onnection reset|roken pipe|Broken|Closed")


def case(target: Target, action: Action) -> Tamper:
    return Tamper(action, target)


def case_id(tamper: Tamper) -> str:
    return f"{TARGET_NAMES[tamper.target]}-{tamper.action.value}"


A = Action
FLIPS = (A.FLIP_TYPE, A.FLIP_LENGTH, A.FLIP_BODY)
# Every action that applies to each frame. Not here: reordering HELLO or RESPONSE with its
# successor, which only comes after the reply to it; dropping HELLO or
# RESPONSE, which stalls the handshake until a timeout (test_dropped_handshake_frame,
# slow); dropping a KEY_BATCH, which stalls the link until the 15 s batch reply deadline
# (test_dropped_key_batch, slow).
HANDSHAKE_ACTIONS = {
    HELLO: (*FLIPS, A.REPLAY, A.TRUNCATE, A.INJECT, A.REFLECT),
    RESPONSE: (*FLIPS, A.REPLAY, A.TRUNCATE, A.INJECT, A.REFLECT),
    FINISH: (*FLIPS, A.REPLAY, A.REORDER, A.DROP, A.TRUNCATE, A.INJECT, A.REFLECT),
}
SESSION_ACTIONS = {
    DATA_A0: (*FLIPS, A.REPLAY, A.REORDER, A.DROP, A.TRUNCATE, A.INJECT, A.INJECT_HELLO, A.REFLECT),
    DATA_B0: (*FLIPS, A.REPLAY, A.REORDER, A.DROP, A.TRUNCATE, A.INJECT, A.REFLECT),
    # REORDER: the application KEY_BATCH, in flight right behind it, overtakes it.
    AUTH_BATCH: (*FLIPS, A.REPLAY, A.REORDER, A.TRUNCATE, A.INJECT, A.REFLECT),
    APP_BATCH: (*FLIPS, A.REPLAY, A.TRUNCATE, A.INJECT, A.REFLECT),
}
BOOTSTRAP_CASES = [
    *(case(t, a) for t, actions in HANDSHAKE_ACTIONS.items() for a in actions),
    case(DATA_A0, A.FLIP_BODY),
    case(DATA_B0, A.REPLAY),
    case(DATA_A0, A.REFLECT),
]
PSK_CASES = [
    *(case(t, a) for t, actions in HANDSHAKE_ACTIONS.items() for a in actions),
    case(HELLO, A.DOWNGRADE),
    *(case(t, a) for t, actions in SESSION_ACTIONS.items() for a in actions),
]
# The default run tampers with every frame and makes every kind of tampering at least once;
# the whole matrix (each action on each frame: a few seconds each, about eight minutes in
# all) runs with -m slow.
BOOTSTRAP_DEFAULT = {
    "HELLO-flip-type", "HELLO-inject", "RESPONSE-flip-length", "RESPONSE-replay",
    "FINISH-flip-body", "FINISH-reorder", "FINISH-drop", "FINISH-truncate", "FINISH-reflect",
    "DATA-a0-flip-body", "DATA-b0-replay", "DATA-a0-reflect",
}  # fmt: skip
PSK_DEFAULT = {
    "HELLO-flip-type", "HELLO-downgrade", "RESPONSE-flip-body", "RESPONSE-replay",
    "FINISH-reorder", "FINISH-drop", "FINISH-reflect", "DATA-a0-inject-hello",
    "DATA-a0-truncate", "DATA-b0-flip-length", "KEY_BATCH-psk-reorder",
    "DATA-b0-inject", "KEY_BATCH-app-replay",
}  # fmt: skip


def matrix(cases: list[Tamper], default: set[str]) -> list[Any]:
    """The cases as parameters, those not in ``default`` marked slow."""
    ids = [case_id(c) for c in cases]
    assert default <= set(ids), f"default cases not in the matrix: {default - set(ids)}"
    return [
        pytest.param(c, id=i, marks=() if i in default else pytest.mark.slow)
        for c, i in zip(cases, ids, strict=True)
    ]


def responder_never_establishes(tamper: Tamper) -> bool:
    """Whether site B must not complete the tampered handshake at all: it does when it saw
    an intact FINISH before the tampered copy or the reflection upset site A."""
    if tamper.target not in HANDSHAKE_ACTIONS:
        return False
    if tamper.action is A.REPLAY:
        return tamper.target is HELLO
    return not (tamper.action is A.REFLECT and tamper.target is FINISH)


@dataclass
class Link:
    a: RunningSite
    b: RunningSite
    proxy: MitmProxy
    psk_next: bool = False  # the next clean handshake uses a PSK (mode 2)
    ever_keyed: bool = False  # a PSK batch has been committed at some point
    key_ids: set[str] = field(default_factory=set)
    timings: dict[str, list[float]] = field(default_factory=dict)

    def log(self, side: str) -> Path:
        return self.a.log_file if side == "a" else self.b.log_file

    def text(self, side: str, start: Record, end: Record | None = None) -> str:
        """Site ``side``'s log from the moment ``start`` was accepted until ``end`` was."""
        data = self.log(side).read_bytes()
        stop = int(end.marks[side]) if end is not None else len(data)  # type: ignore[call-overload]
        return data[int(start.marks[side]) : stop].decode(errors="replace")  # type: ignore[call-overload]

    def assert_alive(self) -> None:
        for site in (self.a, self.b):
            assert site.process.poll() is None, (
                f"{site.site.site_id} exited:\n{site.log_file.read_text()[-3000:]}"
            )

    def exchange(self, number: int) -> None:
        """Site A hands out keys, site B delivers the same ones by ID."""
        rows = exchange_keys(self.a, self.b, number)
        assert len(rows) == number
        assert all(row["match"] for row in rows), rows
        ids = {row["key_ID"] for row in rows}
        assert not ids & self.key_ids, "a key ID was handed out twice"
        self.key_ids |= ids


def wait_until(condition: Callable[[], object], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        if time.monotonic() >= deadline:  # only a hang gets here
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def wait_done(record: Record, what: str) -> None:
    assert record.done.wait(WAIT), f"{what}: connection {record} did not end"


def cut_at_first_session_frame() -> Tamper:
    """Let a handshake complete, then cut before any key batch (B's first DATA frame is
    only sent once B has verified FINISH)."""
    return Tamper(Action.CUT, Target(B_TO_A, FrameType.DATA))


@pytest.fixture(scope="module")
def link(tmp_path_factory: pytest.TempPathFactory):
    directory = tmp_path_factory.mktemp("mitm")
    sites: list[RunningSite] = []

    def mark(event: str, record: Record) -> None:
        # Log offsets at the moment a connection arrives: what each site logs about a
        # connection lies between its mark and the next connection's.
        if event == "accept" and sites:
            record.marks.update(a=sites[0].log_file.stat().st_size)
            record.marks.update(b=sites[1].log_file.stat().st_size)

    proxy = MitmProxy(observer=mark)
    # The first connection: a clean bootstrap, cut before any batch, so the bootstrap cases
    # still find a link without a PSK.
    proxy.plan(cut_at_first_session_frame())
    try:
        with running_demo(directory, tamper=point_a_at(proxy)) as pair:
            sites.extend(pair)
            yield Link(pair[0], pair[1], proxy)
    finally:
        proxy.close()
    assert proxy.error is None


def allow_bootstrap(link: Link) -> None:
    """An operator's consent on both sites: the next handshake is a signature bootstrap."""
    runs = [
        subprocess.Popen(
            [sys.executable, "-m", "qkdd", "allow-bootstrap", "--config", str(site.config_file)]
            + [peer],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for site, peer in ((link.a, SITE_B.site_id), (link.b, SITE_A.site_id))
    ]
    for run in runs:
        _, err = run.communicate(timeout=timeout(30))
        assert run.returncode == 0, err


def recover(link: Link) -> None:
    """Cut the current connection and let the next one run clean until it has made a new
    authentication key and filled site A's pool."""
    (record,) = link.proxy.plan(None)
    link.proxy.cut()
    assert record.accepted.wait(WAIT), "the master did not redial"
    wait_until(
        lambda: "event=auth_key_rotated" in link.text("a", record), "a new authentication key"
    )
    wait_for_keys(link.a, SITE_B.sae_id, POOL_SIZE, timeout=WAIT)


def establish_psk_chain(link: Link) -> None:
    if not link.psk_next:
        recover(link)  # the clean session commits a PSK (and ends any operator allowance)
        link.psk_next = link.ever_keyed = True


def assert_detected(tamper: Tamper, record: Record, link: Link, until: Record) -> None:
    """The tampered connection ended in a failure logged by a site; unless the tamper only
    truncated the stream, some check (not a mere close) tripped."""
    failures = [
        line for side in ("a", "b") for line in FAILURE.findall(link.text(side, record, until))
    ]
    assert failures, f"no failure logged for {record}"
    if tamper.action is not Action.TRUNCATE:
        detected = [line for line in failures if not CLOSED.search(line)]
        assert detected, f"only closes logged for {record}: {failures}"


@pytest.mark.parametrize("tamper", matrix(BOOTSTRAP_CASES, BOOTSTRAP_DEFAULT))
def test_tampered_bootstrap_fails_and_the_next_one_succeeds(link: Link, tamper: Tamper) -> None:
    if link.psk_next:
        allow_bootstrap(link)  # cases run out of order: ask for a bootstrap again
        link.psk_next = False
    started = time.monotonic()
    tampered, clean = link.proxy.plan(tamper, cut_at_first_session_frame())
    link.proxy.cut()
    wait_done(tampered, "tampered bootstrap")
    assert tampered.fired, f"the tamper never applied: {tampered}"
    wait_done(clean, "clean bootstrap")
    assert clean.fired, f"the clean bootstrap did not complete its handshake: {clean}"
    link.timings.setdefault("bootstrap", []).append(time.monotonic() - started)

    assert_detected(tamper, tampered, link, clean)
    if responder_never_establishes(tamper):
        assert "event=session_established" not in link.text("b", tampered, clean)
    assert "auth=ml-dsa-bootstrap" in link.text("b", clean)
    if not link.ever_keyed:
        # Nothing made from the tampered session was committed: no PSK exists yet.
        for side in ("a", "b"):
            assert "event=auth_key_rotated" not in link.log(side).read_text()
    link.assert_alive()


@pytest.mark.parametrize("tamper", matrix(PSK_CASES, PSK_DEFAULT))
def test_tampered_psk_session_fails_and_the_link_recovers(link: Link, tamper: Tamper) -> None:
    establish_psk_chain(link)
    # Take keys while the network is frozen: the batch that would refill the pool is lost
    # in the cut, so the next sessions carry an application KEY_BATCH after the PSK batch.
    link.proxy.freeze()
    link.exchange(8)
    started = time.monotonic()
    tampered, recovery = link.proxy.plan(tamper, None)
    link.proxy.cut()
    wait_done(tampered, "tampered session")
    assert tampered.fired, f"the tamper never applied: {tampered}"
    if tamper.action is Action.REORDER:
        assert tampered.swapped_with is not None, f"no frame overtook the target: {tampered}"
    if tamper.target is AUTH_BATCH and tamper.action is Action.REORDER:
        assert tampered.swapped_with[1] >= KEY_BATCH_MIN_BODY, "no KEY_BATCH overtook it"

    # Recovery: a PSK session, a new authentication key, a full pool again.
    assert recovery.accepted.wait(WAIT), "the master did not redial"
    wait_until(
        lambda: "event=auth_key_rotated" in link.text("a", recovery), "a new authentication key"
    )
    wait_for_keys(link.a, SITE_B.sae_id, POOL_SIZE, timeout=WAIT)
    link.timings.setdefault("psk", []).append(time.monotonic() - started)
    assert not recovery.done.is_set(), f"the recovered session ended: {recovery}"
    assert "auth=psk:" in link.text("b", recovery)

    assert_detected(tamper, tampered, link, recovery)
    if responder_never_establishes(tamper):
        assert "event=session_established" not in link.text("b", tampered, recovery)
    if tamper.action is Action.DOWNGRADE:
        assert "asked for a signature bootstrap" in link.text("b", tampered, recovery)
    link.exchange(8)
    wait_for_keys(link.a, SITE_B.sae_id, POOL_SIZE, timeout=WAIT)
    link.assert_alive()


@pytest.mark.slow
@pytest.mark.parametrize("target", [HELLO, RESPONSE], ids=TARGET_NAMES.get)
def test_dropped_handshake_frame_times_out_and_the_link_recovers(
    link: Link, target: Target
) -> None:
    establish_psk_chain(link)
    tampered, recovery = link.proxy.plan(Tamper(Action.DROP, target), None)
    link.proxy.cut()
    wait_done(tampered, "stalled handshake")  # a handshake timeout ends it
    assert tampered.fired
    # Site B gives up a connection whose HELLO never came (3 s); site A, a RESPONSE (10 s).
    side, reason = ("b", "no HELLO within") if target is HELLO else ("a", "handshake timed out")
    wait_until(lambda: reason in link.text(side, tampered, None), reason)
    assert recovery.accepted.wait(WAIT)
    wait_until(
        lambda: "event=auth_key_rotated" in link.text("a", recovery), "a new authentication key"
    )
    link.exchange(8)
    link.assert_alive()


@pytest.mark.slow
def test_dropped_key_batch_does_not_stall_the_link(link: Link) -> None:
    establish_psk_chain(link)
    link.proxy.freeze()
    link.exchange(8)  # a deficit, so the next session sends an application KEY_BATCH
    (tampered,) = link.proxy.plan(Tamper(Action.DROP, APP_BATCH))
    link.proxy.cut()
    try:
        wait_until(lambda: tampered.fired, "the application KEY_BATCH")
        # The master gives up on the batch (after 3x the slave's 5 s wait for QKD keys),
        # ends the session and re-keys in the next one.
        wait_for_keys(link.a, SITE_B.sae_id, POOL_SIZE, timeout=timeout(40))
    finally:
        recover(link)  # unstick the link for the tests that follow


def test_master_gives_up_on_a_batch_whose_ack_never_comes(tmp_path: Path, backend) -> None:
    # The same stall as above, sans-IO: the KEY_BATCH is lost on its way (the connection
    # stays open, so nothing else ever tells the master).
    stores = (
        KeyStore(tmp_path / "a.db", os.urandom(32)),
        KeyStore(tmp_path / "b.db", os.urandom(32)),
    )
    qkd = [StoredQkdKey(str(uuid.uuid4()), os.urandom(32)) for _ in range(64)]
    stores[0].store_qkd_keys(SITE_B.site_id, qkd)
    stores[1].store_qkd_keys(SITE_A.site_id, qkd)
    sides = []
    for store, local, peer in ((stores[0], SITE_A, SITE_B), (stores[1], SITE_B, SITE_A)):
        params = LinkParameters(
            local.site_id,
            peer.site_id,
            frozenset({local.sae_id}),
            frozenset({peer.sae_id}),
            256,
            8,
        )
        sides.append(LinkAgreement(params, store=store, backend=backend, session_id=bytes(32)))
    master, slave = sides
    for message in master.start():
        slave.on_message(message, 0.0)  # STORE_ID, QKD_HORIZON
    sent = [out for m in slave.start() for out in master.on_message(m, 0.0)]
    # The master's KEY_BATCHes ... and a man in the middle drops them all.
    assert any(isinstance(m, KeyBatch) for m in sent)
    try:
        with pytest.raises(LinkError):
            for later in (1.0, 10.0, 60.0, 600.0, 3600.0):
                master.poll(later)
    finally:
        for store in stores:
            store.close()


def test_every_key_handed_out_matches_at_the_other_site(link: Link) -> None:
    establish_psk_chain(link)
    wait_for_keys(link.a, SITE_B.sae_id, POOL_SIZE, timeout=WAIT)
    link.exchange(POOL_SIZE)  # the whole pool, whatever session each key came from
    # The other direction: B's application sends, A's receives.
    wait_for_keys(link.b, SITE_A.sae_id, POOL_SIZE, timeout=WAIT)
    with BlockingKeyClient(str(link.b.socket_path)) as app_b:
        sent = app_b.enc_keys(SITE_A.sae_id, number=POOL_SIZE)
    with BlockingKeyClient(str(link.a.socket_path)) as app_a:
        received = app_a.dec_keys(SITE_B.sae_id, [k.key_id for k in sent])
    assert [(k.key_id, k.material) for k in sent] == [(k.key_id, k.material) for k in received]
    link.assert_alive()
    for kind, figures in link.timings.items():
        print(
            f"{kind}: {len(figures)} cases, {sum(figures) / len(figures):.2f} s mean, "
            f"{max(figures):.2f} s max"
        )
