"""Toeplitz hashing: every fast route against the definition and a matrix built by hand."""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from qkdd_drivers.emulator.toeplitz import (
    clmul_decimal,
    clmul_int,
    modified_toeplitz_hash,
    modified_toeplitz_hash_bits,
    toeplitz_hash,
    toeplitz_hash_bits,
    toeplitz_hash_parity,
    toeplitz_hash_reference,
    toeplitz_tag,
)


def clmul_bitwise(a: int, b: int) -> int:
    """Carry-less product, one partial product per set bit of b."""
    out, shift = 0, 0
    while b:
        if b & 1:
            out ^= a << shift
        b >>= 1
        shift += 1
    return out


def matrix_hash(seed: int, x: int, n: int, m: int) -> int:
    """Build T explicitly as rows and multiply over GF(2)."""
    rows = [[(seed >> (i - j + n - 1)) & 1 for j in range(n)] for i in range(m)]
    xs = [(x >> j) & 1 for j in range(n)]
    return sum(
        (sum(r * v for r, v in zip(row, xs, strict=True)) % 2) << i for i, row in enumerate(rows)
    )


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 70), st.integers(1, 40), st.randoms(use_true_random=False))
def test_every_route_matches_the_definition(n: int, m: int, rnd: random.Random) -> None:
    seed, x = rnd.getrandbits(n + m - 1), rnd.getrandbits(n)
    expected = matrix_hash(seed, x, n, m)
    assert toeplitz_hash_reference(seed, x, n, m) == expected
    assert toeplitz_hash_parity(seed, x, n, m) == expected
    assert toeplitz_hash(seed, x, n, m) == expected


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**300), st.integers(0, 2**300))
def test_fast_carry_less_products_match_bitwise(a: int, b: int) -> None:
    expected = clmul_bitwise(a, b)
    assert clmul_int(a, b) == expected
    assert clmul_decimal(a, b) == expected


@pytest.mark.parametrize("bits", [2047, 2048, 5000, 20000])
def test_large_products_agree_across_routes(bits: int) -> None:
    rnd = random.Random(bits)
    a, b = rnd.getrandbits(bits) | 1 << (bits - 1), rnd.getrandbits(bits // 2 + 3)
    assert clmul_int(a, b) == clmul_decimal(a, b)
    # Spot check against the definition on a slice of output bits.
    n, m = bits // 2 + 3, 64
    seed = a & ((1 << (n + m - 1)) - 1)
    assert toeplitz_hash(seed, b, n, m) == toeplitz_hash_parity(seed, b, n, m)


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 80), st.data())
def test_modified_toeplitz_is_t_times_x1_xor_x2(n: int, data: st.DataObject) -> None:
    m = data.draw(st.integers(1, n - 1))
    seed = data.draw(st.integers(0, 2 ** (n - 1) - 1))
    x = data.draw(st.integers(0, 2**n - 1))
    width = n - m
    # [T | I] as an explicit m x n matrix.
    rows = [
        [(seed >> (i - j + width - 1)) & 1 for j in range(width)] + [int(i == k) for k in range(m)]
        for i in range(m)
    ]
    xs = [(x >> j) & 1 for j in range(n)]
    expected = sum(
        (sum(r * v for r, v in zip(row, xs, strict=True)) % 2) << i for i, row in enumerate(rows)
    )
    assert modified_toeplitz_hash(seed, x, n, m) == expected


def test_distinct_inputs_collide_about_as_often_as_two_universality_allows() -> None:
    rnd = random.Random(7)
    n, m, trials = 40, 4, 3000
    x, y = rnd.getrandbits(n), rnd.getrandbits(n)
    assert x != y
    collisions = 0
    for _ in range(trials):
        seed = rnd.getrandbits(n + m - 1)
        collisions += toeplitz_hash(seed, x, n, m) == toeplitz_hash(seed, y, n, m)
    # Expected trials / 2^m = 187.5; allow 5 sigma.
    assert abs(collisions - trials / 16) < 5 * (trials / 16) ** 0.5


@pytest.mark.parametrize(
    ("seed_bits", "x_bits", "n", "m"),
    [(10, 3, 3, 8), (9, 4, 3, 8), (11, 0, 3, 8)],
)
def test_inputs_of_the_wrong_size_are_refused(seed_bits: int, x_bits: int, n: int, m: int) -> None:
    with pytest.raises(ValueError):
        toeplitz_hash(1 << seed_bits, 1 << x_bits, n, m)
    with pytest.raises(ValueError):
        modified_toeplitz_hash(1, 1, 4, 4)  # needs m < n


def as_int(bits: np.ndarray) -> int:
    return sum(int(b) << i for i, b in enumerate(bits))


def as_bits(value: int, n: int) -> np.ndarray:
    return np.array([(value >> i) & 1 for i in range(n)], dtype=np.uint8)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 90), st.integers(1, 60), st.randoms(use_true_random=False))
def test_fft_route_matches_the_definition(n: int, m: int, rnd: random.Random) -> None:
    seed, x = rnd.getrandbits(n + m - 1), rnd.getrandbits(n)
    expected = matrix_hash(seed, x, n, m)
    got = toeplitz_hash_bits(as_bits(seed, n + m - 1), as_bits(x, n), m)
    assert as_int(got) == expected
    if m < n:
        mseed = seed & ((1 << (n - 1)) - 1)
        got = modified_toeplitz_hash_bits(as_bits(mseed, n - 1), as_bits(x, n), m)
        assert as_int(got) == modified_toeplitz_hash(mseed, x, n, m)


def packed_int(bits: np.ndarray) -> int:
    return int.from_bytes(np.packbits(bits, bitorder="little").tobytes(), "little")


@pytest.mark.parametrize(("n", "m"), [(5000, 2000), (40_000, 39_000), (100_003, 41_000)])
def test_fft_route_matches_the_integer_routes_on_long_random_inputs(n: int, m: int) -> None:
    rng = np.random.default_rng(n)
    seed, x = rng.integers(0, 2, n + m - 1, dtype=np.uint8), rng.integers(0, 2, n, dtype=np.uint8)
    got = toeplitz_hash_bits(seed, x, m)
    assert packed_int(got) == toeplitz_hash(packed_int(seed), packed_int(x), n, m)
    mseed = seed[: n - 1]
    got = modified_toeplitz_hash_bits(mseed, x, m)
    assert packed_int(got) == modified_toeplitz_hash(packed_int(mseed), packed_int(x), n, m)


def test_fft_of_all_ones_holds_the_largest_counts_exactly() -> None:
    """All-ones inputs give the largest convolution values (every term 1): the worst case
    for rounding; the parity of a count c is c mod 2."""
    n, m = 300_001, 100_000
    got = toeplitz_hash_bits(np.ones(n + m - 1, np.uint8), np.ones(n, np.uint8), m)
    assert got.tolist() == [n % 2] * m


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 300), st.randoms(use_true_random=False))
def test_verification_tag_matches_the_parity_route(n: int, rnd: random.Random) -> None:
    seed, x = rnd.getrandbits(n + 63), rnd.getrandbits(n)
    assert toeplitz_tag(seed, as_bits(x, n), 64) == toeplitz_hash_parity(seed, x, n, 64)


def test_bit_routes_refuse_the_wrong_sizes() -> None:
    with pytest.raises(ValueError):
        toeplitz_hash_bits(np.zeros(5, np.uint8), np.zeros(3, np.uint8), 4)
    with pytest.raises(ValueError):
        modified_toeplitz_hash_bits(np.zeros(3, np.uint8), np.zeros(4, np.uint8), 4)
