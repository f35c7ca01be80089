"""SIGKILL either daemon at random moments during traffic, repeatedly: no key an application
got is lost, none is handed out twice, both sites agree on every key, and the PSK chain
survives (every later session is authenticated by a PSK, never a new bootstrap).

Applications at both sites take keys as fast as they come (enc_keys) and their peers at
the other site fetch each one by ID (dec_keys), in both directions at once, so the pools
drain and batches are always in flight. Each kill comes once both sites run a new session
that has agreed keys since the last restart and the traffic has moved on, so every kill
lands in key agreement and live traffic however slow the machine is. After the last kill
both daemons are killed once more and the next session must be a PSK one. The default
suite kills 4 times; the ``slow`` soak 100 times. Both print their counts (``-s``).

A dec_keys call cut short by the kill of the site answering it may have taken its keys
with it (handed out, then the answer lost): only such keys may be missing afterwards, and
they are counted apart ("taken by a cut call"), never as lost."""

from __future__ import annotations

import contextlib
import functools
import random
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import pytest
from timeouts import timeout, wait_until

from qkdd.client import BlockingKeyClient, ClientError, KeyServiceClientError
from qkdd.demo import RunningSite, running_demo, wait_for_keys

KEYS_BETWEEN_KILLS = 8  # keys of fresh traffic handed out before the next kill
KEYS_PER_CALL = 4
CALL_TIMEOUT = 10.0
# Keys asked for again one by one after the soak, per direction: one served again counts
# as handed out twice.
ASKED_AGAIN = 64
BOOTSTRAP = "auth=ml-dsa-bootstrap"
PSK_SESSION = "auth=psk:"
SESSION = "event=session_established"


@dataclass
class Flow:
    """Keys from an application at ``sender`` (enc_keys) to its peer application at
    ``receiver`` (dec_keys by ID)."""

    sender: RunningSite
    receiver: RunningSite
    acknowledged: dict[str, bytes] = field(default_factory=dict)  # enc_keys answered
    received: dict[str, bytes] = field(default_factory=dict)  # dec_keys answered
    undelivered: list[str] = field(default_factory=list)  # not asked for at the receiver yet
    in_doubt: set[str] = field(default_factory=set)  # a dec_keys call cut short by a kill
    refused: set[str] = field(default_factory=set)  # the receiver said it does not hold them
    cut_calls: Counter[str] = field(default_factory=Counter)  # how each was cut short

    @property
    def name(self) -> str:
        return f"{self.sender.site.site_id}->{self.receiver.site.site_id}"

    def client(self, site: RunningSite) -> BlockingKeyClient:
        return BlockingKeyClient(str(site.socket_path), timeout=timeout(CALL_TIMEOUT))


class Traffic:
    """Both flows running, each in its own thread; every key handed out is recorded."""

    def __init__(self, flows: list[Flow]) -> None:
        self.flows = flows
        # (site, call, key ID) for every key any application got.
        self.handed_out: list[tuple[str, str, str]] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(f,)) for f in flows]

    def __enter__(self) -> Traffic:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout(60))
        assert not any(thread.is_alive() for thread in self.threads)

    def acknowledged(self) -> int:
        return sum(len(flow.acknowledged) for flow in self.flows)

    def _run(self, flow: Flow) -> None:
        while not self.stop.is_set():
            self._send(flow)
            if not self.deliver(flow):
                time.sleep(0.05)

    def _send(self, flow: Flow) -> None:
        site = flow.sender.site.site_id
        peer = flow.receiver.site.sae_id
        try:
            with flow.client(flow.sender) as app:
                keys = app.enc_keys(peer, number=KEYS_PER_CALL)
        except ClientError:
            return  # down, or its pool is refilling: nothing handed out, nothing counted
        for key in keys:
            self.handed_out.append((site, "enc", key.key_id))
            flow.acknowledged[key.key_id] = key.material
            flow.undelivered.append(key.key_id)

    def deliver(self, flow: Flow) -> bool:
        """Ask the receiver for every key handed out at the sender and not yet asked for;
        False if there were none, or the receiver could not be reached."""
        batch, flow.undelivered[:] = list(flow.undelivered), []
        if not batch:
            return False
        site = flow.receiver.site.site_id
        try:
            with flow.client(flow.receiver) as app:
                keys = app.dec_keys(flow.sender.site.sae_id, batch)
        except KeyServiceClientError:
            flow.refused.update(batch)  # asked for again one by one after the soak
            return True
        except ClientError as exc:
            if str(exc).startswith("cannot reach the key service"):
                flow.undelivered[:0] = batch  # never sent: ask again later
                return False
            flow.in_doubt.update(batch)  # sent, then the receiver died: answer unknown
            flow.cut_calls[str(exc).split(": ", 1)[-1][:60]] += 1
            return True
        for key in keys:
            self.handed_out.append((site, "dec", key.key_id))
            flow.received[key.key_id] = key.material
        return True


