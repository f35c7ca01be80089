"""Site config loading: good files load; every bad value names the file, key and expectation."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest
from demo_layout import config_error, site_host_example, toml_table, write_demo_sites
from timeouts import timeout

from qkdd.cli import main
from qkdd.config import ConfigError, check_files, config_warnings, load_config
from qkdd.demo_sites import SITE_A, SITE_B, render

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def site_dir(tmp_path, any_backend):
    """A demo layout: both configs and both public keys (the private keys are not needed)."""
    return write_demo_sites(tmp_path, any_backend)


def test_demo_config_loads(site_dir):
    config = load_config(site_dir / "site-a.toml")
    assert config.site_id == "site-a"
    assert config.listen == ("127.0.0.1", 47101)
    assert config.api_socket == site_dir / "site-a" / "api.sock"
    assert config.identity_key.path == site_dir / "site-a" / "identity.key"
    assert config.api_socket_mode == 0o600
    (peer,) = config.peers
    assert peer.site_id == "site-b" and peer.address == ("127.0.0.1", 47102)
    assert peer.public_key == base64.b64decode((site_dir / "site-b" / "identity.pub").read_text())
    assert peer.device.path == site_dir / "qkd-a.tty"
    assert peer.qkd_buffer_keys == 4096
    assert config.sae_ids_for_uid(12345) == {"sae-a"}


def test_shipped_config_files_are_the_rendered_demo_sites():
    for site in (SITE_A, SITE_B):
        assert (REPO / "config" / f"{site.site_id}.toml").read_text() == render(site)


def test_check_files_reports_missing_secret_files(site_dir):
    problems = check_files(load_config(site_dir / "site-a.toml"))
    assert [p.key for p in problems] == ["identity.private_key", "store.key_encryption_key"]
    assert "qkdd keygen" in str(problems[0]) and "qkdd keygen --kek" in str(problems[1])


def test_key_encryption_key_from_a_systemd_credential(site_dir):
    path = edit(
        site_dir,
        'key_encryption_key = "site-a/kek.bin"',
        'key_encryption_key = "credential:qkdd-kek"',
    )
    source = load_config(path).key_encryption_key
    assert source.credential == "qkdd-kek" and source.path is None


def edit(site_dir: Path, old: str, new: str) -> Path:
    path = site_dir / "site-a.toml"
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new, 1))
    return path


BAD_VALUES = [
    ('site_id = "site-a"', 'site_id = "no spaces allowed"', "site_id", "identifier"),
    ('listen = "127.0.0.1:47101"', 'listen = "127.0.0.1"', "listen", '"host:port"'),
    ('listen = "127.0.0.1:47101"', 'listen = "127.0.0.1:70000"', "listen", "port from 1 to 65535"),
    ('listen = "127.0.0.1:47101"', "listen = 47101", "listen", '"host:port"'),
    (
        'pqc_backend = "auto"',
        'pqc_backend = "fast"',
        "pqc_backend",
        "one of auto, oqs, cryptography",
    ),
    ("key_size = 256", "key_size = 255", "api.key_size", "multiple of 8"),
    ("key_size = 256", "key_size = true", "api.key_size", "integer"),
    (
        "max_keys_per_request = 64",
        "max_keys_per_request = 0",
        "api.max_keys_per_request",
        "from 1",
    ),
    ('sae_id = "sae-a"', "sae_id = 7", "consumers[0].sae_id", "identifier"),
    ('address = "127.0.0.1:47102"', 'address = "nowhere"', "peers[0].address", '"host:port"'),
    (
        'public_key_file = "site-b/identity.pub"',
        'public_key_file = "site-b/missing.pub"',
        "peers[0].public_key_file",
        "readable file",
    ),
    (
        'public_key_file = "site-b/identity.pub"',
        'public_key = "AAAA"',
        "peers[0].public_key",
        "ML-DSA-65 public key in base64",
    ),
    (
        'public_key_file = "site-b/identity.pub"',
        'public_key = "not base64!"',
        "peers[0].public_key",
        "base64",
    ),
    ('remote_sae_ids = ["sae-b"]', 'remote_sae_ids = "sae-b"', "peers[0].remote_sae_ids", "list"),
    ("pool_size = 64", "pool_size = -1", "peers[0].pool_size", "integer from 1"),
    (
        "pool_size = 64",
        "pool_size = 64\nqkd_buffer_keys = 1",
        "peers[0].qkd_buffer_keys",
        "integer from 16",
    ),
    (
        "pool_size = 64",
        "pool_size = 64\nauth_key_bits = 100",
        "peers[0].auth_key_bits",
        "integer from 128",
    ),
    (
        "pool_size = 64",
        "pool_size = 64\nauth_key_bits = 129",
        "peers[0].auth_key_bits",
        "multiple of 8",
    ),
    (
        'key_encryption_key = "site-a/kek.bin"',
        'key_encryption_key = "credential:"',
        "store.key_encryption_key",
        "credential:NAME",
    ),
    ("key_lifetime = 3600", "key_lifetime = 0", "store.key_lifetime", "integer from 1"),
    ('kind = "serial"', 'kind = "carrier-pigeon"', "peers[0].device.kind", "one of serial"),
    ("baudrate = 115200", 'baudrate = "fast"', "peers[0].device.baudrate", "integer"),
    ('site_id = "site-b"', 'site_id = "site-a"', "peers[].site_id", "a site other than this one"),
    ("[api]", "[api]\nsocket_colour = 1", "api.socket_colour", "no such key"),
    ('private_key = "site-a/identity.key"\n', "", "identity.private_key", "the key is missing"),
    ("[identity]\n", "[identities]\n", "identities", "no such key"),
    (
        'sae_id = "sae-a"',
        'sae_id = "sae-a"\nkeys_per_hour = 0',
        "consumers[0].keys_per_hour",
        "integer from 1",
    ),
    ("[api]", "[messages]\nmax_size = 2000000\n\n[api]", "messages.max_size", "to 1048576"),
    ("[api]", "[messages]\nmax_pending = 0\n\n[api]", "messages.max_pending", "from 1"),
    ("[api]", "[messages]\ncolour = 1\n\n[api]", "messages.colour", "no such key"),
]

WG = {
    "name": '"t"',
    "interface": '"wg0"',
    "peer_public_key": f'"{base64.b64encode(bytes(32)).decode()}"',
    "peer_site": '"site-b"',
    "local_sae": '"sae-a"',
    "remote_sae": '"sae-b"',
}


def wireguard_table(**changes: str | None) -> str:
    return toml_table("wireguard", WG, **changes)


def test_wireguard_binding_loads(site_dir):
    path = site_dir / "site-a.toml"
    path.write_text(path.read_text() + wireguard_table(interval="60"))
    (binding,) = load_config(path).wireguard
    assert (binding.name, binding.interface, binding.interval, binding.max_key_age) == (
        "t",
        "wg0",
        60,
        600,
    )


def test_loading_tunnel_bindings_does_not_import_trio(site_dir):
    """The config loader (``qkdd check-config``, the light tools) stays free of Trio: the
    bindings' tables load without the rotators, the ``wg`` runner or the charon client."""
    import subprocess
    import sys

    path = site_dir / "site-a.toml"
    ipsec = {k: WG[k] for k in ("name", "peer_site", "local_sae", "remote_sae")}
    path.write_text(
        path.read_text()
        + wireguard_table()
        + toml_table("ipsec", ipsec, name='"i"', connection='"site-b"')
    )
    script = (
        "import sys\n"
        "from qkdd.config import load_config\n"
        f"config = load_config({str(path)!r})\n"
        "assert len(config.wireguard) == len(config.ipsec) == 1, config\n"
        "loaded = sorted(m for m in sys.modules if m == 'trio' or m.startswith('trio.'))\n"
        "assert not loaded, loaded\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout(60)
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    "changes,key,expected",
    [
        ({"peer_site": '"site-c"'}, "wireguard[0].peer_site", "[[peers]]"),
        ({"local_sae": '"sae-x"'}, "wireguard[0].local_sae", "[[consumers]]"),
        ({"remote_sae": '"sae-x"'}, "wireguard[0].remote_sae", "remote_sae_ids of peer site-b"),
        ({"peer_public_key": '"short"'}, "wireguard[0].peer_public_key", "public key"),
        ({"interface": '"a/b"'}, "wireguard[0].interface", "interface name"),
        ({"max_key_age": "60"}, "wireguard[0].max_key_age", "more than interval"),
        ({"interval": "true"}, "wireguard[0].interval", "positive number"),
        ({"name": None}, "wireguard[0].name", "required"),
        ({"colour": '"red"'}, "wireguard[0].colour", "no such key"),
    ],
)
def test_wireguard_errors_name_the_key(site_dir, changes, key, expected):
    error = config_error(site_dir / "site-a.toml", wireguard_table(**changes))
    assert error.key == key, error
    assert expected in error.expected, error


