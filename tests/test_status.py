"""The site status: the snapshot built from links and a real key store, the recent-errors
ring, the /qkdd/v1/ routes as handler extensions, qkdctl's site view, and the whole chain
through two real site daemons."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
from key_blocks import random_block
from prometheus_client.parser import text_string_to_metric_families
from qkdd_drivers.base import DeviceStatus
from timeouts import timeout

from qkdd.admin import METRICS_PATH, STATUS_PATH, admin_routes
from qkdd.client import BlockingKeyClient
from qkdd.ctl import main, render_site_status
from qkdd.demo import exchange_keys, running_demo, wait_for_keys
from qkdd.demo_sites import SITE_A, SITE_B
from qkdd.etsi014.handler import RequestHandler
from qkdd.etsi014.memory_pool import MemoryKeyPool
from qkdd.http_server.exchange import ApiRequest, Caller
from qkdd.keystore import KeyStore, StoredQkdKey
from qkdd.link_params import LinkParameters
from qkdd.status import MAX_MESSAGE_CHARS, RecentErrors, site_status

A, B = "sae-a", "sae-b"


def make_link(*, local: str, peer: str, up: bool) -> SimpleNamespace:
    params = LinkParameters(
        local_site_id=local,
        peer_site_id=peer,
        local_sae_ids=frozenset({A}),
        remote_sae_ids=frozenset({B}),
        key_size_bits=256,
        pool_size=32,
    )
    return SimpleNamespace(
        params=params,
        device=SimpleNamespace(
            status=DeviceStatus(
                state="up",
                detail="QKD link up",
                keys_received=12,
                qber=0.02,
                secret_key_rate=1500.0,
                keys_buffered=None,
            )
        ),
        session_up=up,
        last_error="cannot reach 127.0.0.1:1 (Connection refused)",
        sessions_established=2 if up else 0,
        why_unavailable=lambda: None if up else "no authenticated session with site x",
    )


@pytest.fixture
def store(tmp_path: Path) -> KeyStore:
    store = KeyStore(tmp_path / "keys.sqlite3", os.urandom(32))
    yield store
    store.close()


def test_site_status_reads_links_and_store(store: KeyStore) -> None:
    links = {
        "site-b": make_link(local="site-a", peer="site-b", up=True),
        "site-0": make_link(local="site-a", peer="site-0", up=False),
    }
    keys = [random_block(3, A, B)]
    store.add_batch("site-b", 1, keys, [], [StoredQkdKey(str(uuid.uuid4()), os.urandom(32))])
    store.commit_batch("site-b", 1)
    store.store_qkd_keys("site-0", [StoredQkdKey(str(uuid.uuid4()), os.urandom(32))])
    events = [{"time": 1.0, "level": "WARNING", "logger": "qkdd.peer", "message": "m"}]

    status = site_status(
        site_id="site-a",
        backend="cryptography",
        links=links,
        store=store,
        recent_errors=events,
        now=42.0,
    )

    json.dumps(status)  # JSON-able as it is
    assert (status["site_id"], status["backend"], status["time"]) == ("site-a", "cryptography", 42)
    assert list(status["peers"]) == ["site-b", "site-0"]
    up, down = status["peers"]["site-b"], status["peers"]["site-0"]
    assert (up["role"], up["session"], up["sessions_established"]) == ("master", "up", 2)
    assert up["last_error"] is None and up["keys_unavailable_because"] is None
    assert up["psk_chain_established"] is True and down["psk_chain_established"] is False
    assert (down["role"], down["session"]) == ("slave", "down")
    assert down["last_error"] == "cannot reach 127.0.0.1:1 (Connection refused)"
    assert down["keys_unavailable_because"] == "no authenticated session with site x"
    assert up["device"] == {
        "state": "up",
        "detail": "QKD link up",
        "keys_received": 12,
        "qber": 0.02,
        "secret_key_rate_bps": 1500.0,
        "keys_buffered": None,
    }
    assert (up["qkd_keys_buffered"], down["qkd_keys_buffered"]) == (0, 1)
    assert up["pool_size"] == 32
    assert up["pools"] == [
        {"master_SAE_ID": A, "slave_SAE_ID": B, "ready": 3, "taken_with": "enc_keys"},
        {"master_SAE_ID": B, "slave_SAE_ID": A, "ready": 0, "taken_with": "dec_keys"},
    ]
    assert status["recent_errors"] == events


def test_recent_errors_keeps_the_last_warnings_of_qkdd_loggers() -> None:
    ring = RecentErrors(capacity=3)
    outside = logging.getLogger("somebody.else")
    with ring.installed("qkdd"):
        logging.getLogger("qkdd.peer").info("event=fine")
        for n in range(5):
            logging.getLogger("qkdd.peer").warning("event=session_ended n=%d", n)
        logging.getLogger("qkdd.api").error("event=broken %s", "x" * (2 * MAX_MESSAGE_CHARS))
        outside.error("not ours")
    logging.getLogger("qkdd.peer").error("after removal")

    events = ring.events()
    assert [e["message"] for e in events[:2]] == [
        "event=session_ended n=3",
        "event=session_ended n=4",
    ]
    assert [e["level"] for e in events] == ["WARNING", "WARNING", "ERROR"]
    assert [e["logger"] for e in events] == ["qkdd.peer", "qkdd.peer", "qkdd.api"]
    assert len(events[2]["message"]) == MAX_MESSAGE_CHARS and events[2]["message"].endswith("...")
    assert set(events[0]) == {"time", "level", "logger", "message"}


def handler_with_routes(status: dict[str, object]) -> RequestHandler:
    pool = MemoryKeyPool([A, B])
    pool.fill(A, B, 2)
    return RequestHandler(
        pool, extensions=admin_routes(lambda: status, lambda accept: (b"m 1\n", "text/plain"))
    )


NOBODY = Caller(1234, 1234, frozenset())  # admitted by the socket, but no SAE


def test_status_route_answers_any_caller_and_etsi_routes_are_untouched() -> None:
    handler = handler_with_routes({"site_id": "site-a", "peers": {}})
    got = handler.handle(ApiRequest("GET", STATUS_PATH), NOBODY)
    assert got.status == 200 and dict(got.headers)["content-type"] == "application/json"
    assert json.loads(got.body) == {"site_id": "site-a", "peers": {}}
    assert handler.handle(ApiRequest("GET", f"{STATUS_PATH}?verbose=1"), NOBODY).status == 200
    assert handler.handle(ApiRequest("HEAD", METRICS_PATH), NOBODY).status == 200

    # The ETSI API still asks who the caller is.
    assert handler.handle(ApiRequest("GET", f"/api/v1/keys/{B}/status"), NOBODY).status == 401
    master = Caller(1, 1, frozenset({A}))
    etsi = handler.handle(ApiRequest("GET", f"/api/v1/keys/{B}/status"), master)
    assert etsi.status == 200 and json.loads(etsi.body)["stored_key_count"] == 2


def test_unknown_and_misused_extension_paths() -> None:
    handler = handler_with_routes({})
    missing = handler.handle(ApiRequest("GET", "/qkdd/v1/secrets"), NOBODY)
    assert missing.status == 404 and "no such resource" in json.loads(missing.body)["message"]
    post = handler.handle(ApiRequest("POST", STATUS_PATH, body=b"{}"), NOBODY)
    assert post.status == 405 and dict(post.headers)["allow"] == "GET, HEAD"
    assert handler.handle(ApiRequest("DELETE", METRICS_PATH), NOBODY).status == 405
    # Without extensions, the prefix is simply not served.
    plain = RequestHandler(MemoryKeyPool([A, B]))
    assert plain.handle(ApiRequest("GET", STATUS_PATH), NOBODY).status == 404
    with pytest.raises(ValueError, match="/qkdd/"):
        RequestHandler(MemoryKeyPool([A]), extensions={"/api/v1/keys/x/status": lambda r, c: 0})


def test_human_view_shows_links_devices_pools_and_errors(store: KeyStore) -> None:
    links = {
        "site-b": make_link(local="site-a", peer="site-b", up=True),
        "site-0": make_link(local="site-a", peer="site-0", up=False),
    }
    events = [
        {"time": 0.0, "level": "ERROR", "logger": "qkdd.peer", "message": "event=boom peer=x"}
    ]
    text = render_site_status(
        site_status(
            site_id="site-a", backend="cryptography", links=links, store=store, recent_errors=events
        )
    )
    assert text.startswith("site site-a   backend cryptography")
    assert "peer site-b (this site is the link master)" in text
    assert "peer site-0 (this site is the link slave)" in text
    assert "session       up, 2 established so far\n" in text
    assert "down, 0 established so far; last error: cannot reach 127.0.0.1:1" in text
    assert "QBER 2.00 %, secret key rate 1.50 kbit/s, 12 keys received" in text
    assert "sae-a -> sae-b" in text and "(enc_keys here)" in text and "(dec_keys here)" in text
    assert "not being made: no authenticated session with site x" in text
    assert "ERROR qkdd.peer: event=boom peer=x" in text

    quiet = render_site_status(
        site_status(site_id="site-z", backend="oqs", links={}, store=store, recent_errors=[])
    )
    assert "no peers configured" in quiet and "recent errors (oldest first)\n  none\n" in quiet
    assert "WireGuard" not in quiet and "set aside" not in quiet


def test_human_view_shows_wireguard_bindings_and_quarantined_rows(store: KeyStore) -> None:
    binding = {
        "binding": "tunnel-b",
        "interface": "wg0",
        "peer_site": "site-b",
        "role": "master",
        "state": "failed-closed",
        "key_id": None,
        "last_fresh_install": 0.0,
        "consecutive_failures": 3,
        "last_error": "no session with site site-b",
    }
    site = site_status(
        site_id="site-a",
        backend="cryptography",
        links={},
        store=store,
        recent_errors=[],
        wireguard=[binding],
    )
    site["store_rows_quarantined"] = 2
    text = render_site_status(site)
    assert "WireGuard PSKs\n  tunnel-b       wg0 <-> site-b (master): failed-closed" in text
    assert "3 failed attempts; last error: no session with site site-b" in text
    assert "2 sealed rows did not open" in text


def test_site_commands_refuse_the_tls_url(capsys: pytest.CaptureFixture[str]) -> None:
    for command in (["status"], ["metrics"]):
        assert main(["--url", "https://kme.example:8443", "--cert", "c.pem", *command]) == 2
        assert "local socket only" in capsys.readouterr().err


def qkdctl(socket_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qkdd.ctl", "--socket", str(socket_path), *args],
        capture_output=True,
        text=True,
        timeout=timeout(30),
    )


def scrape(socket_path: Path) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    with BlockingKeyClient(str(socket_path)) as client:
        text = client.metrics()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_two_real_sites_report_links_pools_and_counters(tmp_path: Path) -> None:
    with running_demo(tmp_path) as (site_a, site_b):
        wait_for_keys(site_a, SITE_B.sae_id, 4, timeout=timeout(30))
        rows = exchange_keys(site_a, site_b, 4)
        assert all(row["match"] for row in rows)

        views = {}
        for site in (site_a, site_b):
            done = qkdctl(site.socket_path, "status", "--json")
            assert done.returncode == 0, done.stderr
            views[site.site.site_id] = json.loads(done.stdout)
        link_ab = views["site-a"]["peers"]["site-b"]
        link_ba = views["site-b"]["peers"]["site-a"]
        assert (link_ab["session"], link_ab["role"]) == ("up", "master")
        assert (link_ba["session"], link_ba["role"]) == ("up", "slave")
        for link in (link_ab, link_ba):
            assert link["device"]["state"] == "up" and link["psk_chain_established"]
            assert {(p["master_SAE_ID"], p["slave_SAE_ID"]) for p in link["pools"]} == {
                (SITE_A.sae_id, SITE_B.sae_id),
                (SITE_B.sae_id, SITE_A.sae_id),
            }
            assert any(p["ready"] > 0 for p in link["pools"])

        human = qkdctl(site_a.socket_path, "status")
        assert human.returncode == 0, human.stderr
        assert "peer site-b (this site is the link master)" in human.stdout
        # With an SAE ID, `status` is still the standard's Status object.
        etsi = qkdctl(site_a.socket_path, "status", SITE_B.sae_id)
        assert etsi.returncode == 0 and "stored_key_count" in json.loads(etsi.stdout)

        delivered = "qkdd_api_keys_delivered_total"
        pair = {"master_sae": SITE_A.sae_id, "slave_sae": SITE_B.sae_id}
        at_a, at_b = scrape(site_a.socket_path), scrape(site_b.socket_path)
        assert at_a[(delivered, frozenset({"call": "enc_keys", **pair}.items()))] >= 4
        assert at_b[(delivered, frozenset({"call": "dec_keys", **pair}.items()))] >= 4
        handshakes = "qkdd_peer_handshakes_total"
        for metrics, peer in ((at_a, "site-b"), (at_b, "site-a")):
            bootstrap = {
                labels: count
                for (name, labels), count in metrics.items()
                if name == handshakes and dict(labels)["mode"] == "bootstrap"
            }
            assert bootstrap == {
                frozenset({"peer": peer, "mode": "bootstrap", "outcome": "ok"}.items()): 1
            }
            assert metrics[("qkdd_peer_session_up", frozenset({"peer": peer}.items()))] == 1
        requests = "qkdd_api_request_duration_seconds_count"
        enc_ok = frozenset({"method": "POST", "kind": "enc_keys", "status": "200"}.items())
        assert at_a[(requests, enc_ok)] >= 1

        printed = qkdctl(site_b.socket_path, "metrics")
        assert printed.returncode == 0 and "# TYPE qkdd_peer_handshakes_total counter" in (
            printed.stdout
        )
