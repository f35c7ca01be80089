"""End to end on one machine: the emulator and both site daemons as real subprocesses,
keys fetched through the real Unix sockets with ETSI GS QKD 014 calls."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from timeouts import timeout

from qkdd.client import BlockingKeyClient, KeyServiceClientError
from qkdd.demo import exchange_keys, running_demo, wait_for_keys
from qkdd.demo_sites import SITE_A, SITE_B


def test_two_sites_hand_out_identical_keys(tmp_path):
    with running_demo(tmp_path) as (site_a, site_b):
        wait_for_keys(site_a, SITE_B.sae_id, 16, timeout=timeout(30))
        rows = exchange_keys(site_a, site_b, 16)
        assert len(rows) == 16
        assert all(row["match"] for row in rows), rows
        assert len({row["key_ID"] for row in rows}) == 16
        assert len({row["site_a_fingerprint"] for row in rows}) == 16
        # The other direction: B's application sends, A's receives.
        wait_for_keys(site_b, SITE_A.sae_id, 4, timeout=timeout(30))
        with BlockingKeyClient(str(site_b.socket_path)) as app_b:
            sent = app_b.enc_keys(SITE_A.sae_id, number=4)
        with BlockingKeyClient(str(site_a.socket_path)) as app_a:
            received = app_a.dec_keys(SITE_B.sae_id, [k.key_id for k in sent])
        assert [k.material for k in sent] == [k.material for k in received]
        # Delivered once: asking again for the same IDs fails at the slave's site.
        with (
            BlockingKeyClient(str(site_a.socket_path)) as app_a,
            pytest.raises(KeyServiceClientError) as info,
        ):
            app_a.dec_keys(SITE_B.sae_id, [sent[0].key_id])
        assert info.value.status == 400
        processes = [site_a.process, site_b.process]
    # Shut down cleanly: exit status 0 and no socket left behind.
    assert [p.returncode for p in processes] == [0, 0]
    assert not site_a.socket_path.exists() and not site_b.socket_path.exists()
    log = site_a.log_file.read_text()
    assert "event=session_established" in log and "event=stopped" in log
    logs = log + site_b.log_file.read_text()
    for key in sent:  # key material never reaches a log, in any encoding
        assert base64.b64encode(key.material).decode() not in logs
        assert key.material.hex() not in logs


def test_wrong_pinned_key_fails_bootstrap_and_delivers_nothing(tmp_path, any_backend):
    # Site A pins a key that is not site B's: the bootstrap must fail at A.
    impostor = any_backend.signing_key_from_seed(os.urandom(32))
    with running_demo(
        tmp_path,
        tamper=lambda d: (d / "site-b" / "identity.pub").write_text(
            base64.b64encode(impostor.public_bytes).decode()
        ),
    ) as (site_a, site_b):
        deadline = time.monotonic() + timeout(20)
        while "event=peer_authentication_failed" not in site_a.log_file.read_text():
            if time.monotonic() >= deadline:  # only a hang gets here
                raise AssertionError(site_a.log_file.read_text())
            time.sleep(0.1)
        time.sleep(1.0)
        with BlockingKeyClient(str(site_a.socket_path)) as app_a:
            assert app_a.status(SITE_B.sae_id)["stored_key_count"] == 0
            with pytest.raises(KeyServiceClientError) as info:
                app_a.enc_keys(SITE_B.sae_id, number=1)
        assert info.value.status == 503
        assert "authentication failed" in str(info.value)
        log = site_a.log_file.read_text()
        assert "does not verify under the pinned public key" in log
        assert "event=session_established" not in log


def test_qkdd_demo_json(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "qkdd", "demo", "--json", "--keys", "4"],
        capture_output=True,
        text=True,
        timeout=timeout(60),
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert len(report["keys"]) == 4
    assert all(
        k["match"] and k["site_a_fingerprint"] == k["site_b_fingerprint"] for k in report["keys"]
    )
    assert set(report["keys"][0]) == {"key_ID", "site_a_fingerprint", "site_b_fingerprint", "match"}
    assert report["timings"]["total_s"] > 0  # reported; how long it took is not a test


def test_qkdd_demo_serve_describes_live_sites_for_qkdctl():
    process = subprocess.Popen(
        [sys.executable, "-m", "qkdd", "demo", "--serve", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        description = json.loads(process.stdout.readline())
        site_a = description["sites"]["site-a"]
        site_b = description["sites"]["site-b"]
        assert site_a["master_SAE_ID"] == "sae-a" and site_a["slave_SAE_ID"] == "sae-b"
        assert os.path.exists(site_a["config_file"])
        ctl = [sys.executable, "-m", "qkdd.ctl", "--socket", site_a["api_socket"]]
        sent = subprocess.run(
            [*ctl, "enc-keys", "sae-b", "--number", "2"],
            capture_output=True,
            text=True,
            timeout=timeout(30),
        )
        assert sent.returncode == 0, sent.stderr
        key_ids = [k["key_ID"] for k in json.loads(sent.stdout)["keys"]]
        got = subprocess.run(
            [
                sys.executable,
                "-m",
                "qkdd.ctl",
                "--socket",
                site_b["api_socket"],
                "dec-keys",
                "sae-a",
                *key_ids,
            ],
            capture_output=True,
            text=True,
            timeout=timeout(30),
        )
        assert got.returncode == 0, got.stderr
        assert [k["key"] for k in json.loads(got.stdout)["keys"]] == [
            k["key"] for k in json.loads(sent.stdout)["keys"]
        ]
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=timeout(30))
    assert process.returncode == 0
    assert not os.path.exists(site_a["config_file"])  # the demo directory is gone


def test_sites_on_different_pqc_backends_interoperate(tmp_path):
    """Site A on liboqs, site B on pyca/cryptography: bootstrap, PSK and keys all agree."""
    from qkdd.crypto.liboqs_probe import find_liboqs

    if find_liboqs() is None:
        pytest.skip("liboqs C library not found (set OQS_INSTALL_PATH)")

    def mix(directory):
        for site, backend in (("site-a", "oqs"), ("site-b", "cryptography")):
            path = directory / f"{site}.toml"
            path.write_text(
                path.read_text().replace('pqc_backend = "auto"', f'pqc_backend = "{backend}"')
            )

    with running_demo(tmp_path, tamper=mix) as (site_a, site_b):
        wait_for_keys(site_a, SITE_B.sae_id, 4, timeout=timeout(30))
        assert all(row["match"] for row in exchange_keys(site_a, site_b, 4))
        assert "backend=liboqs" in site_a.log_file.read_text()
        assert "backend=cryptography" in site_b.log_file.read_text()
