"""The link model's probabilities and the simulated clicks' statistics: source, channel,
eavesdroppers and detectors (dead time, afterpulsing, efficiency mismatch, double clicks)."""

from __future__ import annotations

import math
import random
from dataclasses import replace

import numpy as np
import pytest
from qkdd_drivers.emulator.physics import (
    Bb84Parameters,
    bernoulli_bits,
    binary_entropy,
    binomial,
    channel_transmittance,
    gate_table,
    link_model,
    not_bits,
    pack_bits,
    pack_to_bytes,
    select_bits,
    simulate_block,
    unpack_bits,
    unpack_from_bytes,
    xor_bits,
)

#: Detectors without gate-to-gate effects: the textbook per-gate model holds exactly.
IDEAL = {"dead_time": 0.0, "afterpulse_prob": 0.0, "efficiency_mismatch": 0.0}


def sifted_counts(block, k: int) -> dict[str, np.ndarray]:
    """Clicks and errors per (basis, class) from the two records."""
    a_bits = np.frombuffer(block.alice.bits, np.uint8)
    a_bases = np.frombuffer(block.alice.bases, np.uint8)
    classes = np.frombuffer(block.alice.intensities, np.uint8)
    b_bits = np.frombuffer(block.bob.bits, np.uint8)
    b_bases = np.frombuffer(block.bob.bases, np.uint8)
    out = {}
    for basis, name in ((0, "x"), (1, "z")):
        same = (a_bases == basis) & (b_bases == basis)
        wrong = same & (a_bits != b_bits)
        out["n_" + name] = np.bincount(classes[same], minlength=k)[:k]
        out["m_" + name] = np.bincount(classes[wrong], minlength=k)[:k]
    return out


def within(observed: float, expected: float, sigmas: float = 5.0) -> bool:
    return abs(observed - expected) <= sigmas * math.sqrt(max(expected, 1.0)) + 1e-9


def test_gate_probabilities_follow_the_textbook_formulas() -> None:
    link = Bb84Parameters(length_km=25, misalignment=0.015, dark_count_prob=1e-5, **IDEAL)
    eta = 0.2 * channel_transmittance(link)
    assert channel_transmittance(link) == pytest.approx(10 ** (-0.2 * 25 / 10))
    table = gate_table(link)
    quiet = 1 - 1e-5
    for k, (mu, p_k) in enumerate(zip(link.intensities, link.class_probs, strict=True)):
        rows = table.cls == k
        click = float(table.prob[rows].sum()) / p_k
        assert click == pytest.approx(1 - quiet**2 * math.exp(-eta * mu), rel=1e-9)
        # Bases equal: photons reach the wrong detector with e_mis; a double click is a
        # coin flip (squashing).
        lam_c, lam_w = eta * mu * (1 - 0.015), eta * mu * 0.015
        only_wrong = (1 - quiet * math.exp(-lam_w)) * quiet * math.exp(-lam_c)
        both = (1 - quiet * math.exp(-lam_w)) * (1 - quiet * math.exp(-lam_c))
        matched = rows & (table.alice_basis == table.bob_basis)
        wrong = matched & (
            ((table.pattern != 2) & (table.pattern != table.alice_bit)) | (table.pattern == 2)
        )
        weight = np.where(table.pattern == 2, 0.5, 1.0)
        qber = float((table.prob * weight)[wrong].sum()) / float(table.prob[matched].sum())
        assert qber == pytest.approx((only_wrong + both / 2) / click, rel=1e-9)


@pytest.mark.parametrize(
    "link",
    [
        Bb84Parameters(),  # the defaults: decoys, dead time, afterpulses, mismatch
        Bb84Parameters(length_km=100, eve_fraction=0.5),
        Bb84Parameters(length_km=60, pns_attack=True),
        Bb84Parameters(source="single-photon", length_km=30),
        Bb84Parameters(decoy_mu=None, double_click="discard", dark_count_prob=1e-3),
    ],
    ids=["defaults", "intercept-resend", "pns", "single-photon", "no-decoy-discard"],
)
def test_simulated_clicks_match_the_model(link: Bb84Parameters) -> None:
    model = link_model(link)
    pulses = int(300_000 / model.clicks)
    block = simulate_block(link, pulses, random.Random(7))
    k = len(link.intensities)
    got = sifted_counts(block, k)
    clicks = len(block.alice.bits)
    assert len(block.bob.bits) == clicks and block.pulses == pulses
    if link.double_click == "squash":
        assert within(clicks, model.clicks * pulses)
    for name, expected in (
        ("n_x", model.n_x),
        ("m_x", model.m_x),
        ("n_z", model.n_z),
        ("m_z", model.m_z),
    ):
        for c in range(k):
            assert within(got[name][c], expected[c] * pulses), (name, c)


@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_intercept_resend_gives_a_quarter_error_per_intercepted_click(fraction: float) -> None:
    link = Bb84Parameters(misalignment=0.0, dark_count_prob=1e-9, eve_fraction=fraction, **IDEAL)
    model = link_model(link)
    pulses = int(200_000 / model.clicks)
    got = sifted_counts(simulate_block(link, pulses, random.Random(int(fraction * 8))), 3)
    for basis in ("x", "z"):
        n, m = int(got["n_" + basis].sum()), int(got["m_" + basis].sum())
        # Eve's basis is wrong half the time, and then Bob's result is a coin flip; double
        # clicks (multi-photon pulses resent in the wrong basis) add a little.
        assert abs(m / n - fraction / 4) < 0.005 + 5 * math.sqrt(0.25 * fraction / 4 / n)
    assert model.qber_x == pytest.approx(fraction / 4, abs=0.004)


