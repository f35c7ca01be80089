"""Cascade: corrects errors, and its disclosed-bit count is what crossed the channel."""

from __future__ import annotations

import math
import random
import struct

import pytest
from qkdd_drivers.bb84 import bernoulli_bits, binary_entropy, random_bits, xor_bits
from qkdd_drivers.cascade import (
    CascadeAlice,
    CascadeError,
    CascadeLayout,
    cascade_bob,
    initial_block_log2,
)


class CountingChannel:
    """Delivers to Alice and counts parities from the *requests*, independently of
    both Cascade implementations: TOP for pass t costs ceil(n / k_t), PARITY one per key."""

    def __init__(self, alice: CascadeAlice) -> None:
        self.alice = alice
        self.parities = 0
        self.first_log2 = 0
        self.n = 0

    def __call__(self, message: bytes) -> bytes:
        kind = message[0]
        if kind == 1:
            _, self.n, self.first_log2, _, _ = struct.unpack("<BIBB32s", message)
        elif kind == 2:
            size = 1 << (self.first_log2 + message[1])
            self.parities += math.ceil(self.n / size)
        elif kind == 3:
            self.parities += (len(message) - 1) // 8
        return self.alice.handle(message)


def noisy_pair(rng: random.Random, n: int, qber: float) -> tuple[bytes, bytes, int]:
    alice = random_bits(rng, n)
    errors = bernoulli_bits(rng, n, qber)
    return alice, xor_bits(alice, errors), errors.count(1)


@pytest.mark.parametrize("qber", [0.01, 0.02, 0.05, 0.08])
def test_cascade_corrects_most_blocks_and_counts_every_parity(qber: float) -> None:
    rng = random.Random(int(qber * 1000))
    runs, corrected = 6, 0
    for _ in range(runs):
        a, b, n_errors = noisy_pair(rng, 12_000, qber)
        assert n_errors > 0 and a != b
        alice = CascadeAlice(a)
        channel = CountingChannel(alice)
        result = cascade_bob(b, qber, channel, seed=rng.randbytes(32))
        corrected += result.corrected == a
        assert result.disclosed_bits == channel.parities == alice.disclosed_bits
        # Cascade leaks more than the Shannon limit but not absurdly more.
        shannon = len(a) * binary_entropy(n_errors / len(a))
        assert shannon < result.disclosed_bits < 1.5 * shannon
        # Only real errors were flipped.
        residual = xor_bits(result.corrected, a).count(1)
        assert result.corrections == n_errors - residual
    assert corrected >= runs - 1


def test_error_free_strings_disclose_only_the_top_parities() -> None:
    rng = random.Random(3)
    a = random_bits(rng, 10_000)
    alice = CascadeAlice(a)
    channel = CountingChannel(alice)
    result = cascade_bob(a, 0.02, channel, seed=bytes(32))
    log2_k = initial_block_log2(0.02, len(a))
    assert result.corrected == a and result.corrections == 0
    assert result.disclosed_bits == sum(math.ceil(10_000 / (1 << (log2_k + t))) for t in range(4))


def test_permutations_are_bijections_and_inverses_agree() -> None:
    n = 10_007
    layout = CascadeLayout(n, 4, 4, b"s" * 32)
    data = bytes(range(256)) * (n // 256) + bytes(range(n % 256))
    positions = list(range(n))
    for t in range(4):
        permuted = layout.permute(t, data)
        assert sorted(permuted) == sorted(data)
        for q in rng_sample(n):
            p = layout.forward(t, q)
            assert permuted[q] == data[p]
            assert layout.inverse(t, p) == q
        assert sorted(layout.forward(t, q) for q in positions) == positions


def rng_sample(n: int) -> list[int]:
    return random.Random(n).sample(range(n), 50)


def test_alice_refuses_requests_out_of_order_or_out_of_range() -> None:
    alice = CascadeAlice(bytes(100))
    with pytest.raises(CascadeError):
        alice.handle(bytes([2, 0]))  # TOP before HELLO
    with pytest.raises(CascadeError):
        alice.handle(struct.pack("<BIBB32s", 1, 99, 3, 4, bytes(32)))  # wrong length
    alice.handle(struct.pack("<BIBB32s", 1, 100, 3, 4, bytes(32)))
    with pytest.raises(CascadeError):
        alice.handle(bytes([2, 1]))  # pass 1 before pass 0
    alice.handle(bytes([2, 0]))
    bad_block = (200 << 10) | 1  # starts past the end
    with pytest.raises(CascadeError):
        alice.handle(bytes([3]) + bad_block.to_bytes(8, "little"))
    with pytest.raises(CascadeError):
        alice.handle(bytes([3]) + ((8 << 10) | (2 << 5)).to_bytes(8, "little"))  # pass 2
    with pytest.raises(CascadeError):
        alice.handle(bytes([9]))
