"""The daemon's key pool (StoreKeyPool) on real SQLite stores at two sites: assigned keys
(other sizes, additional slaves) confirmed through a peer-call function, per-SAE quotas."""

from __future__ import annotations

import dataclasses
import json
import uuid
from pathlib import Path

import pytest
from key_blocks import ids_of, materials_of, random_block

from qkdd.config import ConsumerConfig, SiteConfig, load_config
from qkdd.demo import prepare_directory
from qkdd.demo_sites import SITE_A, SITE_B
from qkdd.etsi014.handler import RequestHandler
from qkdd.etsi014.key_pool import InvalidKeyRequest, KeysUnavailable, UnknownKeys
from qkdd.http_server.exchange import ApiRequest, ApiResponse, Caller
from qkdd.keystore import HybridKey, KeyStore
from qkdd.peer.calls import CallKind, CallRefused, KeyAssign
from qkdd.quota import QuotaBook, QuotaExceeded
from qkdd.store_pool import StoreKeyPool

KEK = bytes(range(32))
A_SAE, B_SAE, B2_SAE = SITE_A.sae_id, SITE_B.sae_id, "sae-b2"


class Live:
    def __init__(self, config: SiteConfig) -> None:
        self.config = config


def site_config(configs: dict[str, Path], site: object, quota: int | None = None) -> SiteConfig:
    path = configs[site.site_id]  # type: ignore[attr-defined]
    text = path.read_text()
    extra_b = True
    if extra_b:
        text = text.replace(f'["{B_SAE}"]', f'["{B_SAE}", "{B2_SAE}"]')
        if site is SITE_B:
            text = text.replace("[[peers]]", f'[[consumers]]\nsae_id = "{B2_SAE}"\n\n[[peers]]')
    if quota is not None:
        text = text.replace(f'sae_id = "{A_SAE}"', f'sae_id = "{A_SAE}"\nkeys_per_hour = {quota}')
    path.write_text(text)
    return load_config(path)


def shared_keys(stores: list[KeyStore], n: int, peer_sites: list[str]) -> list[HybridKey]:
    """One block of ``n`` keys agreed at both sites; the keys, in order."""
    block = random_block(n, A_SAE, B_SAE)
    for store, peer in zip(stores, peer_sites, strict=True):
        batch = store.next_batch_id(peer)
        store.add_batch(peer, batch, [block], [])
        store.commit_batch(peer, batch)
    return [HybridKey(*key) for key in zip(ids_of(block), materials_of(block), strict=True)]


@pytest.fixture
def sites(tmp_path):
    store_a = KeyStore(tmp_path / "a.db", KEK)
    store_b = KeyStore(tmp_path / "b.db", KEK)
    configs = prepare_directory(tmp_path)
    config_b = site_config(configs, SITE_B)
    pool_b = StoreKeyPool(Live(config_b), store_b, lambda site: None)
    calls: list[int] = []

    async def call_peer(site: str, kind: int, body: bytes, timeout: float) -> bytes:
        assert site == SITE_B.site_id
        calls.append(kind)
        return pool_b.accept_assignment(SITE_A.site_id, body)

    clock = [1000.0]
    pool_a = StoreKeyPool(
        Live(site_config(configs, SITE_A, quota=10)),
        store_a,
        lambda site: None,
        call_peer,
        clock=lambda: clock[0],
    )
    keys = shared_keys([store_a, store_b], 20, [SITE_B.site_id, SITE_A.site_id])
    yield pool_a, pool_b, store_a, store_b, keys, calls, clock
    store_a.close()
    store_b.close()


async def test_assigned_keys_are_cut_from_whole_shared_keys(sites):
    pool_a, pool_b, store_a, _store_b, keys, calls, _clock = sites
    (big,) = await pool_a.take_assigned(A_SAE, B_SAE, 1, 600, ())
    # 600 bits need three 256-bit keys, taken oldest first and cut to 75 bytes.
    assert big.material == b"".join(k.material for k in keys[:3])[:75]
    assert calls == [CallKind.KEY_ASSIGN]
    assert store_a.ready_count(A_SAE, B_SAE) == 17
    assert pool_b.take_for_slave(A_SAE, B_SAE, [big.key_id])[0].material == big.material
    with pytest.raises(UnknownKeys):  # once
        pool_b.take_for_slave(A_SAE, B_SAE, [big.key_id])
    with pytest.raises(UnknownKeys):  # its constituents are gone at B too
        pool_b.take_for_slave(A_SAE, B_SAE, [keys[0].key_id])