@pytest.mark.parametrize("old,new,key,expected", BAD_VALUES)
def test_bad_value_names_file_key_and_expectation(site_dir, old, new, key, expected):
    path = edit(site_dir, old, new)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == key
    assert expected in info.value.expected
    message = str(info.value)
    assert str(path) in message and key in message


def test_tls_clients_must_name_local_saes(site_dir):
    path = site_dir / "site-a.toml"
    path.write_text(
        path.read_text()
        + '[api.tls]\nlisten = "127.0.0.1:8443"\ncertificate = "c"\nprivate_key = "k"\n'
        'client_ca = "ca"\n[api.tls.clients]\n"app.example" = "sae-z"\n'
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == "api.tls.clients.app.example"
    assert "sae-a" in info.value.expected


def test_toml_syntax_error_names_the_file(site_dir):
    path = edit(site_dir, 'site_id = "site-a"', "site_id = ")
    with pytest.raises(ConfigError, match="valid TOML") as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="existing TOML config file"):
        load_config(tmp_path / "nope.toml")


def test_check_config_command_reports_problems(site_dir):
    import subprocess
    import sys

    bad = edit(site_dir, "pool_size = 64", "pool_size = 0")
    result = subprocess.run(
        [sys.executable, "-m", "qkdd", "check-config", str(bad)],
        capture_output=True,
        text=True,
        timeout=timeout(60),
    )
    assert result.returncode == 2
    assert "peers[0].pool_size" in result.stderr and str(bad) in result.stderr