def duplicates(handed_out: list[tuple[str, str, str]]) -> list[str]:
    """Key IDs handed out twice: by enc_keys anywhere (one ID names one key of one
    pair), or by dec_keys twice at one site."""
    made = Counter(key for _, call, key in handed_out if call == "enc")
    fetched = Counter((site, key) for site, call, key in handed_out if call == "dec")
    return [k for k, n in made.items() if n > 1] + [k for (_, k), n in fetched.items() if n > 1]


def logged_handouts(site: RunningSite) -> list[tuple[str, str, str]]:
    """(site, call, key ID) for every key the site's log says it handed out: a call whose
    answer the kill cut short is there too if it got as far as its log line."""
    found = []
    for line in site.log_file.read_text(errors="replace").splitlines():
        match = re.search(r"event=api_request .*/(enc|dec)_keys status=200 .*key_IDs=(\S+)", line)
        if match:
            found += [(site.site.site_id, match[1], key) for key in match[2].split(",")]
    return found


def log_count(site: RunningSite, text: str) -> int:
    return site.log_file.read_text(errors="replace").count(text)


def more_than(site: RunningSite, text: str, count: int) -> bool:
    return log_count(site, text) > count


def tails(sites: list[RunningSite], lines: int = 30) -> str:
    out = []
    for site in sites:
        text = site.log_file.read_text(errors="replace")
        # The link's story, not every API request.
        tail = [line for line in text.splitlines() if "event=api_request" not in line][-lines:]
        out += [f"-- {site.site.site_id}"] + [f"  {line[:300]}" for line in tail]
    return "\n".join(out)


def psk_chain(site: RunningSite, peer: str) -> tuple[bool, bool]:
    """(PSK chain established, a signature bootstrap allowed) as the site reports them."""
    with BlockingKeyClient(str(site.socket_path), timeout=timeout(CALL_TIMEOUT)) as client:
        status = client.site_status()["peers"][peer]
    return bool(status["psk_chain_established"]), bool(status["bootstrap_allowed"])


def keys_made(site: RunningSite) -> int | None:
    """Hybrid keys the site has agreed with its peer and made ready, ever (None: down)."""
    try:
        with BlockingKeyClient(str(site.socket_path), timeout=timeout(CALL_TIMEOUT)) as client:
            text = client.metrics()
    except ClientError:
        return None
    match = re.search(r"^qkdd_hybrid_keys_made_total\{[^}]*\} (\S+)$", text, re.MULTILINE)
    assert match, text
    return int(float(match[1]))


def wait_for_agreement(sites: list[RunningSite], sessions: list[int], what: str) -> None:
    """Until both sites run a session newer than ``sessions`` (their counts of sessions
    established) and a batch has been agreed in it, so a kill lands in key agreement."""
    for site, before in zip(sites, sessions, strict=True):
        wait_until(
            functools.partial(more_than, site, SESSION, before),
            f"a new session at {site.site.site_id} {what}",
            120,
            lambda: tails(sites),
        )
    made: list[int | None] = [None, None]

    def agreed() -> bool:
        now = [keys_made(site) for site in sites]
        for place, count in enumerate(now):
            if made[place] is None:
                made[place] = count
        return all(
            n is not None and m is not None and n > m for n, m in zip(now, made, strict=True)
        )

    wait_until(agreed, f"keys agreed in the new session {what}", 120, lambda: tails(sites))


