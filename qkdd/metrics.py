"""Prometheus metrics of one daemon, in its own ``CollectorRegistry`` (never the process-wide
default, so several daemons or tests can live in one process).

Two kinds of metric:
- read at scrape time from the live objects (``_SiteCollector``): sessions, QKD devices,
  PSK chains, QKD keys buffered, pool levels per SAE pair. Nothing is duplicated or cached.
- counted as things happen, through ``SiteMetrics``' small recording methods: handshakes,
  hybrid keys made, keys delivered, API requests and their latency.

Label values come from the configuration or from fixed sets only (an unconfigured peer is
"unknown", an odd HTTP method "other"), so no caller can grow the series without bound.
No metric carries key material or key IDs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Final
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)

from qkdd.etsi014.handler import API_PREFIX
from qkdd.etsi014.key_pool import KeyLimits, KeyPool, PoolKey, PoolStatus
from qkdd.http_server.exchange import ApiRequest, ApiResponse
from qkdd.http_server.paths import METRICS_PATH, STATUS_PATH
from qkdd.quota import QuotaState
from qkdd.status import LinkView, StoreView, pool_levels

DEVICE_STATES: Final = ("connecting", "up", "down")
HANDSHAKE_MODES: Final = ("bootstrap", "psk")
# API calls take milliseconds; the upper buckets catch a slow disk or a stalled store.
LATENCY_BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
_METHODS: Final = frozenset({"GET", "POST", "HEAD"})
_ETSI_CALLS: Final = frozenset({"status", "enc_keys", "dec_keys"})
_OWN_ROUTES: Final = {STATUS_PATH: "site_status", METRICS_PATH: "metrics"}


def request_kind(target: str) -> str:
    """The API call a request target names, from a fixed set (a metric label)."""
    try:
        path = urlsplit(target).path
    except ValueError:  # a malformed target (e.g. "http://["), answered 400
        return "other"
    if path.startswith(API_PREFIX):
        call = path.rsplit("/", 1)[-1]
        return call if call in _ETSI_CALLS else "other"
    return _OWN_ROUTES.get(path, "other")


class SiteMetrics:
    """The metrics of one site daemon. ``peers`` are the configured peer site IDs."""

    def __init__(self, site_id: str, backend: str, peers: Iterable[str]) -> None:
        self.registry = CollectorRegistry()
        self._site_id = site_id
        self._backend = backend
        self._peers = frozenset(peers)
        self._handshakes = Counter(
            "qkdd_peer_handshakes",
            "Peer handshakes by peer site, mode (bootstrap, psk) and outcome (ok or why not).",
            ["peer", "mode", "outcome"],
            registry=self.registry,
        )
        self._delivered = Counter(
            "qkdd_api_keys_delivered",
            "Keys handed to applications, by API call (enc_keys, dec_keys) and SAE pair.",
            ["call", "master_sae", "slave_sae"],
            registry=self.registry,
        )
        self._requests = Histogram(
            "qkdd_api_request_duration_seconds",
            "API requests answered, by HTTP method, call and status, and the time to answer.",
            ["method", "kind", "status"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        # Series that exist from the start read 0 rather than "absent".
        for peer in sorted(self._peers):
            for mode in HANDSHAKE_MODES:
                self._handshakes.labels(peer, mode, "ok")

    def watch(self, links: Mapping[str, LinkView], store: StoreView) -> None:
        """Read the links and the store at every scrape from now on."""
        self.registry.register(_SiteCollector(self._site_id, self._backend, links, store))

    def watch_quotas(self, quotas: Callable[[], Mapping[str, QuotaState]]) -> None:
        """Read the SAEs' quotas (``quotas()``: SAE ID -> state) at every scrape."""
        self.registry.register(_QuotaCollector(quotas))

    # -- recording ----------------------------------------------------------------------

    def _peer_label(self, peer: str) -> str:
        return peer if peer in self._peers else "unknown"

    def record_handshake(self, peer: str, mode: str, outcome: str) -> None:
        """A handshake ended: ``outcome`` is "ok" or a word saying why not."""
        mode = mode if mode in HANDSHAKE_MODES else "unknown"
        self._handshakes.labels(self._peer_label(peer), mode, outcome).inc()

    def record_delivered(self, call: str, master_sae: str, slave_sae: str, count: int) -> None:
        if count > 0:
            self._delivered.labels(call, master_sae, slave_sae).inc(count)

    def observe_request(self, request: ApiRequest, response: ApiResponse, seconds: float) -> None:
        """``qkdd.http_server.serving.Observe``: one answered API request."""
        method = request.method if request.method in _METHODS else "other"
        self._requests.labels(method, request_kind(request.target), str(response.status)).observe(
            seconds
        )

    def counting_pool(self, pool: KeyPool) -> KeyPool:
        """``pool``, counting the keys it hands out in ``qkdd_api_keys_delivered``."""
        return _CountingPool(pool, self.record_delivered)

    # -- exposition ---------------------------------------------------------------------

    def exposition(self, accept: str = "") -> tuple[bytes, str]:
        """Every metric in the format the HTTP ``accept`` header asks for, and its content
        type: the Prometheus text format (version 0.0.4) unless OpenMetrics is asked for."""
        encode, content_type = choose_encoder(accept)
        return encode(self.registry), content_type


