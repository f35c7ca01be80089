"""[[remote]] sites (keys relayed through trusted sites) and the [relay] table: a remote loads
as a relayed peer whose SAEs are served like a peer's, and every bad entry names the file,
the key and what was expected."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from demo_layout import config_error, site_host_example, toml_table, write_demo_sites

from qkdd.cli import main
from qkdd.config import (
    RELAY_PAD_BYTES_DEFAULT,
    RelayedDeviceConfig,
    SiteConfig,
    config_warnings,
    load_config,
)


@pytest.fixture
def site_dir(tmp_path, any_backend):
    return write_demo_sites(tmp_path, any_backend)


def public_key(site_dir: Path) -> str:
    return '"' + (site_dir / "site-b" / "identity.pub").read_text().strip() + '"'


def second_peer(site_dir: Path) -> str:
    """A [[peers]] entry for site-c (sae-c), beside the demo's site-b."""
    peer = {
        "site_id": '"site-c"',
        "address": '"127.0.0.1:47103"',
        "public_key": public_key(site_dir),
        "remote_sae_ids": '["sae-c"]',
    }
    return toml_table("peers", peer) + '[peers.device]\nkind = "serial"\npath = "qkd-c.tty"\n'


def remote_table(site_dir: Path, **changes: str | None) -> str:
    """A [[remote]] entry for site-d (sae-d) via site-c, with ``changes``."""
    remote = {
        "site_id": '"site-d"',
        "public_key": public_key(site_dir),
        "remote_sae_ids": '["sae-d"]',
        "via": '"site-c"',
    }
    return toml_table("remote", remote, **changes)


def with_tables(site_dir: Path, *tables: str) -> Path:
    """site-a's config with ``tables`` appended (after the demo's site-b and site-c)."""
    path = site_dir / "site-a.toml"
    path.write_text(path.read_text() + second_peer(site_dir) + "".join(tables))
    return path


def test_a_remote_is_a_relayed_peer_whose_saes_are_served(site_dir):
    config = load_config(with_tables(site_dir, remote_table(site_dir)))
    assert [p.site_id for p in config.peers] == ["site-b", "site-c", "site-d"]
    assert [p.site_id for p in config.direct_peers] == ["site-b", "site-c"]
    (remote,) = config.remote_peers
    assert remote is config.peer("site-d")
    assert remote.relayed and not any(p.relayed for p in config.direct_peers)
    assert remote.device == RelayedDeviceConfig(via="site-c")
    assert remote.device.kind == "relayed"
    assert remote.device.describe() == "relayed (via site-c)"
    assert remote.address == ("", 0)
    assert remote.remote_sae_ids == ("sae-d",)
    assert (remote.pool_size, remote.auth_key_bits, remote.otp_pad_bytes) == (256, 256, 0)
    assert ("sae-a", "sae-d") in config.talking_pairs()
    assert config.talking_pairs() == {("sae-a", s) for s in ("sae-b", "sae-c", "sae-d")}
    assert config.relay_pad_bytes == RELAY_PAD_BYTES_DEFAULT == 262144


def test_a_remote_without_via_takes_the_shortest_path(site_dir):
    table = remote_table(site_dir, via=None, pool_size="128", otp_pad_bytes="0")
    (remote,) = load_config(with_tables(site_dir, table)).remote_peers
    assert remote.device == RelayedDeviceConfig(via=None)
    assert remote.device.describe() == "relayed (shortest path)"
    assert (remote.pool_size, remote.otp_pad_bytes) == (128, 0)


def test_talks_to_may_name_a_remote_sae(site_dir):
    path = with_tables(site_dir, remote_table(site_dir))
    text = path.read_text().replace(
        'sae_id = "sae-a"\n', 'sae_id = "sae-a"\ntalks_to = ["sae-d"]\n'
    )
    path.write_text(text)
    assert load_config(path).talking_pairs() == {("sae-a", "sae-d")}


def remote_error(site_dir: Path, *tables: str, key: str, expected: str) -> None:
    error = config_error(with_tables(site_dir), "".join(tables))
    assert error.key == key, error
    assert expected in error.expected, error
    assert str(site_dir / "site-a.toml") in str(error) and key in str(error)


@pytest.mark.parametrize(
    "changes,key,expected",
    [
        ({"site_id": '"site-a"'}, "remote[0].site_id", "a site other than this one"),
        ({"site_id": '"site-b"'}, "remote[0].site_id", "without a [[peers]] entry"),
        ({"site_id": '"no spaces"'}, "remote[0].site_id", "identifier"),
        ({"via": '"site-x"'}, "remote[0].via", "the site_id of a [[peers]] entry"),
        ({"via": '"site-d"'}, "remote[0].via", "site-b, site-c"),
        ({"via": "3"}, "remote[0].via", "identifier"),
        ({"remote_sae_ids": '["sae-b"]'}, "remote[0].remote_sae_ids[0]", "listed once"),
        ({"remote_sae_ids": '["sae-a"]'}, "remote[0].remote_sae_ids[0]", "[[consumers]]"),
        ({"remote_sae_ids": None}, "remote[0].remote_sae_ids", "the key is missing"),
        ({"public_key": None}, "remote[0].public_key", "exactly one of"),
        ({"public_key": '"AAAA"'}, "remote[0].public_key", "ML-DSA-65 public key"),
        ({"address": '"127.0.0.1:47104"'}, "remote[0].address", "no such key"),
        ({"pool_size": "0"}, "remote[0].pool_size", "integer from 1"),
        ({"auth_key_bits": "129"}, "remote[0].auth_key_bits", "multiple of 8"),
        ({"qkd_buffer_keys": "1"}, "remote[0].qkd_buffer_keys", "integer from 16"),
        # The relays see a remote's QKD material: no one-time pads from it.
        ({"otp_pad_bytes": "4096"}, "remote[0].otp_pad_bytes", "need a direct QKD link"),
        ({"otp_pad_bytes": "-1"}, "remote[0].otp_pad_bytes", "need a direct QKD link"),
    ],
)
def test_bad_remote_entries_name_the_key(site_dir, changes, key, expected):
    remote_error(site_dir, remote_table(site_dir, **changes), key=key, expected=expected)


