"""Key events: the bus and pool watch on their own, then through real daemons and the real
event route (link down and up, keys available, pool low, keys expired and withdrawn)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from timeouts import timeout

from qkdd import ctl
from qkdd.client import BlockingKeyClient, KeyServiceClientError
from qkdd.demo import running_demo, wait_for_keys
from qkdd.demo_sites import SITE_A, SITE_B
from qkdd.events import EventBus, PoolWatch

# -- the bus --------------------------------------------------------------------------------


def test_subscribers_get_only_events_that_concern_them_and_of_their_kinds():
    bus = EventBus(clock=lambda: 5.0)
    a = bus.subscribe("sae-a")
    b_links = bus.subscribe("sae-b", kinds=["link_down"])
    bus.publish("keys_available", master_sae="sae-a", slave_sae="sae-x", details={"added": 3})
    bus.publish("keys_expired", master_sae="sae-y", slave_sae="sae-z", details={"key_IDs": []})
    bus.publish("link_down", peer_site="site-b", details={"reason": "gone"})
    got_a = a.take()
    assert [e.kind for e in got_a] == ["keys_available", "link_down"]
    assert got_a[0].to_json() == {
        "event": "keys_available",
        "seq": 1,
        "at": 5.0,
        "master_SAE_ID": "sae-a",
        "slave_SAE_ID": "sae-x",
        "added": 3,
    }
    assert [e.kind for e in b_links.take()] == ["link_down"]
    a.close()
    bus.publish("link_up", peer_site="site-b")
    assert a.take() == [] and bus.subscriber_count == 1


def test_a_slow_subscriber_loses_the_oldest_events_and_is_told():
    bus = EventBus()
    sub = bus.subscribe("s", limit=3)
    for _ in range(5):
        bus.publish("link_up", peer_site="p")
    got = sub.take()
    assert got[0].kind == "events_lost" and got[0].details == {"lost": 2}
    assert [e.seq for e in got[1:]] == [3, 4, 5]
    assert sub.take() == []


async def test_next_waits_for_an_event():
    bus = EventBus()
    sub = bus.subscribe("s")
    async with trio.open_nursery() as nursery:

        async def publish_later() -> None:
            await trio.sleep(0.05)
            bus.publish("link_up", peer_site="p")

        nursery.start_soon(publish_later)
        with trio.fail_after(timeout(5)):
            (event,) = await sub.next()
    assert event.kind == "link_up"


def test_pool_watch_reports_additions_and_falling_below_the_threshold_once():
    watch = PoolWatch(threshold=10)
    assert watch.reading(20, 1.0) == []  # the first reading is the baseline
    assert watch.reading(25, 2.0) == [
        ("keys_available", {"added": 5, "ready": 25, "newest_at": 2.0})
    ]
    assert watch.reading(9, None) == [("pool_low", {"ready": 9, "threshold": 10})]
    assert watch.reading(5, None) == []  # still low: not again
    assert watch.reading(12, 3.0)[0][0] == "keys_available"
    assert watch.reading(2, None) == [("pool_low", {"ready": 2, "threshold": 10})]


# -- through real daemons ---------------------------------------------------------------------


class Collector:
    """Follows an SAE's events in a thread, as an application would."""

    def __init__(self, socket_path: Path) -> None:
        self.events: list[dict[str, Any]] = []
        self._client = BlockingKeyClient(str(socket_path))
        self._stream = self._client.events()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for event in self._stream:
                self.events.append(event)
        except Exception:  # the daemon went away: the stream ends
            pass

    def wait_for(self, test: Callable[[dict[str, Any]], bool], seconds: float = 30) -> dict:
        deadline = time.monotonic() + timeout(seconds)
        while time.monotonic() < deadline:
            for event in list(self.events):
                if test(event):
                    return event
            time.sleep(0.05)
        raise AssertionError(f"no such event in {[e['event'] for e in self.events]}")


def wait_for_log(path: Path, text: str) -> None:
    deadline = time.monotonic() + timeout(30)
    while text not in path.read_text():
        if time.monotonic() >= deadline:  # only a hang gets here
            raise AssertionError(f"{text!r} not in {path}")
        time.sleep(0.05)