class _CountingPool:
    """A ``KeyPool`` that reports how many keys each take handed out."""

    def __init__(self, pool: KeyPool, delivered: Callable[[str, str, str, int], None]) -> None:
        self._pool = pool
        self._delivered = delivered

    def status(self, master_sae_id: str, slave_sae_id: str) -> PoolStatus:
        return self._pool.status(master_sae_id, slave_sae_id)

    def limits(self, master_sae_id: str, slave_sae_id: str) -> KeyLimits:
        return self._pool.limits(master_sae_id, slave_sae_id)

    def knows_sae(self, sae_id: str) -> bool:
        return self._pool.knows_sae(sae_id)

    def take_for_master(
        self, master_sae_id: str, slave_sae_id: str, number: int, size_bits: int
    ) -> list[PoolKey]:
        keys = self._pool.take_for_master(master_sae_id, slave_sae_id, number, size_bits)
        self._delivered("enc_keys", master_sae_id, slave_sae_id, len(keys))
        return keys

    def take_for_slave(
        self, master_sae_id: str, slave_sae_id: str, key_ids: Sequence[str]
    ) -> list[PoolKey]:
        keys = self._pool.take_for_slave(master_sae_id, slave_sae_id, key_ids)
        self._delivered("dec_keys", master_sae_id, slave_sae_id, len(keys))
        return keys

    async def take_assigned(
        self,
        master_sae_id: str,
        slave_sae_id: str,
        number: int,
        size_bits: int,
        additional_slave_sae_ids: Sequence[str],
    ) -> list[PoolKey]:
        keys = await self._pool.take_assigned(
            master_sae_id, slave_sae_id, number, size_bits, additional_slave_sae_ids
        )
        self._delivered("enc_keys", master_sae_id, slave_sae_id, len(keys))
        return keys


class _QuotaCollector:
    def __init__(self, quotas: Callable[[], Mapping[str, QuotaState]]) -> None:
        self._quotas = quotas

    def collect(self) -> Iterator[Metric]:
        limit = GaugeMetricFamily(
            "qkdd_api_quota_keys_per_hour",
            "Keys the SAE may take with enc_keys per rolling hour (SAEs with a quota).",
            labels=["sae"],
        )
        remaining = GaugeMetricFamily(
            "qkdd_api_quota_remaining_keys",
            "Keys the SAE may still take with enc_keys in the current rolling hour.",
            labels=["sae"],
        )
        for sae, state in sorted(self._quotas().items()):
            if state.limit is not None and state.remaining is not None:
                limit.add_metric([sae], state.limit)
                remaining.add_metric([sae], state.remaining)
        yield from (limit, remaining)


