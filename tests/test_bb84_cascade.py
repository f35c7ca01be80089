"""Cascade: corrects errors, its disclosed-bit count is what crossed the channel, and it
leaks little more than the Shannon limit."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from qkdd_drivers.emulator.cascade import (
    CascadeAlice,
    CascadeError,
    CascadeLayout,
    block_schedule,
    cascade_bob,
)
from qkdd_drivers.emulator.physics import binary_entropy


class CountingChannel:
    """Delivers to Alice and counts the parities in her *replies*, independently of both
    Cascade implementations: a TOP reply carries one parity per top block of the pass
    (read from the layout both ends derive), a PARITY request one per 8-byte name."""

    def __init__(self, alice: CascadeAlice) -> None:
        self.alice = alice
        self.parities = 0
        self.layout: CascadeLayout | None = None

    def __call__(self, message: bytes) -> bytes:
        kind = message[0]
        if kind == 1:
            _, n, passes, qber_ppm, seed = struct.unpack("<BIBI32s", message)
            self.layout = CascadeLayout(n, passes, qber_ppm, seed)
        elif kind == 2:
            assert self.layout is not None
            t = message[1]
            self.parities += 2 if self.layout.is_split(t) else len(self.layout.starts(t)) - 1
        elif kind == 3:
            self.parities += (len(message) - 1) // 8
        return self.alice.handle(message)


def noisy_pair(rng: np.random.Generator, n: int, qber: float) -> tuple[bytes, bytes, int]:
    alice = rng.integers(0, 2, n, dtype=np.uint8)
    errors = (rng.random(n) < qber).astype(np.uint8)
    return alice.tobytes(), (alice ^ errors).tobytes(), int(errors.sum())


@pytest.mark.parametrize("qber", [0.02, 0.05, 0.08, 0.10])
def test_cascade_corrects_and_leaks_at_most_fifteen_percent_above_shannon(qber: float) -> None:
    rng = np.random.default_rng(int(qber * 1000))
    n = 100_000
    a, b, n_errors = noisy_pair(rng, n, qber)
    alice = CascadeAlice(a)
    channel = CountingChannel(alice)
    result = cascade_bob(b, qber, channel, seed=rng.bytes(32))
    assert result.corrected == a
    assert result.corrections == n_errors  # only real errors were flipped
    assert result.disclosed_bits == channel.parities == alice.disclosed_bits
    shannon = n * binary_entropy(n_errors / n)
    assert shannon < result.disclosed_bits < 1.15 * shannon


def test_many_small_blocks_all_correct() -> None:
    rng = np.random.default_rng(2)
    for n in (1, 2, 9, 100, 1000, 5000):
        for qber in (0.0, 0.03, 0.1):
            a, b, _ = noisy_pair(rng, n, qber)
            result = cascade_bob(b, qber, CascadeAlice(a).handle, seed=rng.bytes(32))
            assert result.corrected == a, (n, qber)


def test_error_free_strings_disclose_only_the_top_parities() -> None:
    rng = np.random.default_rng(3)
    a = rng.integers(0, 2, 10_000, dtype=np.uint8).tobytes()
    alice = CascadeAlice(a)
    channel = CountingChannel(alice)
    result = cascade_bob(a, 0.02, channel, seed=bytes(32))
    assert result.corrected == a and result.corrections == 0
    layout = channel.layout
    assert layout is not None
    tops = sum(2 if layout.is_split(t) else len(layout.starts(t)) - 1 for t in range(14))
    assert result.disclosed_bits == tops


def test_schedule_follows_the_optimised_cascade() -> None:
    # Q = 5 %: a = log2(20) - 0.5 = 3.82 -> k1 = 16, k2 = 2^ceil(7.91) = 256, k3 = 4096.
    assert block_schedule(0.05, 10**6, 14) == [16, 256, 4096] + [0] * 11
    assert block_schedule(0.05, 100, 4) == [16, 100, 100, 0]


def test_orders_are_permutations_and_both_ends_agree() -> None:
    layout = CascadeLayout(10_007, 14, 20_000, b"s" * 32)
    bits = np.arange(10_007, dtype=np.int64)
    for t in (1, 2):
        order, inverse = layout.order(t) or (None, None)
        assert order is not None and inverse is not None
        real = order[order < 10_007]
        assert sorted(real.tolist()) == bits.tolist()
        assert (order[inverse[bits]] == bits).all()
    mask = layout.mask(5)
    again = CascadeLayout(10_007, 14, 20_000, b"s" * 32).mask(5)
    assert (mask == again).all()


def test_alice_refuses_requests_out_of_order_or_out_of_range() -> None:
    alice = CascadeAlice(bytes(100))
    with pytest.raises(CascadeError):
        alice.handle(bytes([2, 0]))  # TOP before HELLO
    with pytest.raises(CascadeError):
        alice.handle(struct.pack("<BIBI32s", 1, 99, 4, 20_000, bytes(32)))  # wrong length
    alice.handle(struct.pack("<BIBI32s", 1, 100, 4, 20_000, bytes(32)))
    with pytest.raises(CascadeError):
        alice.handle(bytes([2, 1]))  # pass 1 before pass 0
    alice.handle(bytes([2, 0]))
    past_end = (0 << 58) | (90 << 29) | 200
    with pytest.raises(CascadeError):
        alice.handle(bytes([3]) + past_end.to_bytes(8, "little"))
    pass_two = (4 << 58) | (0 << 29) | 8
    with pytest.raises(CascadeError):
        alice.handle(bytes([3]) + pass_two.to_bytes(8, "little"))
    with pytest.raises(CascadeError):
        alice.handle(bytes([3, 1, 2]))  # not a whole name
    with pytest.raises(CascadeError):
        alice.handle(bytes([9]))
