"""`qkdd check-config` reports every problem it finds in one run (not just the first), and
loads the [api.tls] files as the listener would, so a missing certificate, a key that is
not the certificate's or a client CA that is no certificate fails the check, not the start."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from pki import make_pki
from timeouts import timeout

from qkdd.demo_sites import SITE_A, SITE_B, render


@pytest.fixture
def site_dir(tmp_path: Path, any_backend) -> Path:
    """The demo layout with every file `check-config` looks for."""
    for site in (SITE_A, SITE_B):
        (tmp_path / site.directory).mkdir()
        key = any_backend.signing_key_from_seed(os.urandom(32))
        (tmp_path / site.directory / "identity.pub").write_text(
            base64.b64encode(key.public_bytes).decode()
        )
        (tmp_path / site.directory / "identity.key").write_bytes(os.urandom(32))
        (tmp_path / site.directory / "kek.bin").write_bytes(os.urandom(32))
        (tmp_path / f"{site.site_id}.toml").write_text(render(site))
    return tmp_path


def check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qkdd", "check-config", str(path)],
        capture_output=True,
        text=True,
        timeout=timeout(60),
    )


def replace(path: Path, *edits: tuple[str, str]) -> Path:
    text = path.read_text()
    for old, new in edits:
        assert old in text, old
        text = text.replace(old, new, 1)
    path.write_text(text)
    return path


def error_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    assert "Traceback" not in result.stderr, result.stderr
    return [line for line in result.stderr.splitlines() if line.startswith("qkdd: config error")]


def test_a_good_config_passes(site_dir: Path) -> None:
    result = check_config(site_dir / "site-a.toml")
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout


def test_independent_problems_are_all_reported(site_dir: Path) -> None:
    path = replace(
        site_dir / "site-a.toml",
        ('listen = "127.0.0.1:47101"', 'listen = "127.0.0.1"'),
        ("key_lifetime = 3600", "key_lifetime = 0"),
        ("key_size = 256", "key_size = 7"),
        ("pool_size = 64", "pool_size = 0"),
    )
    result = check_config(path)
    assert result.returncode == 2
    lines = error_lines(result)
    for key in ("listen", "store.key_lifetime", "api.key_size", "peers[0].pool_size"):
        assert any(f": {key}: expected" in line for line in lines), (key, result.stderr)
    assert len(lines) == 4, result.stderr


def tls_section(pki_dir: Path, cert: str, key: str, ca: str) -> str:
    return (
        "[api.tls]\n"
        'listen = "127.0.0.1:47143"\n'
        f'certificate = "{pki_dir / cert}"\n'
        f'private_key = "{pki_dir / key}"\n'
        f'client_ca = "{pki_dir / ca}"\n'
        'clients = { "client-a" = "sae-a" }\n\n'
    )


def with_tls(site_dir: Path, cert: str, key: str, ca: str) -> Path:
    pki_dir = site_dir / "pki"
    if not pki_dir.exists():
        pki_dir.mkdir()
        make_pki(pki_dir)
        shutil.copy(pki_dir / "server.key", pki_dir / "not-a-cert.crt")
    return replace(
        site_dir / "site-a.toml",
        ("[[consumers]]", tls_section(pki_dir, cert, key, ca) + "[[consumers]]"),
    )


def test_good_tls_files_pass(site_dir: Path) -> None:
    result = check_config(with_tls(site_dir, "server.crt", "server.key", "ca.crt"))
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("cert", "key", "ca", "bad_key", "words"),
    [
        ("missing.crt", "server.key", "ca.crt", "api.tls.certificate", "missing.crt"),
        ("not-a-cert.crt", "server.key", "ca.crt", "api.tls.certificate", "certificate"),
        ("server.crt", "client-a.key", "ca.crt", "api.tls.private_key", "matching"),
        ("server.crt", "missing.key", "ca.crt", "api.tls.private_key", "missing.key"),
        ("server.crt", "server.key", "not-a-cert.crt", "api.tls.client_ca", "CA certificates"),
    ],
)
def test_bad_tls_files_are_reported(
    site_dir: Path, cert: str, key: str, ca: str, bad_key: str, words: str
) -> None:
    result = check_config(with_tls(site_dir, cert, key, ca))
    assert result.returncode == 2
    (line,) = error_lines(result)
    assert f": {bad_key}: expected" in line and words in line, line


def test_several_tls_problems_in_one_run(site_dir: Path) -> None:
    result = check_config(with_tls(site_dir, "server.crt", "client-a.key", "not-a-cert.crt"))
    assert result.returncode == 2
    lines = error_lines(result)
    assert len(lines) == 2, result.stderr
    assert "api.tls.private_key" in lines[0] and "api.tls.client_ca" in lines[1]