def chain_established(sites: list[RunningSite]) -> bool:
    a, b = sites
    try:
        return psk_chain(a, b.site.site_id)[0] and psk_chain(b, a.site.site_id)[0]
    except ClientError:
        return False


@pytest.mark.parametrize(
    "kills", [pytest.param(4, id="4"), pytest.param(100, id="100", marks=pytest.mark.slow)]
)
def test_sigkill_during_traffic_loses_and_repeats_nothing(tmp_path, kills):
    rng = random.Random(1)
    killed: Counter[str] = Counter()

    with running_demo(tmp_path) as sites:
        site_a, site_b = sites
        flows = [Flow(site_a, site_b), Flow(site_b, site_a)]
        wait_for_keys(site_a, site_b.site.sae_id, KEYS_PER_CALL, timeout=timeout(30))
        wait_for_keys(site_b, site_a.site.sae_id, KEYS_PER_CALL, timeout=timeout(30))
        # Before the first PSK a new bootstrap is allowed: the soak starts once the chain is.
        wait_until(lambda: chain_established(sites), "the PSK chain", 60, lambda: tails(sites))
        bootstraps = [log_count(site, BOOTSTRAP) for site in sites]

        with Traffic(flows) as traffic:
            sessions = [0, 0]
            for kill in range(kills):
                # The link back up and agreeing keys since the last restart, and fresh
                # traffic, then a kill at a random moment in it.
                wait_for_agreement(sites, sessions, f"before kill {kill}")
                target = traffic.acknowledged() + KEYS_BETWEEN_KILLS
                wait_until(
                    lambda t=target: traffic.acknowledged() >= t,
                    f"traffic before kill {kill}",
                    120,
                    lambda: tails(sites),
                )
                time.sleep(rng.uniform(0.0, 0.3))
                sessions = [log_count(site, SESSION) for site in sites]
                victim = rng.choice(sites)
                victim.restart(kill=True)
                killed[victim.site.site_id] += 1
            wait_for_agreement(sites, sessions, "after the last kill")
            target = traffic.acknowledged() + KEYS_BETWEEN_KILLS
            wait_until(
                lambda: traffic.acknowledged() >= target,
                "traffic after the last kill",
                120,
                lambda: tails(sites),
            )

        # After the soak: both daemons killed, one right after the other, and the next
        # session of the link is authenticated by the PSK chain again (no bootstrap, no
        # operator).
        psk_sessions = [log_count(site, PSK_SESSION) for site in sites]
        for site in sites:
            site.restart(kill=True)
        for site, before in zip(sites, psk_sessions, strict=True):
            wait_until(
                functools.partial(more_than, site, PSK_SESSION, before),
                f"a PSK session at {site.site.site_id} after the soak",
                120,
                lambda: tails(sites),
            )
        for flow in flows:
            wait_for_keys(flow.sender, flow.receiver.site.sae_id, 4, timeout=timeout(60))

        checked_again = 0
        for flow in flows:
            # What was handed out at the sender and never asked for, then every key whose
            # answer was lost or refused, one by one.
            while flow.undelivered:
                assert traffic.deliver(flow), f"{flow.name}: the receiver does not answer"
            with flow.client(flow.receiver) as app:
                for key_id in sorted(flow.in_doubt | flow.refused):
                    try:
                        (key,) = app.dec_keys(flow.sender.site.sae_id, [key_id])
                    except KeyServiceClientError:
                        continue  # counted below
                    traffic.handed_out.append((flow.receiver.site.site_id, "dec", key.key_id))
                    flow.received[key_id] = key.material
                # Nothing is handed out twice, even after restarts: a key served again
                # counts as handed out twice.
                for key_id in list(flow.received)[:ASKED_AGAIN]:
                    checked_again += 1
                    with contextlib.suppress(KeyServiceClientError):
                        app.dec_keys(flow.sender.site.sae_id, [key_id])
                        traffic.handed_out.append((flow.receiver.site.site_id, "dec", key_id))
            # Keys flow again, and both sites hand out the same material.
            with flow.client(flow.sender) as app:
                fresh = app.enc_keys(flow.receiver.site.sae_id, number=KEYS_PER_CALL)
            with flow.client(flow.receiver) as app:
                again = app.dec_keys(flow.sender.site.sae_id, [k.key_id for k in fresh])
            assert [k.material for k in again] == [k.material for k in fresh], flow.name
            for sent, got in zip(fresh, again, strict=True):
                flow.acknowledged[sent.key_id] = sent.material
                flow.received[got.key_id] = got.material
                traffic.handed_out.append((flow.sender.site.site_id, "enc", sent.key_id))
                traffic.handed_out.append((flow.receiver.site.site_id, "dec", got.key_id))

        chains = [psk_chain(site_a, site_b.site.site_id), psk_chain(site_b, site_a.site.site_id)]
        new_bootstraps = sum(log_count(s, BOOTSTRAP) for s in sites) - sum(bootstraps)
        auth_failures = sum(log_count(s, "event=peer_authentication_failed") for s in sites)
        sessions = log_count(site_a, SESSION)
        psk = log_count(site_a, PSK_SESSION)
        logged = logged_handouts(site_a) + logged_handouts(site_b)

    missing = [(f, k) for f in flows for k in f.acknowledged if k not in f.received]
    # Only a dec_keys call cut short by SIGKILL may have taken a key with it.
    lost = [k for f, k in missing if k not in f.in_doubt or k in f.refused]
    taken_by_cut_calls = {k for f, k in missing if k in f.in_doubt and k not in f.refused}
    in_doubt = sum(len(flow.in_doubt) for flow in flows)
    logged_as_taken = taken_by_cut_calls & {key for _, call, key in logged if call == "dec"}
    refused = sum(len(flow.refused) for flow in flows)
    repeated = duplicates(traffic.handed_out)
    repeated_in_logs = duplicates(logged)
    disagree = [
        key_id
        for flow in flows
        for key_id, material in flow.received.items()
        if flow.acknowledged.get(key_id) != material
    ]
    exchanged = sum(len(flow.acknowledged) for flow in flows)
    checked = sum(len(flow.received) for flow in flows)
    cut_calls = sum((flow.cut_calls for flow in flows), Counter())
    report = [
        f"kills: {kills} during traffic (site-a {killed['site-a']}, site-b "
        f"{killed['site-b']}), then both daemons one right after the other",
        f"keys exchanged: {exchanged} ("
        + ", ".join(f"{flow.name} {len(flow.acknowledged)}" for flow in flows)
        + ")",
        f"keys checked at the other site: {checked}; asked for again after the soak: "
        f"{checked_again}",
        f"duplicates: {len(repeated)} (in the daemons' logs: {len(repeated_in_logs)})",
        f"losses: {len(lost)}; refused at first: {refused}; material mismatches: {len(disagree)}",
        f"in doubt (a dec_keys call cut short by a kill): {in_doubt} keys in "
        f"{cut_calls.total()} calls {dict(cut_calls)}; taken by the cut call: "
        f"{len(taken_by_cut_calls)} ({len(logged_as_taken)} logged as handed out there)",
        f"sessions: {sessions} ({psk} PSK); new bootstraps: {new_bootstraps}; "
        f"authentication failures: {auth_failures}",
    ]
    print("\n" + "\n".join(report))
    assert not repeated, f"handed out twice: {repeated[:5]}"
    assert not repeated_in_logs, f"handed out twice (daemon logs): {repeated_in_logs[:5]}"
    assert not lost, f"lost: {lost[:5]}"
    assert not refused, "a site refused keys its peer had handed out"
    assert not disagree, f"the sites disagree on {disagree[:5]}"
    assert new_bootstraps == 0 and auth_failures == 0
    assert chains == [(True, False), (True, False)], chains