class _SiteCollector:
    """Metrics read from the links and the store at scrape time."""

    def __init__(
        self, site_id: str, backend: str, links: Mapping[str, LinkView], store: StoreView
    ) -> None:
        self._site_id = site_id
        self._backend = backend
        self._links = links
        self._store = store

    def collect(self) -> Iterator[Metric]:
        info = InfoMetricFamily("qkdd_site", "This site's ID and its post-quantum backend.")
        info.add_metric([], {"site_id": self._site_id, "backend": self._backend})
        yield info

        peer = ["peer"]
        session_up = GaugeMetricFamily(
            "qkdd_peer_session_up",
            "1 while an authenticated session with the peer runs.",
            labels=peer,
        )
        sessions = CounterMetricFamily(
            "qkdd_peer_sessions_established",
            "Authenticated sessions established with the peer since the daemon started.",
            labels=peer,
        )
        chain = GaugeMetricFamily(
            "qkdd_peer_psk_chain_established",
            "1 once a QKD-derived PSK with the peer exists (signature bootstrap then refused).",
            labels=peer,
        )
        buffered = GaugeMetricFamily(
            "qkdd_qkd_keys_buffered",
            "QKD keys received from the device and stored here, not yet used.",
            labels=peer,
        )
        device_state = GaugeMetricFamily(
            "qkdd_device_state",
            "1 for the QKD device's current state (connecting, up, down), else 0.",
            labels=["peer", "state"],
        )
        received = CounterMetricFamily(
            "qkdd_device_keys_received",
            "QKD keys received from the device since the daemon started.",
            labels=peer,
        )
        qber = GaugeMetricFamily(
            "qkdd_device_qber", "Quantum bit error rate reported by the device (0..1).", labels=peer
        )
        rate = GaugeMetricFamily(
            # Prometheus base units are bytes, not bits (promtool checks it).
            "qkdd_device_secret_key_rate_bytes_per_second",
            "Secret key rate reported by the device, in bytes of final key per second.",
            labels=peer,
        )
        device_buffer = GaugeMetricFamily(
            "qkdd_device_keys_buffered",
            "Keys held in the device's own buffer, as it reports.",
            labels=peer,
        )
        pool_size = GaugeMetricFamily(
            "qkdd_pool_size_keys", "Configured number of ready keys kept per SAE pair.", labels=peer
        )
        made = CounterMetricFamily(
            "qkdd_hybrid_keys_made",
            "Hybrid keys agreed with the peer site and made ready here (kept in the store).",
            labels=peer,
        )
        ready = GaugeMetricFamily(
            "qkdd_pool_ready_keys",
            "Ready hybrid keys held here for the SAE pair.",
            labels=["peer", "master_sae", "slave_sae"],
        )
        quarantined = GaugeMetricFamily(
            "qkdd_store_rows_quarantined",
            "Sealed key store rows that did not open (damaged on disk) and were set aside.",
        )
        quarantined.add_metric([], self._store.quarantined_row_count())
        for site, link in self._links.items():
            status = link.device.status
            session_up.add_metric([site], 1.0 if link.session_up else 0.0)
            sessions.add_metric([site], link.sessions_established)
            chain.add_metric([site], 1.0 if self._store.chain_established(site) else 0.0)
            buffered.add_metric([site], self._store.qkd_key_count(site))
            made.add_metric([site], self._store.hybrid_keys_made(site))
            states = DEVICE_STATES if status.state in DEVICE_STATES else (*DEVICE_STATES, "other")
            current = status.state if status.state in DEVICE_STATES else "other"
            for state in states:
                device_state.add_metric([site, state], 1.0 if state == current else 0.0)
            received.add_metric([site], status.keys_received)
            if status.qber is not None:
                qber.add_metric([site], status.qber)
            if status.secret_key_rate is not None:
                rate.add_metric([site], status.secret_key_rate / 8)
            if status.keys_buffered is not None:
                device_buffer.add_metric([site], status.keys_buffered)
            pool_size.add_metric([site], link.params.pool_size)
            for level in pool_levels(link, self._store):
                ready.add_metric([site, level.master_sae_id, level.slave_sae_id], level.ready)
        yield from (session_up, sessions, chain, buffered, device_state, received, qber, rate)
        yield from (device_buffer, pool_size, made, ready, quarantined)
