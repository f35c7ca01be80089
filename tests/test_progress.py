"""The watchdog's view of the key pipeline: progress or a known reason to idle, else stuck."""

from __future__ import annotations

import os
import uuid
from types import SimpleNamespace

import pytest
from key_blocks import random_block

from qkdd.keystore import KeyStore, StoredQkdKey, StoreError
from qkdd.link_params import LinkParameters
from qkdd.progress import ProgressWatch

GRACE = 60.0


@pytest.fixture
def store(tmp_path):
    store = KeyStore(tmp_path / "keys.sqlite3", os.urandom(32))
    yield store
    store.close()


def link(session_up=True, pool_size=2):
    params = LinkParameters(
        "site-a", "site-b", frozenset({"sae-a"}), frozenset({"sae-b"}), 256, pool_size
    )
    return SimpleNamespace(params=params, session_up=session_up)


def buffer_qkd(store, n=4):
    store.store_qkd_keys(
        "site-b", [StoredQkdKey(str(uuid.uuid4()), os.urandom(32)) for _ in range(n)]
    )


def make_keys(store, batch_id, n=1):
    store.add_batch("site-b", batch_id, [random_block(n, "sae-a", "sae-b")], [])
    store.commit_batch("site-b", batch_id)


def test_a_link_that_wants_and_can_but_makes_nothing_is_stuck(store):
    buffer_qkd(store)
    watch = ProgressWatch({"site-b": link()}, store, GRACE)
    assert watch.problem(0.0) is None
    assert watch.problem(GRACE - 1) is None
    problem = watch.problem(GRACE + 1)
    assert problem is not None and "link to site-b" in problem


def test_progress_restarts_the_clock(store):
    buffer_qkd(store)
    watch = ProgressWatch({"site-b": link(pool_size=4)}, store, GRACE)
    watch.problem(0.0)
    make_keys(store, 1)
    assert watch.problem(GRACE + 1) is None  # a key was made: progress
    assert watch.problem(2 * GRACE) is None
    assert watch.problem(2 * GRACE + 2) is not None


@pytest.mark.parametrize("reason", ["no session", "no QKD keys", "pools full"])
def test_idle_for_a_known_reason_is_not_stuck(store, reason):
    if reason != "no QKD keys":
        buffer_qkd(store)
    if reason == "pools full":
        make_keys(store, 1, n=2)
    watch = ProgressWatch({"site-b": link(session_up=reason != "no session")}, store, GRACE)
    for now in (0.0, GRACE, 10 * GRACE):
        assert watch.problem(now) is None


def test_a_store_that_does_not_answer_is_reported(store):
    watch = ProgressWatch({"site-b": link()}, store, GRACE)
    store.close()
    with pytest.raises(StoreError):
        watch.problem(0.0)