def test_link_and_pool_events_through_real_daemons(tmp_path):
    with running_demo(tmp_path) as (site_a, site_b):
        wait_for_keys(site_a, SITE_B.sae_id, 64, timeout=timeout(60))
        events = Collector(site_a.socket_path)
        wait_for_log(site_a.log_file, "event=api_stream_opened")  # subscribed from here on
        # The daemon notices links going up and down by polling: a session that came and
        # went between two looks is not reported. So restart B, and take the link down only
        # once the new session has been reported.
        site_b.restart(kill=True)
        events.wait_for(lambda e: e["event"] == "link_up")
        wait_for_keys(site_a, SITE_B.sae_id, 64, timeout=timeout(60))
        site_b.process.kill()
        site_b.process.wait(timeout(10))
        down = events.wait_for(lambda e: e["event"] == "link_down")
        assert down["peer_site_ID"] == SITE_B.site_id and down["reason"]
        # With B down nothing refills A's pool: taking most of it makes it low.
        with BlockingKeyClient(str(site_a.socket_path)) as app_a:
            taken = app_a.enc_keys(SITE_B.sae_id, number=60)
        low = events.wait_for(lambda e: e["event"] == "pool_low")
        assert low["master_SAE_ID"] == SITE_A.sae_id and low["ready"] < low["threshold"]
        # B comes back without its state (and, so, without the PSK chain: the operator
        # allows a new bootstrap at A): A withdraws what it shared with B, by key ID.
        shutil.rmtree(tmp_path / SITE_B.directory / "state")
        site_b.spawn()
        allowed = subprocess.run(
            [sys.executable, "-m", "qkdd", "allow-bootstrap", "--config", str(site_a.config_file)]
            + [SITE_B.site_id],
            capture_output=True,
            text=True,
            timeout=timeout(30),
        )
        assert allowed.returncode == 0, allowed.stderr
        events.wait_for(lambda e: e["event"] == "link_up" and e["seq"] > down["seq"])
        withdrawn = events.wait_for(lambda e: e["event"] == "keys_withdrawn")
        assert withdrawn["key_IDs"] and taken[0].key_id not in withdrawn["key_IDs"]
        refill = events.wait_for(
            lambda e: e["event"] == "keys_available" and e["seq"] > withdrawn["seq"]
        )
        assert refill["added"] > 0 and refill["newest_at"] > time.time() - timeout(60)
        assert all(e["seq"] > 0 and e["at"] > 0 for e in events.events)
        assert [e["seq"] for e in events.events] == sorted(e["seq"] for e in events.events)


def _short_lifetime(directory: Path) -> None:
    path = directory / "site-a.toml"
    path.write_text(path.read_text().replace("key_lifetime = 3600", "key_lifetime = 2"))


def test_expired_keys_are_named_and_qkdctl_follows_events(tmp_path, capsys):
    with running_demo(tmp_path, _short_lifetime) as (site_a, _site_b):
        wait_for_keys(site_a, SITE_B.sae_id, 1, timeout=timeout(60))
        argv = ["--socket", str(site_a.socket_path), "events", "--kind", "keys_expired"]
        assert ctl.main([*argv, "--count", "1"]) == 0
        line = capsys.readouterr().out.strip()
        assert '"event":"keys_expired"' in line and '"key_IDs":[' in line
        with BlockingKeyClient(str(site_a.socket_path)) as app_a:
            with pytest.raises(KeyServiceClientError) as info:
                next(app_a.events(["no_such_kind"]))
            assert info.value.status == 400


async def test_a_closed_event_stream_unsubscribes():
    from qkdd.events import event_routes
    from qkdd.http_server.exchange import ApiRequest, Caller, Streamed

    bus = EventBus()
    (route,) = event_routes(bus, lambda sae: sae == "sae-a").values()
    answer = route(
        ApiRequest("GET", "/qkdd/v1/events?kinds=link_up"), Caller(1, 1, frozenset({"sae-a"}))
    )
    assert isinstance(answer, Streamed) and bus.subscriber_count == 1
    chunks = answer.chunks()
    bus.publish("link_up", peer_site="site-b")
    bus.publish("link_down", peer_site="site-b")  # not asked for
    with trio.fail_after(timeout(5)):
        first = await chunks.__anext__()
    assert b'"event":"link_up"' in first and b"link_down" not in first
    await chunks.aclose()  # what the server does when the client goes away
    assert bus.subscriber_count == 0
