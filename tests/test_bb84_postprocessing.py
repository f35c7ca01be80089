"""End-to-end post-processing of simulated blocks, Alice and Bob kept apart."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
from qkdd_drivers.emulator.physics import Bb84Parameters, binary_entropy, link_model, simulate_block
from qkdd_drivers.emulator.postprocessing import (
    AliceSession,
    InMemoryChannel,
    Msg,
    PostProcessingError,
    PostProcessingParameters,
    bob_postprocess,
)

CLICKS = 400_000


def run_block(link: Bb84Parameters, post: PostProcessingParameters, seed: int, clicks=CLICKS):
    block = simulate_block(link, int(clicks / link_model(link).clicks), random.Random(seed))
    alice = AliceSession(block.alice, post, link)
    channel = InMemoryChannel(alice)
    bob = bob_postprocess(block.bob, channel, post, link)
    return block, alice, bob, channel


def x_errors(block) -> tuple[int, int]:
    a = np.frombuffer(block.alice.bases, np.uint8)
    b = np.frombuffer(block.bob.bases, np.uint8)
    x = (a == 0) & (b == 0)
    bits_a = np.frombuffer(block.alice.bits, np.uint8)[x]
    bits_b = np.frombuffer(block.bob.bits, np.uint8)[x]
    return int(np.count_nonzero(bits_a != bits_b)), int(x.sum())


def test_keys_flow_and_match_although_the_raw_strings_differ() -> None:
    link = Bb84Parameters(misalignment=0.02)
    post = PostProcessingParameters()
    block, alice, bob, channel = run_block(link, post, 1)
    errors, n_x = x_errors(block)
    assert errors > 0.015 * n_x  # really noisy before correction
    report = bob.report
    assert report.aborted is None and alice.outcome is not None
    assert len(bob.keys) > 50 and report.final_bits == 256 * len(bob.keys)
    assert alice.outcome.keys == bob.keys  # bit for bit, IDs included
    assert all(len(i) == 16 and len(m) == 32 for i, m in bob.keys)
    assert len({i for i, _ in bob.keys}) == len(bob.keys)
    assert report.kept_bits == n_x and report.corrected_errors == errors
    assert report.disclosed_bits == report.test_bits + report.ec_disclosed_bits + 64
    assert report.ec_efficiency is not None and 1.0 < report.ec_efficiency < 1.2
    assert 0.015 < report.qber_estimate < 0.035
    assert report.qber_bound > report.qber_estimate
    # Alice reached the same public figures on her own.
    for name in (
        "sifted_bits",
        "kept_bits",
        "counts",
        "qber_bound",
        "ec_disclosed_bits",
        "secure_length",
        "final_bits",
        "estimates",
    ):
        assert getattr(alice.report, name) == getattr(report, name), name
    assert channel.bytes_to_alice > 0 and channel.bytes_to_bob > 0


def test_key_length_is_the_finite_key_formula() -> None:
    _, _, bob, _ = run_block(Bb84Parameters(), PostProcessingParameters(), 3)
    r = bob.report
    est = r.estimates
    assert est is not None and r.qber_bound is not None
    expected = math.floor(
        est["vacuum_x_lower"]
        + est["single_photon_x_lower"] * (1 - binary_entropy(r.qber_bound))
        - r.ec_disclosed_bits
        - est["privacy_amplification_bits"]
        - est["correctness_bits"]
    )
    assert r.secure_length == expected and r.final_bits == expected // 256 * 256 > 0
    # The bounds are real bounds: below the X bits, above the observed error rate.
    assert 0 < est["single_photon_x_lower"] < r.kept_bits
    assert r.qber_bound > r.qber_estimate


def test_intercept_resend_on_every_pulse_is_caught() -> None:
    _, alice, bob, _ = run_block(Bb84Parameters(eve_fraction=1.0), PostProcessingParameters(), 2)
    assert bob.report.qber_estimate == pytest.approx(0.25 + 0.01 / 2, abs=0.02)
    assert bob.keys == [] and bob.report.final_bits == 0 and bob.report.aborted
    assert alice.outcome is not None and alice.outcome.keys == []


@pytest.mark.parametrize("qber", [0.12, 0.2])
def test_no_key_above_the_threshold(qber: float) -> None:
    link = Bb84Parameters(misalignment=qber)
    _, alice, bob, _ = run_block(link, PostProcessingParameters(), 5, clicks=100_000)
    assert bob.report.final_bits == 0 and bob.keys == [] and bob.report.aborted
    assert alice.outcome is not None and alice.outcome.keys == []


def test_single_photon_source_uses_every_click() -> None:
    link = Bb84Parameters(source="single-photon")
    _, alice, bob, _ = run_block(link, PostProcessingParameters(), 6, clicks=200_000)
    r = bob.report
    assert r.estimates is not None and r.estimates["mode"] == "single-photon"
    assert r.estimates["single_photon_x_lower"] == r.kept_bits
    assert alice.outcome is not None and alice.outcome.keys == bob.keys and r.final_bits > 0


def test_alice_refuses_messages_out_of_order_or_malformed() -> None:
    link = Bb84Parameters()
    block = simulate_block(link, 100_000, random.Random(4))
    post = PostProcessingParameters()
    alice = AliceSession(block.alice, post, link)
    with pytest.raises(PostProcessingError):
        alice.handle(bytes([Msg.ESTIMATE]) + bytes(40))
    with pytest.raises(PostProcessingError):
        alice.handle(bytes([Msg.SIFT]) + (5).to_bytes(4, "little") + b"\x00")
    with pytest.raises(PostProcessingError):
        alice.handle(b"\x63")
    with pytest.raises(PostProcessingError):
        alice.handle(b"")


def test_tampered_verification_aborts_the_block() -> None:
    link = Bb84Parameters(misalignment=0.02)
    post = PostProcessingParameters()
    block = simulate_block(link, int(300_000 / link_model(link).clicks), random.Random(8))
    alice = AliceSession(block.alice, post, link)

    def flip_tag(message: bytes) -> bytes:
        if message[0] == Msg.VERIFY:
            message = message[:-1] + bytes([message[-1] ^ 1])
        return alice.handle(message)

    bob = bob_postprocess(block.bob, flip_tag, post, link)
    assert bob.keys == [] and "verification" in (bob.report.aborted or "")
    assert alice.outcome is not None and alice.outcome.keys == []
