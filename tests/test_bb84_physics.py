"""The link model's formulas and the detected-event simulation's statistics."""

from __future__ import annotations

import math
import random

import pytest
from qkdd_drivers.bb84 import (
    LinkParameters,
    asymptotic_secret_key_rate,
    bernoulli_bits,
    binary_entropy,
    binomial,
    channel_transmittance,
    decoy_bounds,
    detection_probability,
    expected_qber,
    not_bits,
    pack_bits,
    pack_to_bytes,
    select_bits,
    simulate_block,
    unpack_bits,
    unpack_from_bytes,
    xor_bits,
)


def test_model_follows_the_textbook_formulas() -> None:
    link = LinkParameters(length_km=25, misalignment=0.015, dark_count_prob=1e-5)
    eta = 0.2 * 10 ** (-0.2 * 25 / 10)
    assert channel_transmittance(link) == pytest.approx(eta)
    y = 1e-5 + 1 - math.exp(-0.5 * eta)
    assert detection_probability(link) == pytest.approx(y)
    assert expected_qber(link) == pytest.approx(
        (0.5 * 1e-5 + 0.015 * (1 - math.exp(-0.5 * eta))) / y
    )


def test_decoy_bound_is_tight_for_an_exact_poisson_channel() -> None:
    link = LinkParameters(length_km=50, decoy_mu=0.1, dark_count_prob=1e-6)
    eta = channel_transmittance(link)
    y1_true = 1e-6 + eta  # one photon: dark count or detected
    y1, e1 = decoy_bounds(
        0.5,
        0.1,
        detection_probability(link),
        detection_probability(link, 0.1),
        detection_probability(link, 0.0),
        expected_qber(link, 0.1),
    )
    assert 0.9 * y1_true < y1 <= y1_true * 1.001
    e1_true = (0.5 * 1e-6 + 0.01 * eta) / y1_true
    assert e1_true * 0.999 <= e1 < 1.3 * e1_true


def test_asymptotic_rate_falls_with_distance_and_dies_with_eve() -> None:
    rates = [asymptotic_secret_key_rate(LinkParameters(length_km=km)) for km in (10, 50, 100)]
    assert rates[0] > rates[1] > rates[2] > 0
    assert asymptotic_secret_key_rate(LinkParameters(eve_fraction=1.0)) == 0
    decoy = asymptotic_secret_key_rate(LinkParameters(length_km=50, decoy_mu=0.1))
    assert 0 < decoy < rates[1]  # multi-photon pulses cost key


def test_bit_array_helpers_round_trip() -> None:
    rng = random.Random(1)
    bits = bernoulli_bits(rng, 1001, 0.5)
    assert set(bits) <= {0, 1}
    assert unpack_bits(pack_bits(bits), len(bits)) == bits
    assert unpack_from_bytes(pack_to_bytes(bits), len(bits)) == bits
    assert pack_bits(bits) == sum(b << i for i, b in enumerate(bits))
    mask = bernoulli_bits(rng, 1001, 0.3)
    assert select_bits(bits, mask) == bytes(b for b, m in zip(bits, mask, strict=True) if m)
    assert xor_bits(bits, not_bits(bits)) == b"\x01" * 1001
    with pytest.raises(ValueError):
        unpack_from_bytes(b"\xff\xff", 9)  # padding bits set


@pytest.mark.parametrize("p", [0.0005, 0.01, 0.1, 0.37, 0.9])
def test_bernoulli_and_binomial_have_the_right_mean(p: float) -> None:
    rng = random.Random(int(p * 1e4))
    n = 200_000
    sd = math.sqrt(n * p * (1 - p))
    assert abs(bernoulli_bits(rng, n, p).count(1) - n * p) < 5 * sd
    draws = [binomial(rng, n, p) for _ in range(200)]
    mean = sum(draws) / len(draws)
    assert abs(mean - n * p) < 5 * sd / math.sqrt(len(draws))
    var = sum((d - mean) ** 2 for d in draws) / (len(draws) - 1)
    assert 0.6 * sd * sd < var < 1.5 * sd * sd


@pytest.mark.parametrize(
    ("km", "mis", "eve", "dark"),
    [(10, 0.02, 0.0, 1e-6), (100, 0.01, 0.0, 1e-4), (10, 0.01, 0.5, 1e-6), (10, 0.0, 1.0, 1e-6)],
)
def test_simulated_clicks_match_the_model(km: float, mis: float, eve: float, dark: float) -> None:
    link = LinkParameters(length_km=km, misalignment=mis, eve_fraction=eve, dark_count_prob=dark)
    rng = random.Random(km * 100 + eve * 10)
    y = detection_probability(link)
    pulses = int(200_000 / y)
    block = simulate_block(link, pulses, rng)
    d = len(block.alice.bits)
    assert len(block.bob.bits) == d and abs(d - pulses * y) < 5 * math.sqrt(pulses * y)
    assert block.simulated_seconds == pytest.approx(pulses / 1e9)
    same = not_bits(xor_bits(block.alice.bases, block.bob.bases))
    sifted = same.count(1)
    assert abs(sifted - d / 2) < 5 * math.sqrt(d / 4)
    errors = xor_bits(select_bits(block.alice.bits, same), select_bits(block.bob.bits, same))
    e, q = errors.count(1) / sifted, expected_qber(link)
    assert abs(e - q) < 5 * math.sqrt(q * (1 - q) / sifted) + 1e-4
    # Bob's bits in the other basis are coin flips.
    other = xor_bits(
        select_bits(block.alice.bits, not_bits(same)), select_bits(block.bob.bits, not_bits(same))
    )
    assert abs(other.count(1) / len(other) - 0.5) < 0.01


def test_intercept_resend_on_every_pulse_gives_a_quarter_error() -> None:
    assert expected_qber(LinkParameters(misalignment=0.0, eve_fraction=1.0)) == pytest.approx(
        0.25, abs=1e-4
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        {"mu": 0},
        {"length_km": -1},
        {"misalignment": 0.6},
        {"eve_fraction": 1.5},
        {"decoy_mu": 0.7},
        {"decoy_mu": 0.1, "decoy_prob": 0.6, "vacuum_prob": 0.5},
    ],
)
def test_inconsistent_parameters_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        LinkParameters(**kwargs)


def test_binary_entropy() -> None:
    assert binary_entropy(0.5) == 1.0 and binary_entropy(0) == binary_entropy(1) == 0
    assert binary_entropy(0.11) == pytest.approx(0.4999, abs=1e-3)
