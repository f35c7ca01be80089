"""The [skip] section: off by default, loads when complete, and every bad value names the
file, the key and what is expected; check-config loads its TLS files."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from demo_layout import site_host_example, write_demo_sites
from pki import make_pki

from qkdd.cli import main
from qkdd.config import ConfigError, check_files, load_config
from qkdd.demo_sites import SITE_A, render

FINGERPRINT = "AB:" * 31 + "CD"

SKIP = """
[skip]
listen = "127.0.0.1:8443"
certificate = "skip.crt"
private_key = "skip.key"
client_ca = "routers-ca.crt"

[skip.clients]
"router-a.example" = "sae-a"
"sha256:{fingerprint}" = "sae-a"

[skip.remote_systems]
"site-b-router" = "sae-b"
"""


@pytest.fixture
def site_dir(tmp_path, any_backend):
    return write_demo_sites(tmp_path, any_backend)


def with_skip(site_dir: Path, old: str = "", new: str = "") -> Path:
    path = site_dir / "site-a.toml"
    section = SKIP.format(fingerprint=FINGERPRINT)
    assert old in section, old
    path.write_text(render(SITE_A) + section.replace(old, new, 1))
    return path


def test_off_by_default(site_dir):
    assert load_config(site_dir / "site-a.toml").skip is None


def test_skip_section_loads(site_dir):
    skip = load_config(with_skip(site_dir)).skip
    assert skip is not None
    assert skip.listen == ("127.0.0.1", 8443)
    assert skip.certificate == site_dir / "skip.crt"
    assert skip.client_ca == site_dir / "routers-ca.crt"
    assert skip.systems_by_name == {"router-a.example": "sae-a"}
    assert skip.systems_by_fingerprint == {("ab" * 31) + "cd": "sae-a"}
    assert skip.remote_systems == (("site-b-router", "sae-b"),)
    assert skip.entropy is True
    assert (
        load_config(with_skip(site_dir, "[skip]\n", "[skip]\nentropy = false\n")).skip.entropy
        is False
    )


CLIENTS = '[skip.clients]\n"router-a.example" = "sae-a"\n"sha256:{FINGERPRINT}" = "sae-a"\n'
LISTEN = 'listen = "127.0.0.1:8443"'
ROUTER_A = '"router-a.example" = "sae-a"'
TO_SITE_B = '"site-b-router" = "sae-b"'
BAD = [
    (ROUTER_A, '"router-a.example" = "sae-z"', "skip.clients.router-a.example", "(sae-a)"),
    (ROUTER_A, '"*.example" = "sae-a"', "skip.clients.*.example", "without '*'"),
    (f'"sha256:{FINGERPRINT}"', '"sha256:ab"', "skip.clients.sha256:ab", "64 hexadecimal"),
    (
        TO_SITE_B,
        '"site-b-router" = "sae-a"',
        "skip.remote_systems.site-b-router",
        "[[peers]] (sae-b)",
    ),
    (TO_SITE_B, '"site b" = "sae-b"', "skip.remote_systems.site b", "remoteSystemID of 1-64"),
    (TO_SITE_B, '"site-b-router" = 3', "skip.remote_systems.site-b-router", "remote SAE ID"),
    (TO_SITE_B, "", "skip.remote_systems", "at least one entry"),
    (CLIENTS.format(FINGERPRINT=FINGERPRINT), "", "skip.clients", "the key is missing"),
    (CLIENTS.format(FINGERPRINT=FINGERPRINT), "[skip.clients]\n", "skip.clients", "one entry"),
    (LISTEN, 'listen = "8443"', "skip.listen", '"host:port"'),
    ('certificate = "skip.crt"\n', "", "skip.certificate", "the key is missing"),
    (LISTEN, f"{LISTEN}\nport = 1", "skip.port", "no such key"),
    (LISTEN, f'{LISTEN}\nentropy = "yes"', "skip.entropy", "true or false"),
    (LISTEN, f'{LISTEN}\npsk_file = "p"', "skip.psk_file", "TLS-PSK client authentication is not"),
]


@pytest.mark.parametrize(("old", "new", "key", "expected"), BAD)
def test_bad_values_name_the_key(site_dir, old, new, key, expected):
    with pytest.raises(ConfigError) as info:
        load_config(with_skip(site_dir, old, new))
    assert info.value.key == key, info.value
    assert expected in info.value.expected, info.value
    assert str(site_dir / "site-a.toml") in str(info.value)


def test_check_config_loads_the_tls_files(site_dir, tmp_path):
    config = load_config(with_skip(site_dir))
    assert [p.key for p in check_files(config) if p.key.startswith("skip.")] == [
        "skip.certificate",
        "skip.private_key",
        "skip.client_ca",
    ]
    pki = make_pki(tmp_path)

    def files(cert: str, key: str, ca: str) -> dict[str, str]:
        path = site_dir / "site-a.toml"
        text = path.read_text()
        for name, value in (("certificate", cert), ("private_key", key), ("client_ca", ca)):
            text = re.sub(rf'\n{name} = "[^"]*"', f'\n{name} = "{value}"', text)
        path.write_text(text)
        return {p.key: str(p) for p in check_files(load_config(path)) if p.key.startswith("skip")}

    # Another certificate's key; a key file where the client CA belongs.
    problems = files(pki.server.cert, pki.client_a.key, pki.server.key)
    assert set(problems) == {"skip.private_key", "skip.client_ca"}, problems
    assert "belongs to it" in problems["skip.private_key"]
    assert "CA certificates" in problems["skip.client_ca"]
    # A certificate file holding no certificate is told on the certificate, as for [api.tls].
    problems = files(pki.server.key, pki.server.key, pki.ca)
    assert set(problems) == {"skip.certificate"}, problems
    assert "listener's certificate" in problems["skip.certificate"]
    assert files(pki.server.cert, pki.server.key, pki.ca) == {}
    (site_dir / "site-a" / "identity.key").write_bytes(os.urandom(32))
    (site_dir / "site-a" / "kek.bin").write_bytes(os.urandom(32))
    assert main(["check-config", str(site_dir / "site-a.toml")]) == 0


def test_site_host_example_skip_table_parses_once_uncommented(tmp_path, any_backend):
    text = site_host_example(tmp_path, any_backend)
    start = text.index("# [skip]\n")
    end = text.index("\n\n", start)
    block = text[start:end]
    text = (
        text[:start]
        + "\n".join(line.removeprefix("# ") for line in block.splitlines())
        + text[end:]
    )
    path = tmp_path / "qkdd.toml"
    path.write_text(text)
    skip = load_config(path).skip
    assert skip is not None and skip.remote_systems == (("sae-b", "sae-b"),)
    assert skip.systems_by_name == {"router-a.example": "sae-a"}