def test_site_host_example_parses(tmp_path, any_backend):
    """The production example: credentials from systemd, absolute paths."""
    path = tmp_path / "qkdd.toml"
    path.write_text(site_host_example(tmp_path, any_backend))
    config = load_config(path)
    assert config.identity_key.credential == "qkdd-identity"
    assert config.key_encryption_key.credential == "qkdd-kek"
    assert config.consumers[0].uid == 1001
    assert str(config.api_socket) == "/run/qkdd/api.sock"


def etsi014_device(site_dir: Path, **changes: str) -> Path:
    fields = {
        "url": '"https://kme-a.example:8443/kme"',
        "certificate": '"site-a/kme-client.crt"',
        "private_key": '"site-a/kme-client.key"',
        "ca": '"site-a/kme-ca.crt"',
        "own_sae_id": '"qkdd-site-a"',
        "peer_sae_id": '"qkdd-site-b"',
        **changes,
    }
    body = "".join(f"{k} = {v}\n" for k, v in fields.items())
    return edit(
        site_dir,
        'kind = "serial"\npath = "qkd-a.tty"\nbaudrate = 115200\n',
        f'kind = "etsi014"\n{body}',
    )


def test_etsi014_device(site_dir):
    device = load_config(etsi014_device(site_dir)).peers[0].device
    assert device.kind == "etsi014"
    assert device.url == "https://kme-a.example:8443/kme"
    assert device.certificate == site_dir / "site-a" / "kme-client.crt"
    assert (device.own_sae_id, device.peer_sae_id, device.key_size) == (
        "qkdd-site-a",
        "qkdd-site-b",
        256,
    )


@pytest.mark.parametrize(
    "changes,key,expected",
    [
        ({"url": '"http://kme"'}, "peers[0].device.url", "https://"),
        ({"key_size": "100"}, "peers[0].device.key_size", "multiple of 8"),
        ({"path": '"x"'}, "peers[0].device.path", "no such key"),
    ],
)
def test_etsi014_device_errors(site_dir, changes, key, expected):
    with pytest.raises(ConfigError) as info:
        load_config(etsi014_device(site_dir, **changes))
    assert info.value.key == key and expected in info.value.expected


# -- SAEs, pool sizes and the metrics listener ---------------------------------------------


def test_an_sae_is_at_one_site_only(site_dir):
    # A consumer here also listed at the peer would make a pair of SAEs at one site, which
    # no QKD link serves.
    path = edit(site_dir, 'remote_sae_ids = ["sae-b"]', 'remote_sae_ids = ["sae-b", "sae-a"]')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == "peers[0].remote_sae_ids[1]"
    assert "not one of this site's [[consumers]]" in info.value.expected