async def test_additional_slaves_collect_once_each(sites):
    pool_a, pool_b, *_ = sites
    keys = await pool_a.take_assigned(A_SAE, B_SAE, 2, 256, (B2_SAE,))
    ids = [k.key_id for k in keys]
    assert [k.material for k in pool_b.take_for_slave(A_SAE, B2_SAE, ids)] == [
        k.material for k in keys
    ]
    assert [k.material for k in pool_b.take_for_slave(A_SAE, B_SAE, ids)] == [
        k.material for k in keys
    ]
    with pytest.raises(UnknownKeys):
        pool_b.take_for_slave(A_SAE, B2_SAE, ids[:1])


async def test_refused_assignment_is_503_and_nothing_is_delivered(sites, tmp_path):
    pool_a, _pool_b, store_a, store_b, keys, _calls, _clock = sites
    # B lost the keys A is about to use (e.g. they expired there): B refuses, A says why.
    store_b.take_by_ids(A_SAE, B_SAE, [keys[0].key_id])
    with pytest.raises(KeysUnavailable, match="not held here"):
        await pool_a.take_assigned(A_SAE, B_SAE, 1, 512, ())
    # B is unchanged by the refused call: its copy of keys[1] still serves by ID.
    assert store_b.take_by_ids(A_SAE, B_SAE, [keys[1].key_id]) is not None


def test_assignment_from_the_wrong_site_or_for_strangers_is_refused(sites):
    _pool_a, pool_b, *_rest, keys, _calls, _clock = sites
    from qkdd.peer.calls import KeyAssignment

    def body(master: str, slaves: tuple[str, ...]) -> bytes:
        a = KeyAssignment(str(uuid.uuid4()), 256, master, slaves, (keys[5].key_id,))
        return KeyAssign((a,)).encode()

    with pytest.raises(CallRefused, match="not a master SAE"):
        pool_b.accept_assignment(SITE_A.site_id, body(B_SAE, (B_SAE,)))
    with pytest.raises(CallRefused, match="not served here"):
        pool_b.accept_assignment(SITE_A.site_id, body(A_SAE, (A_SAE,)))


async def test_slaves_at_other_sites_are_invalid(sites):
    pool_a, *_ = sites
    with pytest.raises(InvalidKeyRequest, match="slave's site"):
        await pool_a.take_assigned(A_SAE, B_SAE, 1, 256, (A_SAE,))


async def test_quota_refuses_with_when_room_comes_back_and_status_shows_it(sites):
    pool_a, *_rest, clock = sites
    assert len(pool_a.take_for_master(A_SAE, B_SAE, 6, 256)) == 6
    await pool_a.take_assigned(A_SAE, B_SAE, 2, 512, ())  # 2 keys against the quota, not 4
    st = pool_a.status(A_SAE, B_SAE)
    assert st.extension == {
        "qkdd_quota_keys_per_hour": 10,
        "qkdd_quota_used": 8,
        "qkdd_quota_remaining": 2,
    }
    with pytest.raises(KeysUnavailable, match=r"used 8 of its 10 keys per hour.*3600 s"):
        pool_a.take_for_master(A_SAE, B_SAE, 3, 256)
    assert len(pool_a.take_for_master(A_SAE, B_SAE, 2, 256)) == 2
    clock[0] += 3600.5
    assert pool_a.quota_state(A_SAE).remaining == 10
    assert len(pool_a.take_for_master(A_SAE, B_SAE, 1, 256)) == 1


def test_quota_book_window_and_oversized_requests():
    book = QuotaBook(window=10.0)
    book.check("s", None, 10**9, 0.0)  # no quota: anything goes
    book.charge("s", 3, 0.0)
    book.charge("s", 4, 5.0)
    with pytest.raises(QuotaExceeded, match="room for 2 more in 10 s"):
        book.check("s", 8, 2, 0.0)
    with pytest.raises(QuotaExceeded, match="room for 2 more in 5 s"):
        book.check("s", 8, 2, 5.0)
    book.check("s", 8, 2, 10.0)  # the first charge aged out
    assert book.state("s", 8, 11.0).used == 4
    with pytest.raises(QuotaExceeded, match="at most 8 keys per hour"):
        book.check("s", 8, 9, 100.0)
    assert ConsumerConfig("x", None).keys_per_hour is None


# -- what the Status object advertises can be served ------------------------------------


def handler_of(pool: StoreKeyPool) -> RequestHandler:
    return RequestHandler(pool)


def call(pool: StoreKeyPool, sae: str, target: str) -> tuple[int, dict]:
    answer = handler_of(pool).handle(ApiRequest("GET", target), Caller(1, 1, frozenset({sae})))
    assert isinstance(answer, ApiResponse)
    return answer.status, json.loads(answer.body)


def allow_128_per_request(pool: StoreKeyPool) -> None:
    """The site keeps 64 ready keys per pair (the demo's pool_size) and allows 128 keys per
    request: a request for 65 to 128 keys can never be met."""
    live = pool._live
    assert live.config.peers[0].pool_size == 64
    live.config = dataclasses.replace(live.config, max_keys_per_request=128)  # type: ignore[attr-defined]


