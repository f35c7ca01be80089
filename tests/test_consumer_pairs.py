"""`[[consumers]] talks_to`: key pools are filled only for the local -> remote SAE pairs some
consumer talks to. Two consumers at each site, each talking to one SAE at the other: four
pools in all are filled, not eight, and status and the key service show only those."""

from __future__ import annotations

import base64
import os
import uuid
from types import SimpleNamespace

import pytest
from link_pair import pump_until_quiet

from qkdd.config import ConfigError, config_from_bytes
from qkdd.etsi014.key_pool import InvalidKeyRequest
from qkdd.keystore import KeyStore, StoredQkdKey
from qkdd.link_params import LinkParameters
from qkdd.peer.agreement import LinkAgreement
from qkdd.status import pool_levels
from qkdd.store_pool import StoreKeyPool

SESSION = b"t" * 32
POOL = 4
ALL_A_TO_B = {(m, s) for m in ("sae-a", "sae-a2") for s in ("sae-b", "sae-b2")}


def site_a_toml(talks_a: str, talks_a2: str, public_key: str) -> bytes:
    return f"""
site_id = "site-a"
listen = "127.0.0.1:47101"
state_directory = "state"
[identity]
private_key = "identity.key"
[store]
key_encryption_key = "kek.bin"
[api]
socket = "api.sock"
max_keys_per_request = {POOL}
[[consumers]]
sae_id = "sae-a"
{talks_a}
[[consumers]]
sae_id = "sae-a2"
{talks_a2}
[[peers]]
site_id = "site-b"
address = "127.0.0.1:47102"
public_key = "{public_key}"
remote_sae_ids = ["sae-b", "sae-b2"]
pool_size = {POOL}
[peers.device]
kind = "serial"
path = "qkd.tty"
""".encode()


@pytest.fixture
def public_key(any_backend) -> str:
    key = any_backend.signing_key_from_seed(os.urandom(32))
    return base64.b64encode(key.public_bytes).decode()


def test_talks_to_gives_the_pairs_and_defaults_to_every_remote_sae(tmp_path, public_key):
    file = tmp_path / "site-a.toml"
    restricted = config_from_bytes(
        file, site_a_toml('talks_to = ["sae-b"]', 'talks_to = ["sae-b2"]', public_key)
    )
    assert restricted.talking_pairs() == {("sae-a", "sae-b"), ("sae-a2", "sae-b2")}
    everyone = config_from_bytes(file, site_a_toml("", "", public_key))
    assert everyone.talking_pairs() == ALL_A_TO_B


def test_talks_to_must_name_a_remote_sae(tmp_path, public_key):
    with pytest.raises(ConfigError) as caught:
        config_from_bytes(
            tmp_path / "site-a.toml",
            site_a_toml('talks_to = ["sae-b"]', 'talks_to = ["sae-c"]', public_key),
        )
    assert caught.value.key == "consumers[1].talks_to[0]"
    assert "remote_sae_ids" in str(caught.value) and "sae-c" in str(caught.value)


def link_params(local: str, peer: str, pairs: set[tuple[str, str]] | None) -> LinkParameters:
    saes = {"site-a": frozenset({"sae-a", "sae-a2"}), "site-b": frozenset({"sae-b", "sae-b2"})}
    return LinkParameters(
        local,
        peer,
        saes[local],
        saes[peer],
        256,
        POOL,
        pool_pairs=None if pairs is None else frozenset(pairs),
    )


def agree(
    a: KeyStore, b: KeyStore, backend, pairs_a, pairs_b
) -> tuple[LinkParameters, LinkParameters]:
    """Feed both sites the same QKD keys and let the link master (A) and slave (B) agree
    until nothing more is wanted."""
    keys = [StoredQkdKey(str(uuid.uuid4()), os.urandom(32)) for _ in range(64)]
    a.store_qkd_keys("site-b", keys)
    b.store_qkd_keys("site-a", keys)
    params_a, params_b = (
        link_params("site-a", "site-b", pairs_a),
        link_params("site-b", "site-a", pairs_b),
    )
    master = LinkAgreement(params_a, store=a, backend=backend, session_id=SESSION)
    slave = LinkAgreement(params_b, store=b, backend=backend, session_id=SESSION)
    pump_until_quiet(
        master, slave, to_master=list(slave.start()), to_slave=list(master.start()), rounds=50
    )
    return params_a, params_b


def ready(store: KeyStore, pairs) -> dict[tuple[str, str], int]:
    return {pair: store.ready_count(*pair) for pair in sorted(pairs)}


def test_only_the_pairs_consumers_talk_to_are_filled(stores, backend):
    a, b = stores
    pairs_a = {("sae-a", "sae-b"), ("sae-a2", "sae-b2")}
    pairs_b = {("sae-b", "sae-a"), ("sae-b2", "sae-a2")}
    params_a, params_b = agree(a, b, backend, pairs_a, pairs_b)
    assert ready(a, ALL_A_TO_B) == {p: POOL if p in pairs_a else 0 for p in sorted(ALL_A_TO_B)}
    all_b_to_a = {(s, m) for m, s in ALL_A_TO_B}
    assert ready(b, all_b_to_a) == {p: POOL if p in pairs_b else 0 for p in sorted(all_b_to_a)}
    # Status (and the metrics, which read the same levels) list only the pairs in use.
    levels = pool_levels(SimpleNamespace(params=params_a), a)
    assert [(x.master_sae_id, x.slave_sae_id, x.taken_with) for x in levels] == [
        ("sae-a", "sae-b", "enc_keys"),
        ("sae-a2", "sae-b2", "enc_keys"),
        ("sae-b", "sae-a", "dec_keys"),
        ("sae-b2", "sae-a2", "dec_keys"),
    ]


def test_without_talks_to_every_pair_is_filled(stores, backend):
    a, b = stores
    agree(a, b, backend, None, None)
    assert set(ready(a, ALL_A_TO_B).values()) == {POOL}


def test_the_key_service_refuses_a_pair_nobody_talks_to(tmp_path, stores, public_key):
    a, _ = stores
    config = config_from_bytes(
        tmp_path / "site-a.toml",
        site_a_toml('talks_to = ["sae-b"]', 'talks_to = ["sae-b2"]', public_key),
    )
    pool = StoreKeyPool(SimpleNamespace(config=config), a, lambda site: None)
    with pytest.raises(InvalidKeyRequest, match="talks_to"):
        pool.take_for_master("sae-a", "sae-b2", 1, 256)
