"""MemoryKeyPool: the KeyPool contract (once only, all or nothing, nothing lost)."""

from __future__ import annotations

import pytest

from qkdd.etsi014.key_pool import KeysUnavailable, PoolKey, UnknownKeys
from qkdd.etsi014.memory_pool import MemoryKeyPool

A, B = "SAE-A", "SAE-B"


def test_repr_hides_material() -> None:
    key = PoolKey("id-1", b"\x8b\xad\xf0\x0d-secret")
    assert "secret" not in repr(key) and "8b" not in repr(key) and "id-1" in repr(key)


def test_master_keys_are_cut_from_ready_material_in_order() -> None:
    pool = MemoryKeyPool([A, B], key_size=64, min_key_size=8)
    pool.add_material(A, B, bytes(range(24)))
    first = pool.take_for_master(A, B, 2, 64)
    assert [k.material for k in first] == [bytes(range(8)), bytes(range(8, 16))]
    third = pool.take_for_master(A, B, 1, 32)[0]
    assert third.material == bytes(range(16, 20))
    assert pool.status(A, B).stored_key_count == 0  # 4 bytes left: less than one 64-bit key
    assert pool.pending_key_ids(A, B) == [first[0].key_id, first[1].key_id, third.key_id]


def test_shortage_takes_nothing() -> None:
    pool = MemoryKeyPool([A, B])
    pool.fill(A, B, 3)
    with pytest.raises(KeysUnavailable, match="only 3 keys"):
        pool.take_for_master(A, B, 4, 256)
    assert pool.status(A, B).stored_key_count == 3
    assert len(pool.take_for_master(A, B, 3, 256)) == 3


def test_pairs_are_directional() -> None:
    pool = MemoryKeyPool([A, B])
    pool.fill(A, B, 1)
    with pytest.raises(KeysUnavailable):
        pool.take_for_master(B, A, 1, 256)
    key = pool.take_for_master(A, B, 1, 256)[0]
    with pytest.raises(UnknownKeys):
        pool.take_for_slave(B, A, [key.key_id])
    assert pool.take_for_slave(A, B, [key.key_id]) == [key]


def test_slave_take_is_all_or_nothing_and_once() -> None:
    pool = MemoryKeyPool([A, B])
    pool.fill(A, B, 2)
    k1, k2 = pool.take_for_master(A, B, 2, 256)
    with pytest.raises(UnknownKeys):
        pool.take_for_slave(A, B, [k1.key_id, "nope"])
    with pytest.raises(UnknownKeys):
        pool.take_for_slave(A, B, [k1.key_id, k1.key_id])
    assert pool.take_for_slave(A, B, [k2.key_id, k1.key_id]) == [k2, k1]
    with pytest.raises(UnknownKeys):
        pool.take_for_slave(A, B, [k1.key_id])


def test_capacity_drops_excess_material() -> None:
    pool = MemoryKeyPool([A, B], key_size=64, min_key_size=64, max_key_count=2)
    assert pool.add_material(A, B, bytes(20)) == 16
    assert pool.add_material(A, B, bytes(1)) == 0
    assert pool.status(A, B).stored_key_count == 2


def test_unavailable_reason_is_raised() -> None:
    pool = MemoryKeyPool([A, B])
    pool.fill(A, B, 1)
    pool.unavailable = "peer site unreachable"
    with pytest.raises(KeysUnavailable, match="peer site unreachable"):
        pool.take_for_master(A, B, 1, 256)


def test_rejects_bad_geometry() -> None:
    with pytest.raises(ValueError):
        MemoryKeyPool([A], key_size=100)
