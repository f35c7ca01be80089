"""Finite-key security of the emulated link: the bounds against an independent
implementation of the same paper, their convergence to the asymptotic rate, the epsilon
budget, and blocks whose key never exceeds what their true error rate allows."""

from __future__ import annotations

import importlib.util
import math
import random
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from qkdd_drivers.emulator.bb84_source import Bb84KeySource
from qkdd_drivers.emulator.finite_key import (
    BlockCounts,
    Protocol,
    asymptotic_secret_key_rate,
    estimate,
    finite_secret_key_rate,
)
from qkdd_drivers.emulator.physics import Bb84Parameters, binary_entropy, link_model, simulate_block

BENCH = Path(__file__).resolve().parent.parent / "bench"


def load_reference():
    spec = importlib.util.spec_from_file_location(
        "reference_keyrate", BENCH / "reference_keyrate.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["reference_keyrate"] = module
    spec.loader.exec_module(module)
    return module


#: The reference's channel model (Lim et al. section IV) has no dead time, no efficiency
#: mismatch, and afterpulses only as a (1 + p_ap) factor: compare without them.
PLAIN = Bb84Parameters(dead_time=0.0, afterpulse_prob=0.0, efficiency_mismatch=0.0, vacuum_mu=2e-4)


def reference_setup(ref, link: Bb84Parameters):
    return ref.Setup(
        length_km=link.length_km,
        eta_bob=link.detector_efficiency,
        p_dc=link.dark_count_prob,
        p_ap=0.0,
        e_mis=link.misalignment,
        mu=link.intensities,
        p=link.class_probs,
        q_x=link.x_basis_prob,
        f_ec=1.1,
        eps_sec=1e-10,
        eps_cor=2.0**-64,
    )


@pytest.mark.parametrize("km", [0, 50, 100, 140])
def test_rates_agree_with_the_independent_reference(km: float) -> None:
    ref = load_reference()
    link = replace(PLAIN, length_km=km)
    setup = reference_setup(ref, link)
    pulses = 2e6 / link_model(link).clicks
    mine = finite_secret_key_rate(link, 2e6) / link.pulse_rate
    theirs = ref.key_length(setup, ref.expected_counts(setup, pulses), True).length / pulses
    assert mine == pytest.approx(theirs, rel=0.05)
    mine = asymptotic_secret_key_rate(link) / link.pulse_rate
    assert mine == pytest.approx(ref.asymptotic_rate(setup), rel=0.05)


def test_key_rate_rises_toward_the_asymptotic_rate() -> None:
    link = Bb84Parameters(length_km=50)
    rates = [finite_secret_key_rate(link, 10.0**e) for e in range(5, 12)]
    assert rates[0] == 0  # 100 000 clicks: the bounds eat everything at 50 km
    assert all(b > a for a, b in zip(rates[1:], rates[2:], strict=False))
    asymptotic = asymptotic_secret_key_rate(link)
    assert rates[-1] < asymptotic and rates[-1] > 0.97 * asymptotic


@pytest.mark.parametrize("link", [Bb84Parameters(), Bb84Parameters(decoy_mu=None)])
def test_epsilon_budget_adds_up(link: Bb84Parameters) -> None:
    counts = BlockCounts(10**8, (10**6,) * 3, (10**5,) * 3, (10**3,) * 3)
    if not link.decoy_states:
        counts = BlockCounts(10**8, (10**6,), (10**5,), (10**3,))
    bounds = estimate(Protocol.of(link, 1e-10), counts)
    budget = bounds.epsilon.as_dict()
    parts = [v for k, v in budget.items() if k not in ("eps_sec", "eps_cor", "eps")]
    assert sum(parts) == pytest.approx(1e-10)
    assert budget["eps_cor"] == 2.0**-64
    assert bounds.pa_bits == pytest.approx(6 * math.log2(1 / budget["eps"]))


def block_counts(block, k: int) -> tuple[BlockCounts, dict[str, int]]:
    """Public counts and the true photon-number make-up of the X key bits, from the two
    records directly (independently of the post-processing code)."""
    a_bits = np.frombuffer(block.alice.bits, np.uint8)
    a_bases = np.frombuffer(block.alice.bases, np.uint8)
    b_bits = np.frombuffer(block.bob.bits, np.uint8)
    b_bases = np.frombuffer(block.bob.bases, np.uint8)
    cls = np.frombuffer(block.alice.intensities, np.uint8)
    photons = np.frombuffer(block.truth.photons, np.uint8)
    x = (a_bases == 0) & (b_bases == 0)
    z = (a_bases == 1) & (b_bases == 1)
    count = lambda sel: tuple(np.bincount(cls[sel], minlength=k)[:k].tolist())  # noqa: E731
    counts = BlockCounts(block.pulses, count(x), count(z), count(z & (a_bits != b_bits)))
    truth = {
        "vacuum": int(np.count_nonzero(photons[x] == 0)),
        "single": int(np.count_nonzero(photons[x] == 1)),
        "x_errors": int(np.count_nonzero(a_bits[x] != b_bits[x])),
    }
    return counts, truth


def count_violations(link: Bb84Parameters, blocks: int, seed: int) -> tuple[int, int, int]:
    """(finite-key violations, point-estimate violations, blocks with key) over ``blocks``
    blocks of 200 000 clicks: a violation is a key longer than the block's true make-up
    (vacuum and single-photon X bits, their true phase errors) allows."""
    model = link_model(link)
    pulses = int(200_000 / model.clicks)
    k = len(link.intensities)
    proto = Protocol.of(link, 1e-10)
    rng = random.Random(seed)
    phase_rng = np.random.default_rng(seed)
    finite_bad = point_bad = keyed = 0
    for _ in range(blocks):
        block = simulate_block(link, pulses, rng)
        counts, truth = block_counts(block, k)
        n_x = sum(counts.n_x)
        leak = math.ceil(1.1 * n_x * binary_entropy(truth["x_errors"] / n_x))
        # The phase errors the single-photon X bits would show in the Z basis.
        phase = phase_rng.binomial(truth["single"], model.single_phase_error) / truth["single"]
        bounds = estimate(proto, counts)
        allowed = (
            truth["vacuum"]
            + truth["single"] * (1 - binary_entropy(phase))
            - leak
            - bounds.pa_bits
            - bounds.correctness_bits
        )
        length = bounds.key_length(leak)
        keyed += length > 0
        finite_bad += length > max(0.0, allowed)
        # The same counts read as point estimates (no statistical terms).
        point = estimate(proto, counts, finite=False)
        point_length = point.key_length(leak) - bounds.pa_bits - bounds.correctness_bits
        point_bad += point_length > max(0.0, allowed)
    return finite_bad, point_bad, keyed


def test_finite_key_never_exceeds_what_the_true_error_rate_allows() -> None:
    finite_bad, _, keyed = count_violations(Bb84Parameters(), 100, seed=11)
    assert keyed == 100  # every block makes key: the comparison is not vacuous
    assert finite_bad == 0


def test_point_estimates_would_exceed_it_in_about_half_the_blocks() -> None:
    """With a single-photon source every bit is a single-photon bit, so the truth is the
    phase error alone: the finite-key bound never claims too much, the point estimate
    (the observed Z error rate taken as the phase error) does half the time."""
    link = Bb84Parameters(source="single-photon", misalignment=0.03)
    finite_bad, point_bad, keyed = count_violations(link, 100, seed=13)
    assert keyed == 100 and finite_bad == 0
    assert 25 <= point_bad <= 75


@pytest.mark.slow
def test_finite_key_never_exceeds_what_the_true_error_rate_allows_1000_blocks() -> None:
    finite_bad, _, keyed = count_violations(Bb84Parameters(), 1000, seed=12)
    assert keyed == 1000 and finite_bad == 0
    finite_bad, _, keyed = count_violations(Bb84Parameters(source="single-photon"), 1000, 14)
    assert keyed == 1000 and finite_bad == 0


def test_laser_without_decoys_makes_no_key_at_mu_one_half() -> None:
    for km in (0, 10, 25, 50, 100, 150):
        link = Bb84Parameters(decoy_mu=None, length_km=km)
        assert asymptotic_secret_key_rate(link) == 0
    # A weak enough laser does make some key close by (GLLP).
    assert asymptotic_secret_key_rate(Bb84Parameters(decoy_mu=None, mu=0.05, length_km=10)) > 0


def run_blocks(link: Bb84Parameters, blocks: int = 2, detections: int = 400_000):
    source = Bb84KeySource(link, block_detections=detections, rng=random.Random(4), truth=True)
    return [source.run_block().report for _ in range(blocks)]


def test_pns_attack_leaves_no_key_without_decoys() -> None:
    for report in run_blocks(Bb84Parameters(decoy_mu=None, pns_attack=True, length_km=50)):
        assert report.final_bits == 0 and report.aborted
        assert report.pns is not None
        # Eve holds most key bits; a single-photon bound would have left her a key.
        assert report.pns["eve_known_key_bits"] > 0.5 * report.kept_bits
        assert report.pns["single_photon_bound_bits"] > 0
        assert report.pns["eve_information_bits"] > 0


def test_pns_attack_is_seen_by_the_decoy_states() -> None:
    for report in run_blocks(Bb84Parameters(pns_attack=True, length_km=50)):
        assert report.final_bits == 0 and report.aborted
        assert report.estimates is not None
        assert report.estimates["single_photon_x_lower"] < 0.05 * report.kept_bits
    # Close by, Eve must let single photons through to keep the click rate: the decoy
    # bound then keeps only what she cannot know.
    for report in run_blocks(Bb84Parameters(pns_attack=True, length_km=10)):
        assert report.pns is not None and report.final_bits > 0
        unknown = report.kept_bits - report.pns["eve_known_key_bits"]
        assert report.final_bits < unknown - report.ec_disclosed_bits