def test_status_never_advertises_more_keys_per_request_than_the_pool_holds(sites):
    _pool_a, pool_b, *_ = sites
    allow_128_per_request(pool_b)
    status, obj = call(pool_b, B_SAE, f"/api/v1/keys/{A_SAE}/status")
    assert status == 200 and obj["max_key_count"] == 64
    assert obj["max_key_per_request"] == 64
    # dec_keys collects keys by ID; uncollected keys are not bounded by the pool size.
    assert pool_b.limits(A_SAE, B_SAE).max_key_per_request == 128


def test_request_for_more_keys_than_the_pool_ever_holds_is_400_with_the_reason(sites):
    _pool_a, pool_b, *_ = sites
    allow_128_per_request(pool_b)
    status, obj = call(pool_b, B_SAE, f"/api/v1/keys/{A_SAE}/enc_keys?number=65")
    assert status == 400
    assert "64" in obj["message"] and "pool_size" in obj["message"]
    status, _ = call(pool_b, B_SAE, f"/api/v1/keys/{A_SAE}/enc_keys?number=64")
    assert status == 503  # possible once the pool has refilled: retry later


async def test_assigned_keys_needing_more_than_the_pool_holds_are_invalid(sites):
    pool_a, *_rest, calls, _clock = sites
    # 3 keys of 8192 bits need 96 ready keys of 256 bits; the pool holds at most 64.
    with pytest.raises(InvalidKeyRequest, match="pool_size"):
        await pool_a.take_assigned(A_SAE, B_SAE, 3, 8192, ())
    assert calls == []


def test_quota_caps_what_status_advertises_and_a_request_beyond_it_is_400(sites):
    pool_a, *_ = sites  # A's SAE may take 10 keys per hour
    status, obj = call(pool_a, A_SAE, f"/api/v1/keys/{B_SAE}/status")
    assert status == 200 and obj["max_key_per_request"] == 10
    status, obj = call(pool_a, A_SAE, f"/api/v1/keys/{B_SAE}/enc_keys?number=11")
    assert status == 400 and "keys_per_hour" in obj["message"]
    with pytest.raises(InvalidKeyRequest, match="at most 10 keys per hour"):
        pool_a.take_for_master(A_SAE, B_SAE, 11, 256)


@pytest.mark.parametrize(
    "operation", ["status", "enc_keys", "dec_keys?key_ID=" + str(uuid.UUID(int=1))]
)
def test_a_pair_of_saes_at_the_same_site_is_refused_with_400(sites, operation):
    _pool_a, pool_b, *_ = sites  # sae-b and sae-b2 are both consumers at site B
    status, obj = call(pool_b, B_SAE, f"/api/v1/keys/{B2_SAE}/{operation}")
    assert status == 400
    assert "both at site site-b" in obj["message"] and "peer site" in obj["message"]
    with pytest.raises(InvalidKeyRequest):
        pool_b.status(B_SAE, B2_SAE)


def with_quota(config: SiteConfig, quota: int | None) -> SiteConfig:
    """The config, reloaded with this quota for A's SAE."""
    consumers = tuple(
        dataclasses.replace(c, keys_per_hour=quota) if c.sae_id == A_SAE else c
        for c in config.consumers
    )
    return dataclasses.replace(config, consumers=consumers)


def test_what_a_request_may_ask_for_follows_a_reload(sites):
    pool_a, *_ = sites  # A's SAE may take 10 keys per hour
    assert pool_a.limits(A_SAE, B_SAE).max_key_per_request == 10
    live = pool_a._live
    live.config = with_quota(live.config, 3)
    assert pool_a.limits(A_SAE, B_SAE).max_key_per_request == 3
    with pytest.raises(InvalidKeyRequest, match="at most 3 keys per hour"):
        pool_a.take_for_master(A_SAE, B_SAE, 4, 256)
    live.config = with_quota(live.config, None)
    assert pool_a.limits(A_SAE, B_SAE).max_key_per_request == 64  # the pool_size
    assert len(pool_a.take_for_master(A_SAE, B_SAE, 11, 256)) == 11


def test_only_an_sae_under_a_quota_is_charged(sites):
    """What an SAE without a quota takes is not remembered (no entry per request, however
    many it makes); a quota set by a reload counts from then on."""
    pool_a, *_ = sites
    live = pool_a._live
    quota = live.config
    live.config = with_quota(quota, None)
    assert len(pool_a.take_for_master(A_SAE, B_SAE, 3, 256)) == 3
    assert pool_a.quota_state(A_SAE).used == 0
    live.config = quota
    assert pool_a.quota_state(A_SAE).remaining == 10
    assert len(pool_a.take_for_master(A_SAE, B_SAE, 2, 256)) == 2
    assert pool_a.quota_state(A_SAE).used == 2