def test_a_remote_is_listed_once(site_dir):
    remote = remote_table(site_dir)
    again = remote_table(site_dir, remote_sae_ids='["sae-e"]')
    remote_error(site_dir, remote, again, key="remote[1].site_id", expected="listed once")


def test_an_sae_is_at_one_remote_only(site_dir):
    other = remote_table(site_dir, site_id='"site-e"')
    remote_error(
        site_dir,
        remote_table(site_dir),
        other,
        key="remote[1].remote_sae_ids[0]",
        expected="already at site site-d",
    )


@pytest.mark.parametrize(
    "relay,pad_bytes",
    [
        (None, 0),  # neither [relay] nor [[remote]]: relaying is off
        ("[relay]\n", RELAY_PAD_BYTES_DEFAULT),
        ("[relay]\nenabled = true\n", RELAY_PAD_BYTES_DEFAULT),
        ("[relay]\npad_bytes = 8192\n", 8192),
        ("[relay]\npad_bytes = 67108864\n", 64 << 20),
        ("[relay]\nenabled = false\npad_bytes = 16384\n", 0),
    ],
)
def test_relay_pad_bytes(site_dir, relay, pad_bytes):
    path = site_dir / "site-a.toml"
    if relay is not None:
        path.write_text(path.read_text() + "\n" + relay)
    assert load_config(path).relay_pad_bytes == pad_bytes


def test_remotes_turn_relaying_on_with_their_own_pad_size(site_dir):
    path = with_tables(site_dir, "\n[relay]\npad_bytes = 1048576\n", remote_table(site_dir))
    assert load_config(path).relay_pad_bytes == 1 << 20


@pytest.mark.parametrize(
    "relay,key,expected",
    [
        ("enabled = false", "relay.enabled", "true, or no [[remote]] entries"),
        ("pad_bytes = 4096", "relay.pad_bytes", "a multiple of 1024 bytes from 8192"),
        ("pad_bytes = 67109888", "relay.pad_bytes", "to 67108864"),
        ("pad_bytes = 10000", "relay.pad_bytes", "a multiple of 1024"),
        ("pad_bytes = true", "relay.pad_bytes", "a multiple of 1024"),
        ('enabled = "no"', "relay.enabled", "true or false"),
        ("colour = 1", "relay.colour", "no such key"),
    ],
)
def test_bad_relay_tables_name_the_key(site_dir, relay, key, expected):
    table = f"\n[relay]\n{relay}\n"
    remote_error(site_dir, table, remote_table(site_dir), key=key, expected=expected)


def checkable(site_dir: Path) -> None:
    (site_dir / "site-a" / "identity.key").write_bytes(os.urandom(32))
    (site_dir / "site-a" / "kek.bin").write_bytes(os.urandom(32))


def test_check_config_counts_remotes_and_builds_no_device_for_them(site_dir, capsys):
    checkable(site_dir)
    path = with_tables(site_dir, remote_table(site_dir, pool_size="32"))
    assert main(["check-config", str(path)]) == 0
    out, err = capsys.readouterr()
    assert "OK (site site-a, 2 peer(s), 1 remote site(s), 1 consumer SAE(s))" in out
    # The pool warning names the [[remote]] entry, not a [[peers]] index.
    assert "remote[0].pool_size (32)" in err and "peers[2]" not in err


def test_pool_warning_names_the_remote_entry(site_dir):
    config = load_config(with_tables(site_dir, remote_table(site_dir, pool_size="32")))
    (warning,) = config_warnings(config)
    assert "remote[0].pool_size" in warning and "site-d" in warning


def test_site_host_example_remote_tables_parse_once_uncommented(tmp_path, any_backend):
    text = site_host_example(tmp_path, any_backend).replace(
        "/etc/qkdd/site-c.pub", str(tmp_path / "site-b.pub")
    )
    lines = (
        "[[remote]]",
        'site_id = "site-c"',
        f'public_key_file = "{tmp_path / "site-b.pub"}"',
        'remote_sae_ids = ["sae-c"]',
        'via = "site-b"',
        "pool_size = 256",
        "[relay]",
        "pad_bytes = 262144",
    )
    for line in lines:
        assert f"\n# {line}\n" in text, line
        text = text.replace(f"\n# {line}\n", f"\n{line}\n")
    path = tmp_path / "qkdd.toml"
    path.write_text(text)
    config: SiteConfig = load_config(path)
    (remote,) = config.remote_peers
    assert remote.site_id == "site-c" and remote.device.describe() == "relayed (via site-b)"
    assert config.relay_pad_bytes == 262144