def test_dead_time_caps_the_click_rate() -> None:
    bright = Bb84Parameters(length_km=0, mu=1.0, decoy_mu=0.3, vacuum_mu=0.0, **IDEAL)
    dead = replace(bright, dead_time=100e-9)  # 100 gates at 1 GHz
    free, capped = link_model(bright), link_model(dead)
    assert free.clicks > 0.05  # ~one click in 17 pulses without dead time
    assert capped.clicks <= 1 / 101 and capped.clicks > 0.85 / 101  # saturated
    pulses = 20_000_000
    clicks = len(simulate_block(dead, pulses, random.Random(3)).alice.bits)
    assert clicks <= pulses / 101 + 1
    assert within(clicks, capped.clicks * pulses)
    # ~11 M clicks/s at the default 50 ns dead time where the detectors alone would give
    # ~27 M/s at 10 km.
    default = link_model(Bb84Parameters())
    assert default.clicks < 0.5 * default.timing.photon_click_prob


def test_afterpulses_land_on_every_intensity_class() -> None:
    quiet = Bb84Parameters(afterpulse_prob=0.0)
    noisy = Bb84Parameters(afterpulse_prob=0.2, afterpulse_time=20e-9)
    base, after = link_model(quiet), link_model(noisy)
    vacuum = 2  # class index of the vacuum decoy
    # Vacuum pulses click only by dark counts, until afterpulses land on them.
    assert after.n_x[vacuum] > 20 * base.n_x[vacuum]
    assert after.m_x[vacuum] == pytest.approx(after.n_x[vacuum] / 2, rel=0.02)
    pulses = int(300_000 / after.clicks)
    block = simulate_block(noisy, pulses, random.Random(5))
    assert block.truth is not None and block.truth.afterpulses > 0
    assert within(sifted_counts(block, 3)["n_x"][vacuum], after.n_x[vacuum] * pulses)


def test_efficiency_mismatch_favours_the_better_detector() -> None:
    link = Bb84Parameters(
        efficiency_mismatch=0.4,
        misalignment=0.0,
        **{k: v for k, v in IDEAL.items() if k != "efficiency_mismatch"},
    )
    block = simulate_block(link, int(200_000 / link_model(link).clicks), random.Random(2))
    ones = np.frombuffer(block.bob.bits, np.uint8).mean()
    # Bit 1's detector sees 0.6 of bit 0's photons: ~0.6 / 1.6 of the clicks are ones.
    assert 0.35 < ones < 0.40


def test_double_clicks_are_squashed_or_discarded() -> None:
    noisy = Bb84Parameters(dark_count_prob=0.02, **IDEAL)
    pulses = int(100_000 / link_model(noisy).clicks)
    squashed = simulate_block(noisy, pulses, random.Random(1))
    discarded = simulate_block(replace(noisy, double_click="discard"), pulses, random.Random(1))
    assert squashed.truth is not None and squashed.truth.double_clicks > 500
    assert len(discarded.alice.bits) == len(squashed.alice.bits) - squashed.truth.double_clicks


def test_pns_eavesdropper_keeps_the_signal_rate_but_not_the_decoy_rate() -> None:
    honest = gate_table(Bb84Parameters(length_km=60))
    pns_link = Bb84Parameters(length_km=60, pns_attack=True)
    pns = gate_table(pns_link)

    def per_gate(table, k: int) -> float:  # click probability of a class-k pulse
        return float(table.prob[table.cls == k].sum())

    assert per_gate(pns, 0) == pytest.approx(per_gate(honest, 0), rel=1e-9)
    assert per_gate(pns, 1) < 0.7 * per_gate(honest, 1)  # few multi-photon decoy pulses
    fractions = link_model(pns_link).pns_fractions
    assert fractions is not None and fractions[0] == 0.0  # no single photon gets through


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


@pytest.mark.parametrize(
    "kwargs",
    [
        {"mu": 0},
        {"length_km": -1},
        {"misalignment": 0.6},
        {"eve_fraction": 1.5},
        {"decoy_mu": 0.7},
        {"decoy_mu": 0.3, "vacuum_mu": 0.25},  # mu_2 + mu_3 must stay below mu_1
        {"decoy_prob": 0.6, "vacuum_prob": 0.5},
        {"pns_attack": True, "eve_fraction": 0.1},
        {"pns_attack": True, "source": "single-photon"},
        {"source": "lamp"},
        {"double_click": "keep"},
    ],
)
def test_inconsistent_parameters_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Bb84Parameters(**kwargs)  # type: ignore[arg-type]


def test_binary_entropy() -> None:
    assert binary_entropy(0.5) == 1.0 and binary_entropy(0) == binary_entropy(1) == 0
    assert binary_entropy(0.11) == pytest.approx(0.4999, abs=1e-3)
