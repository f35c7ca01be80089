"""Prometheus's own linter accepts the daemon's exposition: every family the daemon can
emit is filled in (device figures, quotas, request latencies), then ``promtool check
metrics`` reads it. Debian's ``prometheus`` package ships promtool; `.ci/run` installs it."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
from qkdd_drivers.base import DeviceStatus
from test_metrics import commit_keys, make_link

from qkdd.etsi014.handler import ApiRequest, ApiResponse
from qkdd.keystore import KeyStore, StoredQkdKey
from qkdd.metrics import SiteMetrics
from qkdd.quota import QuotaState

PROMTOOL = shutil.which("promtool")


@pytest.mark.skipif(PROMTOOL is None, reason="promtool missing (Debian package prometheus)")
def test_promtool_accepts_every_metric_family(tmp_path: Path) -> None:
    assert PROMTOOL is not None
    store = KeyStore(tmp_path / "keys.sqlite3", os.urandom(32))
    try:
        link = make_link()
        link.session_up = True
        link.device.status = DeviceStatus(
            state="up",
            detail="QKD link up",
            keys_received=10,
            qber=0.02,
            secret_key_rate=400_000.0,
            keys_buffered=3,
        )
        metrics = SiteMetrics("site-a", "cryptography", ["site-b"])
        metrics.watch({"site-b": link}, store)
        metrics.watch_quotas(lambda: {"sae-a": QuotaState(1000, 10)})
        metrics.record_handshake("site-b", "psk", "ok")
        metrics.observe_request(
            ApiRequest("GET", "/api/v1/keys/sae-b/enc_keys"), ApiResponse(200, (), b""), 0.001
        )
        commit_keys(store, 1, 3)
        store.store_qkd_keys("site-b", [StoredQkdKey(str(uuid.uuid4()), os.urandom(32))])
        body, _ = metrics.exposition()
    finally:
        store.close()
    assert b"qkdd_device_secret_key_rate" in body and b"qkdd_api_quota" in body
    proc = subprocess.run(
        [PROMTOOL, "check", "metrics"], input=body, capture_output=True, timeout=60
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr).decode()
