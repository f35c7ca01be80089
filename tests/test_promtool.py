"""Prometheus's own linter accepts the daemon's exposition: every family the daemon can
emit is filled in (device figures, quotas, request latencies), then ``promtool check
metrics`` reads it; and what a real daemon serves on its metrics listener ([metrics]), as
Prometheus would scrape it. Debian's ``prometheus`` package ships promtool; `.ci/run`
installs it."""

from __future__ import annotations

import http.client
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from daemon_process import stop_daemon
from qkdd_drivers.base import DeviceStatus
from test_metrics import commit_keys, make_link
from timeouts import timeout

from qkdd.demo import prepare_directory
from qkdd.demo_sites import SITE_B
from qkdd.http_server.exchange import ApiRequest, ApiResponse
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


@pytest.mark.skipif(PROMTOOL is None, reason="promtool missing (Debian package prometheus)")
def test_promtool_accepts_what_a_real_daemon_serves_on_its_metrics_listener(
    tmp_path: Path,
) -> None:
    assert PROMTOOL is not None
    configs = prepare_directory(tmp_path)
    port = free_port()
    config = configs["site-a"]
    config.write_text(config.read_text() + f'\n[metrics]\nlisten = "127.0.0.1:{port}"\n')
    log = tmp_path / "site-a.log"
    with open(log, "wb") as stderr:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "qkdd", "run", "--config", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    try:
        deadline = time.monotonic() + timeout(60)
        while "event=ready" not in log.read_text():
            assert daemon.poll() is None, log.read_text()
            if time.monotonic() >= deadline:  # only a hang gets here
                raise AssertionError(log.read_text())
            time.sleep(0.1)
        status, content_type, body = http_get(port, "/metrics")
        assert status == 200 and content_type.startswith("text/plain; version=0.0.4"), body
        # The key API is not reachable through this listener.
        assert http_get(port, f"/api/v1/keys/{SITE_B.sae_id}/enc_keys")[0] == 404
    finally:
        stop_daemon(daemon)
    text = log.read_text()
    assert daemon.returncode == 0 and "Traceback" not in text, text[-3000:]
    assert f"event=metrics_listening address=127.0.0.1:{port}" in text
    assert b'qkdd_site_info{backend="' in body and b"qkdd_pool_ready_keys{" in body
    proc = subprocess.run(
        [PROMTOOL, "check", "metrics"], input=body, capture_output=True, timeout=timeout(60)
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr).decode()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_get(port: int, path: str) -> tuple[int, str, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout(30))
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.getheader("content-type", ""), response.read()
    finally:
        connection.close()
