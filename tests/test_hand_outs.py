"""Hand-outs gathered into one store transaction: ``KeyStore.handing_out`` (real SQLite
stores) and ``GatheredHandOuts``, which runs the hand-outs of the tasks ready at the same
moment in one such block."""

from __future__ import annotations

import errno
import functools
import os
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio
import trio.testing
from key_blocks import held_keys, ids_of, materials_of, random_block

from qkdd.durability import DurabilityLost, GroupCommit
from qkdd.etsi014.hand_outs import GatheredHandOuts
from qkdd.etsi014.key_pool import KeysUnavailable
from qkdd.keystore import KeyStore, NewKeyBlock
from qkdd.sealing import key_chunk_aad
from qkdd.store.key_blocks import keys_per_chunk

KEK = bytes(range(32))
A, B = "sae-a", "sae-b"
PER_CHUNK = keys_per_chunk(256)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[KeyStore]:
    store = KeyStore(tmp_path / "keys.sqlite3", KEK, group_commit=True)
    yield store
    store.close()


def fill(store: KeyStore, count: int) -> NewKeyBlock:
    block = random_block(count, A, B)
    batch = store.next_batch_id("site-b")
    store.add_batch("site-b", batch, [block], [])
    store.commit_batch("site-b", batch)
    return block


def statements(store: KeyStore) -> list[str]:
    """The SQL the store's connection runs from now on."""
    seen: list[str] = []
    store._db.set_trace_callback(seen.append)
    return seen


def test_hand_outs_in_one_block_share_one_commit_and_one_write_per_chunk(
    store: KeyStore,
) -> None:
    block = fill(store, 3 * PER_CHUNK)
    commits = store.commits
    seen = statements(store)
    with store.handing_out():
        taken = [store.hand_out(A, B, 1) for _ in range(5)]
        taken.append(store.hand_out(A, B, PER_CHUNK))
        taken.append(store.hand_out(A, B, 2))
    store._db.set_trace_callback(None)
    ids = [key_id for key_ids, _ in taken for key_id in key_ids]
    materials = [material for _, mats in taken for material in mats]
    # The oldest keys, in order, as one hand-out of them all would give.
    assert ids == ids_of(block)[: PER_CHUNK + 7]
    assert materials == materials_of(block)[: PER_CHUNK + 7]
    assert store.commits == commits + 1
    writes = [s.split()[0] for s in seen if s.split()[0] in ("UPDATE", "DELETE")]
    assert writes == ["UPDATE", "DELETE"]  # the second chunk once; the first, emptied, once
    assert store.ready_count(A, B) == 2 * PER_CHUNK - 7
    assert set(held_keys(store, A, B)) == set(ids_of(block)[PER_CHUNK + 7 :])


def test_keys_handed_out_in_a_block_are_erased_by_its_commit(store: KeyStore) -> None:
    block = fill(store, PER_CHUNK)
    with store.handing_out():
        store.hand_out(A, B, 3)
        store.take_ready(A, B, 2)
    ((peer, prefix, first, count, taken, sealed),) = store._db.execute(
        "SELECT peer_site, id_prefix, first_index, count, taken, material FROM key_chunks"
    )
    aad = key_chunk_aad(peer, prefix, first, count, A, B, 256, taken)
    plain = store.sealer.open(aad, sealed)
    assert plain[: 5 * 32] == bytes(5 * 32)
    assert plain[5 * 32 :] == block.material[5 * 32 :]
    assert int.from_bytes(taken, "little") == 0b11111


def test_a_block_that_raises_hands_nothing_out(store: KeyStore) -> None:
    block = fill(store, PER_CHUNK + 10)
    commits = store.commits
    with pytest.raises(ZeroDivisionError), store.handing_out():
        assert store.hand_out(A, B, PER_CHUNK + 1)[0]
        1 / 0  # noqa: B018
    assert store.ready_count(A, B) == PER_CHUNK + 10
    assert set(held_keys(store, A, B)) == set(ids_of(block))
    assert store.take_ready(A, B, 1)[0].key_id == ids_of(block)[0]
    assert store.commits == commits + 1  # the rolled-back block committed nothing


def test_a_short_hand_out_in_a_block_takes_nothing_and_leaves_the_others(
    store: KeyStore,
) -> None:
    block = fill(store, 4)
    with store.handing_out():
        first = store.hand_out(A, B, 1)
        short = store.hand_out(A, B, 4)  # 3 are left
        last = store.hand_out(A, B, 3)
    assert short == ([], [])
    assert first[0] + last[0] == ids_of(block)
    assert store.ready_count(A, B) == 0


def test_blocks_do_not_nest(store: KeyStore) -> None:
    fill(store, 4)
    with store.handing_out():
        with pytest.raises(RuntimeError, match="gathered already"), store.handing_out():
            pass
        store.hand_out(A, B, 1)
    assert store.ready_count(A, B) == 3


