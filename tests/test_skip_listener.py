"""The SKIP listener that cannot start (its address taken, a TLS file missing) ends
`qkdd run` with one plain line naming the [skip] setting, never a traceback; and which
certificate is which local system."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from pki import issue, make_pki, new_ca
from timeouts import timeout

from qkdd.demo import prepare_directory
from qkdd.demo_sites import SITE_A
from qkdd.skip.listener import local_systems_from_certificate


@pytest.fixture
def site_a(tmp_path: Path) -> Path:
    """Site A's demo config with its secret files, ready for `qkdd run`."""
    return prepare_directory(tmp_path)[SITE_A.site_id]


def with_skip(config: Path, port: int, cert: str, key: str, ca: str) -> None:
    config.write_text(
        config.read_text() + f'\n[skip]\nlisten = "127.0.0.1:{port}"\ncertificate = "{cert}"\n'
        f'private_key = "{key}"\nclient_ca = "{ca}"\n'
        '[skip.clients]\n"router-a.example" = "sae-a"\n'
        '[skip.remote_systems]\n"sae-b" = "sae-b"\n'
    )


def run_qkdd(config: Path) -> tuple[int, str]:
    done = subprocess.run(
        [sys.executable, "-m", "qkdd.cli", "run", "--config", str(config)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        timeout=timeout(120),
    )
    return done.returncode, done.stderr


def test_address_in_use_is_one_line_naming_skip(site_a: Path, tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with_skip(site_a, taken.getsockname()[1], pki.server.cert, pki.server.key, pki.ca)
        status, err = run_qkdd(site_a)
    assert status == 1, err
    assert "Traceback" not in err
    plain = [line for line in err.splitlines() if line.startswith("qkdd: ")]
    assert len(plain) == 1, err
    assert "SKIP listener: cannot listen on 127.0.0.1:" in plain[0]
    assert "for SKIP" in plain[0] and "[skip] listen" in plain[0], plain


def test_missing_certificate_is_one_line_naming_skip(site_a: Path, tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    missing = str(tmp_path / "nowhere.crt")
    with_skip(site_a, 1, missing, pki.server.key, pki.ca)
    status, err = run_qkdd(site_a)
    assert status == 1 and "Traceback" not in err, err
    (plain,) = [line for line in err.splitlines() if line.startswith("qkdd: ")]
    assert "SKIP listener:" in plain and missing in plain and "[skip]" in plain, plain


def test_certificates_map_by_name_or_fingerprint() -> None:
    ca = new_ca("routers CA")
    _key, by_name = issue(ca, "router-a.example", dns=["Router-A.example.net"])
    _key, by_fingerprint = issue(ca, "router-b")
    _key, stranger = issue(ca, "*.example", dns=["x.example"])
    fingerprint = by_fingerprint.fingerprint(hashes.SHA256()).hex()
    names = {"router-a.example": "sae-a", "router-a.example.net": "sae-x", "*.example": "sae-z"}
    prints = {fingerprint: "sae-b"}
    assert local_systems_from_certificate(by_name, names, prints) == {"sae-a", "sae-x"}
    assert local_systems_from_certificate(by_fingerprint, names, prints) == {"sae-b"}
    assert local_systems_from_certificate(stranger, names, prints) == frozenset()
