"""The daemon as systemd runs it: readiness, status and watchdog through a real
NOTIFY_SOCKET, SIGHUP reload, and the API socket passed by systemd-socket-activate."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from timeouts import timeout, wait_until

from qkdd.client import BlockingKeyClient
from qkdd.demo import prepare_directory, start_emulator
from qkdd.demo_sites import SITE_B


@pytest.fixture
def site_a(tmp_path):
    """Site A's files; its QKD device is an emulator pty, its peer is absent."""
    configs = prepare_directory(tmp_path)
    emulator = start_emulator(tmp_path)
    yield configs["site-a"]
    emulator.terminate()
    emulator.wait(timeout=timeout(10))


@pytest.fixture
def notify_socket(tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify.sock"
    sock.bind(str(path))
    sock.settimeout(timeout(20))
    yield sock, path
    sock.close()


def receive_until(sock, predicate, seconds=20.0):
    seen = []
    deadline = time.monotonic() + timeout(seconds)
    while time.monotonic() < deadline:
        try:
            seen.append(sock.recv(4096).decode())
        except TimeoutError:
            break
        if predicate(seen):
            return seen
    raise AssertionError(f"notifications so far: {seen}")


def start(config: Path, env_extra: dict[str, str], log: Path, prefix=()) -> subprocess.Popen:
    env = {**os.environ, **env_extra}
    with open(log, "wb") as handle:
        return subprocess.Popen(
            [*prefix, sys.executable, "-m", "qkdd", "run", "--config", str(config)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=handle,
        )


def test_ready_status_watchdog_and_stopping(site_a, notify_socket, tmp_path):
    sock, path = notify_socket
    daemon = start(
        site_a,
        {"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "400000", "WATCHDOG_PID": ""},
        tmp_path / "a.log",
    )
    try:
        seen = receive_until(sock, lambda s: sum("WATCHDOG=1" in m for m in s) >= 3)
        assert any(m.startswith("READY=1") for m in seen)
        assert any("STATUS=" in m and "site-b" in m for m in seen)
        # READY comes once the API socket answers: a status call works right away.
        with BlockingKeyClient(str(tmp_path / "site-a" / "api.sock")) as client:
            assert client.status(SITE_B.sae_id)["stored_key_count"] == 0
    finally:
        daemon.send_signal(signal.SIGTERM)
    seen = receive_until(sock, lambda s: any("STOPPING=1" in m for m in s))
    assert daemon.wait(timeout=timeout(20)) == 0


def test_no_notifications_without_systemd(site_a, tmp_path):
    daemon = start(site_a, {}, tmp_path / "a.log")
    try:
        log = tmp_path / "a.log"
        wait_until(lambda: "event=ready" in log.read_text(), "event=ready", 20, log.read_text)
    finally:
        daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(timeout=timeout(20)) == 0


def test_sighup_applies_what_it_can_and_names_the_rest(site_a, notify_socket, tmp_path):
    sock, path = notify_socket
    log = tmp_path / "a.log"
    daemon = start(site_a, {"NOTIFY_SOCKET": str(path)}, log)
    try:
        receive_until(sock, lambda s: any(m.startswith("READY=1") for m in s))
        text = site_a.read_text()
        text = text.replace('sae_id = "sae-a"', f'sae_id = "sae-a"\nuid = {os.getuid() + 1}')
        text = text.replace("key_lifetime = 3600", "key_lifetime = 60")
        text = text.replace("pool_size = 64", "pool_size = 32")
        site_a.write_text(text)
        daemon.send_signal(signal.SIGHUP)
        seen = receive_until(sock, lambda s: any(m.startswith("READY=1") for m in s[1:]))
        assert any("RELOADING=1" in m for m in seen)
        wait_until(lambda: "event=reloaded" in log.read_text(), "event=reloaded", 20, log.read_text)
        line = next(x for x in log.read_text().splitlines() if "event=reloaded" in x)
        applied = line.split("applied=")[1].split()[0].split(",")
        assert sorted(applied) == ["consumers", "key_lifetime"] and "needs_restart=peers" in line
        # The new uid mapping is live: this uid may no longer act as sae-a.
        with BlockingKeyClient(str(tmp_path / "site-a" / "api.sock")) as client:
            from qkdd.client import KeyServiceClientError

            with pytest.raises(KeyServiceClientError) as info:
                client.status(SITE_B.sae_id)
        assert info.value.status == 401
        # A broken file is refused and the running config kept.
        site_a.write_text("site_id = ")
        daemon.send_signal(signal.SIGHUP)
        wait_until(
            lambda: "event=reload_failed" in log.read_text(),
            "event=reload_failed",
            20,
            log.read_text,
        )
        assert daemon.poll() is None
    finally:
        daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(timeout=timeout(20)) == 0


@pytest.mark.skipif(
    shutil.which("systemd-socket-activate") is None,
    reason="systemd-socket-activate is not installed",
)
def test_api_socket_from_socket_activation(site_a, tmp_path):
    activated = tmp_path / "activated.sock"
    log = tmp_path / "a.log"
    daemon = start(
        site_a, {}, log, prefix=("systemd-socket-activate", "-l", str(activated), "--fdname=api")
    )
    try:
        wait_until(activated.exists, "the activated socket", 20, log.read_text)
        # An application may connect before the daemon is up; its request is answered.
        with BlockingKeyClient(str(activated), timeout=timeout(30)) as client:
            assert client.status(SITE_B.sae_id)["master_SAE_ID"] == "sae-a"
        assert "api_socket=from systemd" in log.read_text()
        assert not (tmp_path / "site-a" / "api.sock").exists()  # nothing bound by the daemon
    finally:
        daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(timeout=timeout(20)) == 0


def test_api_over_tls_with_client_certificates(site_a, tmp_path):
    """[api.tls] adds an HTTPS listener sharing the handler; callers are named by certificate."""
    from pki import make_pki

    from qkdd.client import KeyServiceClientError

    pki = make_pki(tmp_path)
    port = socket.create_server(("127.0.0.1", 0))
    address = port.getsockname()
    port.close()
    site_a.write_text(
        site_a.read_text()
        + f"""
[api.tls]
listen = "127.0.0.1:{address[1]}"
certificate = "{pki.server.cert}"
private_key = "{pki.server.key}"
client_ca = "{pki.ca}"
[api.tls.clients]
"app-a.example" = "sae-a"
"""
    )
    log = tmp_path / "a.log"
    daemon = start(site_a, {}, log)
    try:
        wait_until(lambda: "event=ready" in log.read_text(), "event=ready", 20, log.read_text)
        tls = dict(cert_file=pki.client_a.cert, key_file=pki.client_a.key, ca_file=pki.ca)
        with BlockingKeyClient.tls("127.0.0.1", address[1], **tls) as client:
            assert client.status(SITE_B.sae_id)["master_SAE_ID"] == "sae-a"
        stranger = dict(cert_file=pki.stranger.cert, key_file=pki.stranger.key, ca_file=pki.ca)
        with (
            BlockingKeyClient.tls("127.0.0.1", address[1], **stranger) as client,
            pytest.raises(KeyServiceClientError) as info,
        ):
            client.status(SITE_B.sae_id)
        assert info.value.status == 401
    finally:
        daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(timeout=timeout(20)) == 0


BROKEN_BACKEND = """
import sys
from qkdd.crypto import backend_pyca
from qkdd.cli import main

# A backend that derives the wrong ML-KEM key from a seed: what a miscompiled or tampered
# library would do. Only this child process is affected.
backend_pyca.PycaBackend.kem_from_seed = lambda self, seed: self.kem_generate()
sys.exit(main(["run", "--config", sys.argv[1]]))
"""


def test_failed_self_test_means_no_ready_and_a_clear_exit(site_a, notify_socket, tmp_path):
    sock, path = notify_socket
    site_a.write_text(
        site_a.read_text().replace('pqc_backend = "auto"', 'pqc_backend = "cryptography"')
    )
    result = subprocess.run(
        [sys.executable, "-c", BROKEN_BACKEND, str(site_a)],
        env={**os.environ, "NOTIFY_SOCKET": str(path)},
        capture_output=True,
        text=True,
        timeout=timeout(60),
    )
    assert result.returncode == 1
    assert "ML-KEM-768 self-test failed" in result.stderr
    assert "event=failed" in result.stderr
    sock.settimeout(0.5)
    with pytest.raises(TimeoutError):
        sock.recv(4096)  # the daemon told systemd nothing: no READY=1
    assert not (tmp_path / "site-a" / "api.sock").exists()