# -- GatheredHandOuts --------------------------------------------------------------------


async def run_together(
    hand_outs: GatheredHandOuts, takes: list[Callable[[], object]]
) -> list[object]:
    """Each take asked for by a task of its own, all started at once; what each got (or
    raised)."""
    got: list[object] = [None] * len(takes)

    async def ask(place: int) -> None:
        try:
            got[place] = await hand_outs(takes[place])
        except Exception as exc:
            got[place] = exc

    async with trio.open_nursery() as nursery:
        for place in range(len(takes)):
            nursery.start_soon(ask, place)
    return got


async def test_hand_outs_asked_for_together_run_in_one_block(store: KeyStore) -> None:
    block = fill(store, 100)
    hand_outs = GatheredHandOuts(store.handing_out)
    commits = store.commits
    got = await run_together(hand_outs, [functools.partial(store.hand_out, A, B, 3)] * 10)
    ids = [key_id for key_ids, _ in got for key_id in key_ids]  # type: ignore[misc]
    assert sorted(ids) == sorted(ids_of(block)[:30])
    assert (hand_outs.blocks, hand_outs.hand_outs) == (1, 10)
    assert store.commits == commits + 1


async def test_a_hand_out_asked_for_alone_is_a_block_of_its_own(store: KeyStore) -> None:
    fill(store, 10)
    hand_outs = GatheredHandOuts(store.handing_out)
    for _ in range(2):
        ids, _ = await hand_outs(functools.partial(store.hand_out, A, B, 2))
        assert len(ids) == 2
    assert (hand_outs.blocks, hand_outs.hand_outs) == (2, 2)


async def test_each_hand_out_keeps_its_own_failure(store: KeyStore) -> None:
    fill(store, 10)
    hand_outs = GatheredHandOuts(store.handing_out)

    def refused() -> object:
        raise KeysUnavailable("not now")

    take = functools.partial(store.hand_out, A, B, 2)
    got = await run_together(hand_outs, [take, refused, take])
    assert isinstance(got[1], KeysUnavailable)
    assert len(got[0][0]) == len(got[2][0]) == 2  # type: ignore[index]
    assert store.ready_count(A, B) == 6 and hand_outs.blocks == 1


async def test_a_block_that_fails_to_commit_hands_nothing_out(
    store: KeyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    block = fill(store, 10)
    hand_outs = GatheredHandOuts(store.handing_out)
    write_back = store._write_back

    def failing(*args: object) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(store, "_write_back", failing)
    take = functools.partial(store.hand_out, A, B, 2)
    got = await run_together(hand_outs, [take, take, take])
    assert all(isinstance(outcome, sqlite3.OperationalError) for outcome in got)
    assert store.ready_count(A, B) == 10
    assert set(held_keys(store, A, B)) == set(ids_of(block))
    monkeypatch.setattr(store, "_write_back", write_back)
    got = await run_together(hand_outs, [take, take])
    assert sorted(key_id for ids, _ in got for key_id in ids) == ids_of(block)[:4]  # type: ignore[misc]


async def test_a_hand_out_asked_for_runs_even_if_its_caller_is_cancelled(
    store: KeyStore,
) -> None:
    """Keys handed out are erased: whoever asked for them gets them, cancelled or not."""
    fill(store, 10)
    hand_outs = GatheredHandOuts(store.handing_out)
    take = functools.partial(store.hand_out, A, B, 1)
    got: list[object] = []

    async def ask() -> None:
        got.append(await hand_outs(take))

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(ask)
        nursery.cancel_scope.cancel()  # before any of them has run
    assert len(got) == 3 and store.ready_count(A, B) == 7


async def test_with_the_barrier_a_block_is_durable_before_any_of_its_hand_outs_returns(
    store: KeyStore,
) -> None:
    fill(store, 20)
    barrier = GroupCommit(store)
    await barrier.durable()
    hand_outs = GatheredHandOuts(store.handing_out, barrier)
    syncs = barrier.syncs
    got = await run_together(hand_outs, [functools.partial(store.hand_out, A, B, 2)] * 5)
    assert all(len(ids) == 2 for ids, _ in got)  # type: ignore[misc]
    assert barrier.syncs == syncs + 1  # the block's sync, before they returned...
    await barrier.durable()
    assert barrier.syncs == syncs + 1  # ...so none is left to do
    barrier.close()


async def test_a_block_that_cannot_be_made_durable_gives_nobody_its_keys(
    store: KeyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    fill(store, 20)
    barrier = GroupCommit(store)
    await barrier.durable()
    hand_outs = GatheredHandOuts(store.handing_out, barrier)

    def failing(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", failing)
    got = await run_together(hand_outs, [functools.partial(store.hand_out, A, B, 2)] * 3)
    assert all(isinstance(outcome, DurabilityLost) for outcome in got)
    barrier.close()
