"""The daemon's Prometheus metrics: scrape-time gauges read from a real key store and link
objects, counters fed through the real request handler and a real Unix-socket server, and the
exposition parsed back with prometheus_client's own parser."""

from __future__ import annotations

import base64
import json
import os
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
import trio
from key_blocks import random_block
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families
from qkdd_drivers.base import DeviceStatus

from qkdd.admin import METRICS_PATH, admin_routes
from qkdd.client import KeyClient
from qkdd.etsi014.handler import RequestHandler
from qkdd.etsi014.memory_pool import MemoryKeyPool
from qkdd.http_server.exchange import ApiRequest, ApiResponse, Caller
from qkdd.http_server.unix_socket import serve_unix
from qkdd.keystore import KeyStore, StoredQkdKey
from qkdd.link_params import LinkParameters
from qkdd.metrics import SiteMetrics, request_kind

A, B = "sae-a", "sae-b"
ANYONE = Caller(1000, 1000, frozenset())


def samples(metrics: SiteMetrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of the exposition, by (sample name, labels)."""
    body, content_type = metrics.exposition()
    assert content_type.startswith("text/plain; version=")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


def value(metrics: SiteMetrics, name: str, **labels: str) -> float | None:
    return samples(metrics).get((name, frozenset(labels.items())))


def make_link(peer: str = "site-b", *, local: str = "site-a") -> SimpleNamespace:
    params = LinkParameters(
        local_site_id=local,
        peer_site_id=peer,
        local_sae_ids=frozenset({A}),
        remote_sae_ids=frozenset({B}),
        key_size_bits=256,
        pool_size=64,
    )
    return SimpleNamespace(
        params=params,
        device=SimpleNamespace(status=DeviceStatus(state="connecting", detail="not started")),
        session_up=False,
        last_error="no session yet",
        sessions_established=0,
        why_unavailable=lambda: "no session",
    )


@pytest.fixture
def store(tmp_path: Path) -> KeyStore:
    store = KeyStore(tmp_path / "keys.sqlite3", os.urandom(32))
    yield store
    store.close()


def commit_keys(store: KeyStore, batch_id: int, count: int, pair: tuple[str, str] = (A, B)) -> None:
    store.add_batch("site-b", batch_id, [random_block(count, *pair)], [])
    store.commit_batch("site-b", batch_id)


def test_live_gauges_follow_the_links_and_the_store(store: KeyStore) -> None:
    link = make_link()
    metrics = SiteMetrics("site-a", "cryptography", ["site-b"])
    metrics.watch({"site-b": link}, store)

    assert value(metrics, "qkdd_site_info", site_id="site-a", backend="cryptography") == 1
    assert value(metrics, "qkdd_pool_ready_keys", peer="site-b", master_sae=A, slave_sae=B) == 0
    assert value(metrics, "qkdd_pool_ready_keys", peer="site-b", master_sae=B, slave_sae=A) == 0
    assert value(metrics, "qkdd_pool_size_keys", peer="site-b") == 64
    assert value(metrics, "qkdd_peer_session_up", peer="site-b") == 0
    assert value(metrics, "qkdd_device_state", peer="site-b", state="connecting") == 1
    assert value(metrics, "qkdd_device_state", peer="site-b", state="up") == 0
    # Figures the device has not reported are absent, not 0.
    assert value(metrics, "qkdd_device_qber", peer="site-b") is None

    store.store_qkd_keys("site-b", [StoredQkdKey(str(uuid.uuid4()), os.urandom(32))] * 1)
    store.store_qkd_keys("site-b", [StoredQkdKey(str(uuid.uuid4()), os.urandom(32))])
    commit_keys(store, 1, 5)
    commit_keys(store, 2, 2, pair=(B, A))
    link.session_up = True
    link.sessions_established = 3
    link.device.status = DeviceStatus(
        state="up",
        detail="QKD link up",
        keys_received=1540,
        qber=0.0125,
        secret_key_rate=394_860.0,
        keys_buffered=17,
    )

    assert value(metrics, "qkdd_pool_ready_keys", peer="site-b", master_sae=A, slave_sae=B) == 5
    assert value(metrics, "qkdd_pool_ready_keys", peer="site-b", master_sae=B, slave_sae=A) == 2
    assert value(metrics, "qkdd_qkd_keys_buffered", peer="site-b") == 2
    assert value(metrics, "qkdd_peer_session_up", peer="site-b") == 1
    assert value(metrics, "qkdd_peer_sessions_established_total", peer="site-b") == 3
    assert value(metrics, "qkdd_device_state", peer="site-b", state="up") == 1
    assert value(metrics, "qkdd_device_state", peer="site-b", state="connecting") == 0
    assert value(metrics, "qkdd_device_qber", peer="site-b") == pytest.approx(0.0125)
    assert value(
        metrics, "qkdd_device_secret_key_rate_bytes_per_second", peer="site-b"
    ) == pytest.approx(394_860.0 / 8)
    assert value(metrics, "qkdd_device_keys_buffered", peer="site-b") == 17
    assert value(metrics, "qkdd_device_keys_received_total", peer="site-b") == 1540
    assert value(metrics, "qkdd_peer_psk_chain_established", peer="site-b") == 0

    store.add_batch("site-b", 3, [], [], [StoredQkdKey(str(uuid.uuid4()), os.urandom(32))])
    store.commit_batch("site-b", 3)
    assert value(metrics, "qkdd_peer_psk_chain_established", peer="site-b") == 1
    # Handing keys out lowers the level at the next scrape.
    store.take_ready(A, B, 4)
    assert value(metrics, "qkdd_pool_ready_keys", peer="site-b", master_sae=A, slave_sae=B) == 1


def test_an_unexpected_device_state_is_shown_as_other(store: KeyStore) -> None:
    link = make_link()
    link.device.status = DeviceStatus(state="resetting", detail="?")
    metrics = SiteMetrics("site-a", "cryptography", ["site-b"])
    metrics.watch({"site-b": link}, store)
    assert value(metrics, "qkdd_device_state", peer="site-b", state="other") == 1
    assert value(metrics, "qkdd_device_state", peer="site-b", state="up") == 0


def enc_request(number: int) -> ApiRequest:
    return ApiRequest(
        "POST", f"/api/v1/keys/{B}/enc_keys", body=json.dumps({"number": number}).encode()
    )


def test_delivered_keys_are_counted_by_call_and_pair() -> None:
    metrics = SiteMetrics("site-a", "cryptography", ["site-b"])
    pool = MemoryKeyPool([A, B])
    pool.fill(A, B, 5)
    handler = RequestHandler(metrics.counting_pool(pool))
    master, slave = Caller(1, 1, frozenset({A})), Caller(2, 2, frozenset({B}))
    enc = "qkdd_api_keys_delivered_total"
    assert value(metrics, enc, call="enc_keys", master_sae=A, slave_sae=B) is None

    sent = handler.handle(enc_request(3), master)
    assert sent.status == 200
    assert value(metrics, enc, call="enc_keys", master_sae=A, slave_sae=B) == 3
    # A refused request (only 2 keys left) delivers, and counts, nothing.
    assert handler.handle(enc_request(3), master).status == 503
    assert value(metrics, enc, call="enc_keys", master_sae=A, slave_sae=B) == 3

    keys = json.loads(sent.body)["keys"]
    ids = {"key_IDs": [{"key_ID": k["key_ID"]} for k in keys[:2]]}
    got = handler.handle(
        ApiRequest("POST", f"/api/v1/keys/{A}/dec_keys", body=json.dumps(ids).encode()), slave
    )
    assert got.status == 200
    assert value(metrics, enc, call="dec_keys", master_sae=A, slave_sae=B) == 2
    assert value(metrics, enc, call="enc_keys", master_sae=A, slave_sae=B) == 3

    # Neither key material nor key IDs reach the exposition.
    text = metrics.exposition()[0].decode()
    for key in keys:
        assert key["key_ID"] not in text
        assert key["key"] not in text
        assert base64.b64decode(key["key"]).hex() not in text


def test_handshakes_and_keys_made_are_counted_with_bounded_labels() -> None:
    metrics = SiteMetrics("site-a", "cryptography", ["site-b"])
    total = "qkdd_peer_handshakes_total"
    # Configured peers start at 0 for each mode's success.
    assert value(metrics, total, peer="site-b", mode="bootstrap", outcome="ok") == 0
    assert value(metrics, total, peer="site-b", mode="psk", outcome="ok") == 0
    metrics.record_handshake("site-b", "bootstrap", "ok")
    metrics.record_handshake("site-b", "psk", "timeout")
    metrics.record_handshake("site-b", "psk", "timeout")
    # A name the peer claims, or a mode nobody defined, never becomes a new label value.
    metrics.record_handshake("mallory-1", "psk", "authentication_failed")
    metrics.record_handshake("mallory-2", "nonsense", "authentication_failed")

    assert value(metrics, total, peer="site-b", mode="bootstrap", outcome="ok") == 1
    assert value(metrics, total, peer="site-b", mode="psk", outcome="timeout") == 2
    assert value(metrics, total, peer="unknown", mode="psk", outcome="authentication_failed") == 1
    assert (
        value(metrics, total, peer="unknown", mode="unknown", outcome="authentication_failed") == 1
    )
    assert "mallory" not in metrics.exposition()[0].decode()


def test_keys_made_are_counted_by_the_store_across_restarts(tmp_path: Path) -> None:
    kek = os.urandom(32)
    store = KeyStore(tmp_path / "keys.sqlite3", kek)
    metrics = SiteMetrics("site-a", "cryptography", ["site-b"])
    metrics.watch({"site-b": make_link()}, store)
    assert value(metrics, "qkdd_hybrid_keys_made_total", peer="site-b") == 0
    commit_keys(store, 1, 64)
    store.commit_batch("site-b", 1)  # committing again (a RESYNC) makes nothing new
    assert value(metrics, "qkdd_hybrid_keys_made_total", peer="site-b") == 64
    store.close()
    store = KeyStore(tmp_path / "keys.sqlite3", kek)
    again = SiteMetrics("site-a", "cryptography", ["site-b"])
    again.watch({"site-b": make_link()}, store)
    commit_keys(store, 2, 8)
    assert value(again, "qkdd_hybrid_keys_made_total", peer="site-b") == 72
    store.close()


def test_each_daemon_has_its_own_registry() -> None:
    one = SiteMetrics("site-a", "cryptography", ["site-b"])
    two = SiteMetrics("site-a", "cryptography", ["site-b"])
    one.record_handshake("site-b", "bootstrap", "ok")
    total = "qkdd_peer_handshakes_total"
    assert value(one, total, peer="site-b", mode="bootstrap", outcome="ok") == 1
    assert value(two, total, peer="site-b", mode="bootstrap", outcome="ok") == 0
    # Nothing lands in the process-wide default registry.
    assert b"qkdd_" not in generate_latest(REGISTRY)


@pytest.mark.parametrize(
    ("target", "kind"),
    [
        ("/api/v1/keys/sae-b/status", "status"),
        ("/api/v1/keys/sae-b/enc_keys?number=2", "enc_keys"),
        ("/api/v1/keys/sae-a/dec_keys", "dec_keys"),
        ("/api/v1/keys/sae-a/frobnicate", "other"),
        ("/qkdd/v1/status", "site_status"),
        ("/qkdd/v1/metrics?x=1", "metrics"),
        ("/qkdd/v1/whatever", "other"),
        ("/", "other"),
    ],
)
def test_request_kind(target: str, kind: str) -> None:
    assert request_kind(target) == kind


async def test_request_latency_is_observed_by_the_unix_socket_server(tmp_path: Path) -> None:
    metrics = SiteMetrics("site-a", "cryptography", ["site-b"])
    pool = MemoryKeyPool([A, B])
    pool.fill(A, B, 4)
    routes = admin_routes(lambda: {"site_id": "site-a"}, metrics.exposition)
    handler = RequestHandler(metrics.counting_pool(pool), extensions=routes)
    path = str(tmp_path / "api.sock")
    async with trio.open_nursery() as nursery:
        await nursery.start(
            lambda task_status: serve_unix(
                path,
                handler,
                lambda uid, gid: frozenset({A}),
                observe=metrics.observe_request,
                task_status=task_status,
            )
        )
        async with KeyClient(path) as client:
            await client.status(B)
            await client.status(B)
            await client.enc_keys(B, number=2)
            assert (await client.request("PUT", f"/api/v1/keys/{B}/enc_keys", b"{}"))[0] == 405
            assert (await client.request("BREW", "/qkdd/v1/status", None))[0] == 405
            text = await client.metrics()
        nursery.cancel_scope.cancel()

    hist = "qkdd_api_request_duration_seconds"
    assert value(metrics, f"{hist}_count", method="GET", kind="status", status="200") == 2
    assert value(metrics, f"{hist}_count", method="POST", kind="enc_keys", status="200") == 1
    assert value(metrics, f"{hist}_count", method="other", kind="enc_keys", status="405") == 1
    assert value(metrics, f"{hist}_count", method="other", kind="site_status", status="405") == 1
    assert value(metrics, f"{hist}_count", method="GET", kind="metrics", status="200") == 1
    assert value(metrics, f"{hist}_sum", method="GET", kind="status", status="200") > 0
    # Every request falls in the +Inf bucket; the buckets are cumulative.
    assert (
        value(metrics, f"{hist}_bucket", method="GET", kind="status", status="200", le="+Inf") == 2
    )
    # The scrape served over the socket was taken before its own request was observed.
    served = {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    key = (f"{hist}_count", frozenset({"method": "GET", "kind": "status", "status": "200"}.items()))
    assert served[key] == 2
    assert (
        "qkdd_api_keys_delivered_total",
        frozenset({"call": "enc_keys", "master_sae": A, "slave_sae": B}.items()),
    ) in served


async def test_a_failing_observer_costs_no_answer(tmp_path: Path) -> None:
    def broken(request: ApiRequest, response: ApiResponse, seconds: float) -> None:
        raise RuntimeError("metrics are down")

    pool = MemoryKeyPool([A, B])
    path = str(tmp_path / "api.sock")
    async with trio.open_nursery() as nursery:
        await nursery.start(
            lambda task_status: serve_unix(
                path,
                RequestHandler(pool),
                lambda uid, gid: frozenset({A}),
                observe=broken,
                task_status=task_status,
            )
        )
        async with KeyClient(path) as client:
            assert (await client.status(B))["stored_key_count"] == 0
            assert (await client.status(B))["stored_key_count"] == 0
        nursery.cancel_scope.cancel()


def test_metrics_route_serves_the_exposition_with_its_content_type() -> None:
    metrics = SiteMetrics("site-a", "cryptography", ["site-b"])
    metrics.record_handshake("site-b", "psk", "ok")
    handler = RequestHandler(
        MemoryKeyPool([A, B]), extensions=admin_routes(lambda: {}, metrics.exposition)
    )
    response = handler.handle(ApiRequest("GET", METRICS_PATH), ANYONE)
    assert response.status == 200
    assert dict(response.headers)["content-type"].startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(response.body.decode())}
    assert families["qkdd_peer_handshakes"].type == "counter"
    assert families["qkdd_api_request_duration_seconds"].type == "histogram"
    # A scraper asking for OpenMetrics gets it.
    openmetrics = handler.handle(
        ApiRequest(
            "GET",
            METRICS_PATH,
            headers=(("accept", "application/openmetrics-text; version=1.0.0"),),
        ),
        ANYONE,
    )
    content_type = dict(openmetrics.headers)["content-type"]
    assert content_type.startswith("application/openmetrics-text; version=1.0.0")
    assert openmetrics.body.endswith(b"# EOF\n")
    parsed = {f.name: f for f in openmetrics_families(openmetrics.body.decode())}
    totals = {
        s.labels["mode"]: s.value
        for s in parsed["qkdd_peer_handshakes"].samples
        if s.name == "qkdd_peer_handshakes_total"
    }
    assert totals == {"psk": 1, "bootstrap": 0}
