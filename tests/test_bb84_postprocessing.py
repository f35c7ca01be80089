"""End-to-end post-processing of simulated blocks, Alice and Bob kept apart."""

from __future__ import annotations

import math
import random

import pytest
from qkdd_drivers.bb84 import (
    LinkParameters,
    binary_entropy,
    detection_probability,
    not_bits,
    select_bits,
    simulate_block,
    xor_bits,
)
from qkdd_drivers.postprocessing import (
    AliceSession,
    InMemoryChannel,
    Msg,
    PostProcessingError,
    PostProcessingParameters,
    bob_postprocess,
)

CLICKS = 150_000


def run_block(link: LinkParameters, post: PostProcessingParameters, seed: int):
    block = simulate_block(link, int(CLICKS / detection_probability(link)), random.Random(seed))
    alice = AliceSession(block.alice, post, link, block.decoy)
    channel = InMemoryChannel(alice)
    bob = bob_postprocess(block.bob, channel, post, link, block.decoy)
    return block, alice, bob, channel


def test_keys_flow_and_match_although_the_raw_strings_differ() -> None:
    link = LinkParameters(misalignment=0.02)
    post = PostProcessingParameters()
    block, alice, bob, channel = run_block(link, post, 1)
    same = not_bits(xor_bits(block.alice.bases, block.bob.bases))
    raw_errors = xor_bits(select_bits(block.alice.bits, same), select_bits(block.bob.bits, same))
    assert raw_errors.count(1) > 0.015 * same.count(1)  # really noisy before correction
    report = bob.report
    assert report.aborted is None and alice.outcome is not None
    assert len(bob.keys) > 100 and report.final_bits == 256 * len(bob.keys)
    assert [k for k in alice.outcome.keys] == bob.keys  # bit for bit, IDs included
    assert all(len(i) == 16 and len(m) == 32 for i, m in bob.keys)
    assert len({i for i, _ in bob.keys}) == len(bob.keys)
    assert 0.012 < report.qber_estimate < 0.028  # sample of ~3700 bits: 3.5 sigma
    assert report.disclosed_bits == report.sample_bits + report.ec_disclosed_bits + 64
    assert report.corrected_errors > 0
    # Alice reached the same public figures on her own.
    for name in ("sifted_bits", "kept_bits", "sample_errors", "ec_disclosed_bits", "final_bits"):
        assert getattr(alice.report, name) == getattr(report, name), name
    assert channel.bytes_to_alice > 0 and channel.bytes_to_bob > 0


def test_intercept_resend_on_every_pulse_is_caught() -> None:
    link = LinkParameters(eve_fraction=1.0)
    _, alice, bob, _ = run_block(link, PostProcessingParameters(), 2)
    assert bob.report.qber_estimate == pytest.approx(0.25, abs=0.03)
    assert bob.keys == [] and bob.report.final_bits == 0 and bob.report.aborted
    assert alice.outcome is not None and alice.outcome.keys == []


@pytest.mark.parametrize("qber", [0.01, 0.03, 0.05, 0.08])
def test_secret_fraction_follows_one_minus_entropy_minus_leak(qber: float) -> None:
    link = LinkParameters(misalignment=qber)
    _, _, bob, _ = run_block(link, PostProcessingParameters(), int(qber * 100))
    r = bob.report
    assert r.aborted is None
    n, e = r.kept_bits, r.qber_estimate
    expected = 1 - binary_entropy(e) - (r.ec_disclosed_bits + r.verification_bits) / n
    fraction = r.final_bits / n
    assert fraction == pytest.approx(expected, rel=0.10)
    # And against theory: Cascade leaks between 1 and 1.5 times the Shannon limit
    # n h(e_true) of the errors it actually corrected.
    shannon = binary_entropy(r.corrected_errors / n)
    assert abs(r.corrected_errors / n - qber) < 0.2 * qber
    assert 1 - binary_entropy(e) - 1.5 * shannon < fraction < 1 - binary_entropy(e) - shannon


@pytest.mark.parametrize("qber", [0.11, 0.13, 0.2])
def test_no_key_from_eleven_percent_up(qber: float) -> None:
    _, alice, bob, _ = run_block(LinkParameters(misalignment=qber), PostProcessingParameters(), 5)
    assert bob.report.final_bits == 0 and bob.keys == [] and bob.report.aborted
    assert alice.outcome is not None and alice.outcome.keys == []


def test_finite_sample_deviation_shortens_the_key() -> None:
    link = LinkParameters(misalignment=0.03)
    post = PostProcessingParameters(sample_fraction=0.3, pe_epsilon=1e-10)
    r = run_block(link, post, 9)[2].report
    n, k, e = r.kept_bits, r.sample_bits, r.qber_estimate
    mu = math.sqrt((n + k) / (n * k) * (k + 1) / k * math.log(1e10))
    assert r.qber_bound == pytest.approx(e + mu) and mu > 0.02
    leak = r.ec_disclosed_bits + 64 + 2 * math.log2(1e10)
    assert r.secure_length == math.floor(n * (1 - binary_entropy(e + mu)) - leak)
    assert r.final_bits == r.secure_length // 256 * 256 > 0
    assert r.final_bits < n * (1 - binary_entropy(e)) - leak - 1000


def test_decoy_states_bound_the_single_photon_part() -> None:
    link = LinkParameters(length_km=50, decoy_mu=0.1)
    block, alice, bob, _ = run_block(link, PostProcessingParameters(), 11)
    r = bob.report
    assert block.decoy is not None and r.single_photon_bits is not None
    assert 0.3 * r.kept_bits < r.single_photon_bits < r.kept_bits
    assert r.single_photon_error < 0.05
    assert alice.outcome.keys == bob.keys and r.final_bits > 0
    # Fewer bits than the single-photon-source bound would give for the same block.
    assert r.final_bits < r.kept_bits * (1 - binary_entropy(r.qber_estimate)) - r.ec_disclosed_bits


def test_alice_refuses_messages_out_of_order_or_malformed() -> None:
    link = LinkParameters()
    block = simulate_block(link, 100_000, random.Random(4))
    post = PostProcessingParameters()
    alice = AliceSession(block.alice, post, link)
    with pytest.raises(PostProcessingError):
        alice.handle(bytes([Msg.SAMPLE]) + bytes(40))
    with pytest.raises(PostProcessingError):
        alice.handle(bytes([Msg.SIFT]) + (5).to_bytes(4, "little") + b"\x00")
    with pytest.raises(PostProcessingError):
        alice.handle(b"\x63")
    with pytest.raises(PostProcessingError):
        alice.handle(b"")


def test_tampered_verification_aborts_the_block() -> None:
    link = LinkParameters(misalignment=0.02)
    post = PostProcessingParameters()
    block = simulate_block(link, int(50_000 / detection_probability(link)), random.Random(8))
    alice = AliceSession(block.alice, post, link)

    def flip_tag(message: bytes) -> bytes:
        if message[0] == Msg.VERIFY:
            message = message[:-1] + bytes([message[-1] ^ 1])
        return alice.handle(message)

    bob = bob_postprocess(block.bob, flip_tag, post, link)
    assert bob.keys == [] and "verification" in (bob.report.aborted or "")
    assert alice.outcome is not None and alice.outcome.keys == []
