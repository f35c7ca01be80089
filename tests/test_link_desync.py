"""Two QKD buffers out of step: each site holds runs of keys the other will never get (its
device restarted while the other daemon was down, a store was lost...). The link must line
the buffers up by itself, without a batch waiting out the slave's 5 s for every key that
never comes. Two real SQLite stores, two LinkAgreements, a simulated clock (link_pair)."""

from __future__ import annotations

import time

import pytest
from link_pair import LinkPair, qkd_keys
from timeouts import timeout

from qkdd.peer.agreement import QKD_KEY_WAIT_SECONDS
from qkdd.peer.agreement_messages import BatchAck, LinkMessage

STEP = 0.05  # simulated seconds per round trip


class Rejections:
    """Counts the batches the slave rejected after waiting out its 5 s for QKD keys that
    never came (a BATCH_ACK saying so, on its way to A). A batch naming keys the slave
    already knows are used is rejected at once, and is not counted."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, message: LinkMessage) -> list[LinkMessage]:
        if isinstance(message, BatchAck) and "never arrived" in message.reason:
            self.count += 1
        return [message]


def run_until_pools_fill(pair: LinkPair, device=None, *, simulated_limit: float) -> Rejections:
    """Step the pair until both pools are full; stop at ``simulated_limit`` seconds of
    simulated time (a protocol that waits per missing key never gets there) or when the
    wall-clock hang guard runs out."""
    rejections = Rejections()
    wall_deadline = time.monotonic() + timeout(120)
    while pair.ready() != (pair.pool_size, pair.pool_size):
        assert pair.now < simulated_limit, (
            f"pools {pair.ready()} after {pair.now:.0f} simulated s and "
            f"{rejections.count} rejected batches"
        )
        if time.monotonic() >= wall_deadline:  # only a hang gets here
            raise AssertionError("hang")
        if device is not None:
            device()
        pair.step(fate_to_a=rejections)
        pair.now += STEP
    return rejections


def test_runs_each_side_never_got_are_skipped_at_once(stores, backend):
    """2,000 keys only at A, 2,000 only at B, then the keys both got. The old behaviour
    proposed A's keys one batch at a time and the slave rejected each after its wait: 2,000
    x 5 s. Now the horizons and skips line the buffers up in a few round trips."""
    a, b = stores
    pair = LinkPair(a, b, backend, pool_size=4)
    pair.feed(qkd_keys(2000), only="a")
    pair.feed(qkd_keys(2000), only="b")
    pair.feed(qkd_keys(64))
    rejections = run_until_pools_fill(pair, simulated_limit=20 * QKD_KEY_WAIT_SECONDS)
    assert rejections.count == 0
    # Nothing of either run is left, and nothing of them can come back.
    assert a.qkd_key_count("site-b") == b.qkd_key_count("site-a")
    assert a.oldest_qkd_key_ids("site-b", 100) == b.oldest_qkd_key_ids("site-a", 100)


class Devices:
    """The two halves of one QKD link, as the emulator runs them: a new key goes into
    both halves' device buffers at once, only while both have room; each host takes what
    fits in its own QKD buffer (a full buffer holds its device back)."""

    def __init__(self, pair: LinkPair, capacity: int) -> None:
        self.pair = pair
        self.capacity = capacity
        self.halves: dict[str, list] = {"a": [], "b": []}

    def __call__(self) -> None:
        while all(len(half) < self.capacity for half in self.halves.values()):
            key = qkd_keys(1)
            for half in self.halves.values():
                half += key
        for side, store, peer in (("a", self.pair.a, "site-b"), ("b", self.pair.b, "site-a")):
            half = self.halves[side]
            room = self.pair.buffer_keys - store.qkd_key_count(peer)
            if room > 0 and half:
                store.store_qkd_keys(peer, half[:room])
                del half[:room]


@pytest.mark.parametrize("stale", ["a", "b"])
def test_a_full_buffer_of_keys_the_peer_never_had_is_dropped(stores, backend, stale):
    """One site's buffer is full of keys from a run of the device the other never saw
    (the device restarted while this daemon was away), so its device is held back and can
    never deliver the keys both will share; the other site's buffer is full of those. No
    key is in both buffers."""
    a, b = stores
    buffer_keys = 64
    pair = LinkPair(a, b, backend, pool_size=4, buffer_keys=buffer_keys)
    devices = Devices(pair, capacity=buffer_keys)
    pair.feed(qkd_keys(buffer_keys), only=stale)  # the old run: full
    fresh = "b" if stale == "a" else "a"
    shared = qkd_keys(buffer_keys)
    pair.feed(shared, only=fresh)  # the new run, taken by the other site: full too
    devices.halves[stale] += shared  # ...and held back in this site's device
    rejections = run_until_pools_fill(pair, devices, simulated_limit=20 * QKD_KEY_WAIT_SECONDS)
    assert rejections.count == 0


def test_a_skipped_key_is_used_up_on_both_sides_and_never_comes_back(stores, backend):
    a, b = stores
    pair = LinkPair(a, b, backend, pool_size=2)
    only_a = qkd_keys(8)
    pair.feed(only_a, only="a")
    pair.feed(qkd_keys(32))
    run_until_pools_fill(pair, simulated_limit=20 * QKD_KEY_WAIT_SECONDS)
    for key in only_a:
        assert a.is_qkd_key_consumed("site-b", key.key_id)
        assert b.is_qkd_key_consumed("site-a", key.key_id)
    # B's device delivering one of them after all (a late frame) changes nothing.
    assert b.store_qkd_keys("site-a", only_a[:1]) == 0