def test_an_sae_is_listed_under_one_peer_only(site_dir):
    text = (site_dir / "site-a.toml").read_text()
    peer = text[text.index("[[peers]]") :]
    second = peer.replace('site_id = "site-b"', 'site_id = "site-c"')
    (site_dir / "site-a.toml").write_text(text + "\n" + second)
    with pytest.raises(ConfigError) as info:
        load_config(site_dir / "site-a.toml")
    assert info.value.key == "peers[1].remote_sae_ids[0]" and "site-b" in info.value.expected


def test_pool_smaller_than_a_request_is_warned_about(site_dir):
    path = edit(site_dir, "pool_size = 64", "pool_size = 32")
    (warning,) = config_warnings(load_config(path))
    assert "peers[0].pool_size" in warning and "api.max_keys_per_request" in warning
    assert "32" in warning and str(path) in warning
    assert config_warnings(load_config(edit(site_dir, "pool_size = 32", "pool_size = 4096"))) == []


def test_check_config_prints_warnings_and_still_succeeds(site_dir, capsys):
    path = edit(site_dir, "pool_size = 64", "pool_size = 32")
    for site in ("site-a",):
        (site_dir / site / "identity.key").write_bytes(os.urandom(32))
        (site_dir / site / "kek.bin").write_bytes(os.urandom(32))
    assert main(["check-config", str(path)]) == 0
    out, err = capsys.readouterr()
    assert "OK" in out
    assert "qkdd: config warning:" in err and "peers[0].pool_size" in err


def test_metrics_listener_on_tcp_or_a_unix_socket(site_dir):
    path = site_dir / "site-a.toml"
    text = path.read_text()
    assert load_config(path).metrics is None  # off by default
    path.write_text(text + '\n[metrics]\nlisten = "127.0.0.1:9447"\n')
    config = load_config(path)
    assert config.metrics is not None and config.metrics.listen == ("127.0.0.1", 9447)
    assert config.metrics.socket is None and config_warnings(config) == []
    path.write_text(text + '\n[metrics]\nsocket = "site-a/metrics.sock"\nsocket_mode = 0o660\n')
    config = load_config(path)
    assert config.metrics is not None and config.metrics.listen is None
    assert config.metrics.socket == site_dir / "site-a" / "metrics.sock"
    assert config.metrics.socket_mode == 0o660


@pytest.mark.parametrize(
    ("table", "key", "expected"),
    [
        ("", "metrics.listen", "exactly one of"),
        ('listen = "127.0.0.1:9447"\nsocket = "m.sock"', "metrics.listen", "exactly one of"),
        ('listen = "9447"', "metrics.listen", '"host:port"'),
        ('listen = "127.0.0.1:9447"\nsocket_mode = 0o600', "metrics.socket_mode", "socket"),
        ('socket = "site-a/api.sock"', "metrics.socket", "api.socket"),
        ('socket = "m.sock"\nsocket_mode = 0o1777', "metrics.socket_mode", "0 to 511"),
        ('listen = "127.0.0.1:9447"\npath = "/metrics"', "metrics.path", "no such key"),
    ],
)
def test_bad_metrics_tables_name_the_key(site_dir, table, key, expected):
    path = site_dir / "site-a.toml"
    path.write_text(path.read_text() + f"\n[metrics]\n{table}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == key, info.value
    assert expected in info.value.expected, info.value


def test_metrics_on_a_non_loopback_address_is_warned_about(site_dir):
    path = site_dir / "site-a.toml"
    path.write_text(path.read_text() + '\n[metrics]\nlisten = "0.0.0.0:9447"\n')
    (warning,) = config_warnings(load_config(path))
    assert "metrics.listen" in warning and "loopback" in warning


def test_metrics_socket_directory_is_checked(site_dir):
    path = site_dir / "site-a.toml"
    path.write_text(path.read_text() + '\n[metrics]\nsocket = "nowhere/metrics.sock"\n')
    problems = check_files(load_config(path))
    assert "metrics.socket" in [p.key for p in problems]


def test_site_host_example_metrics_table_parses_once_uncommented(tmp_path, any_backend):
    text = site_host_example(tmp_path, any_backend)
    for line in ("[metrics]", 'listen = "127.0.0.1:9447"'):
        assert f"# {line}\n" in text
        text = text.replace(f"# {line}\n", f"{line}\n")
    path = tmp_path / "qkdd.toml"
    path.write_text(text)
    config = load_config(path)
    assert config.metrics is not None and config.metrics.listen == ("127.0.0.1", 9447)
    assert config_warnings(config) == []
