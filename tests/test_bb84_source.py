"""Bb84KeySource as the emulator's KeySource, and the simulate command."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading

import pytest
import trio
import trio.testing
from qkdd_drivers.emulator.bb84_source import Bb84KeySource
from qkdd_drivers.emulator.key_source import KeySource
from qkdd_drivers.emulator.physics import Bb84Parameters
from qkdd_drivers.emulator.postprocessing import PostProcessingParameters
from timeouts import timeout


def small_source(**kwargs) -> Bb84KeySource:
    return Bb84KeySource(
        Bb84Parameters(misalignment=0.02),
        PostProcessingParameters(key_bits=kwargs.pop("key_bits", 256)),
        block_detections=500_000,
        rng=random.Random(kwargs.pop("seed", 1)),
        **kwargs,
    )


async def test_next_block_hands_out_keys_and_keeps_the_rest() -> None:
    source: KeySource = small_source(key_bits=128)
    assert source.qber is None
    first = await source.next_block(10)
    assert len(first) == 10 and all(len(i) == 16 and len(m) == 16 for i, m in first)
    assert 0.015 < source.qber < 0.035  # ~30 000 Z-basis bits: 5 sigma
    blocks = source.totals.blocks
    rest = await source.next_block(100_000)
    assert source.totals.blocks == blocks  # served from the same block
    ids = [i for i, _ in first + rest]
    assert len(ids) == len(set(ids))
    assert sum(len(m) for _, m in first + rest) * 8 == source.totals.final_bits


async def test_event_loop_stays_responsive_while_a_block_is_computed() -> None:
    """The block is computed on a worker thread, so the loop keeps running meanwhile."""
    source = Bb84KeySource(Bb84Parameters(), block_detections=300_000)
    computed_on: list[int] = []
    run_block = source.run_block

    def recording_run_block():  # type: ignore[no-untyped-def]
        computed_on.append(threading.get_ident())
        return run_block()

    source.run_block = recording_run_block  # type: ignore[method-assign]
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await trio.sleep(0.005)
            ticks += 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker)
        await source.next_block(1)
        nursery.cancel_scope.cancel()
    assert computed_on and threading.get_ident() not in computed_on
    assert ticks > 0  # the loop went on while the block was computed


async def test_pacing_limits_the_key_rate(autojump_clock: trio.testing.MockClock) -> None:
    source = small_source(rate_bits_per_s=1000.0)
    start = trio.current_time()
    bits = 0
    for _ in range(5):
        bits += sum(len(m) * 8 for _, m in await source.next_block(3))
    assert bits == 5 * 3 * 256
    assert trio.current_time() - start == pytest.approx(bits / 1000.0, rel=0.01)


async def test_blocks_without_key_are_retried_until_keys_come() -> None:
    blocks = []
    source = Bb84KeySource(
        Bb84Parameters(eve_fraction=1.0),
        block_detections=20_000,
        rng=random.Random(3),
        on_block=blocks.append,
    )
    with trio.fail_after(timeout(60)):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(source.next_block, 1)  # never returns: no block yields a key
            while len(blocks) < 2:
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    assert len(blocks) >= 2 and all(b.report.aborted for b in blocks)
    assert source.totals.final_bits == 0 and source.qber > 0.2


def run_simulate(*argv: str) -> subprocess.CompletedProcess[str]:
    code = (
        "import sys; from qkdd_drivers.emulator.simulate import main; sys.exit(main(sys.argv[1:]))"
    )
    return subprocess.run(
        [sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=timeout(60)
    )


def test_simulate_prints_a_json_report() -> None:
    proc = run_simulate(
        "--json",
        "--blocks",
        "2",
        "--block-detections",
        "400000",
        "--length",
        "25",
        "--intrinsic-qber",
        "0.02",
        "--key-bits",
        "512",
        "--seed",
        "5",
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["link"]["length_km"] == 25 and report["postprocessing"]["key_bits"] == 512
    assert report["link"]["decoy_mu"] == 0.2  # decoy states unless asked otherwise
    assert report["model"]["source"].startswith("laser (weak coherent pulses) with decoy")
    assert len(report["blocks"]) == 2
    for block in report["blocks"]:
        assert block["keys_match"] and block["final_bits"] == 512 * block["keys"] > 0
        assert 0.015 < block["qber_estimate"] < 0.035  # ~25 000 Z-basis bits
        assert block["qber_bound"] > block["qber_estimate"]  # the phase-error bound
        est = block["estimates"]
        assert est["mode"] == "decoy"
        assert 0 < est["single_photon_x_lower"] < block["kept_bits"]
        assert len(est["intervals"]["n_x"]) == 3  # n^- and n^+ of each intensity
        budget = est["epsilon"]
        assert budget["eps_sec"] == 1e-10 and budget["eps_cor"] == 2.0**-64
        assert sum(v for k, v in budget.items() if k not in ("eps_sec", "eps_cor", "eps")) == (
            pytest.approx(1e-10)
        )
        assert block["ec_disclosed_bits"] > 0 and 1.0 < block["ec_efficiency"] < 1.2
        assert block["truth"]["single_photon_x"] > est["single_photon_x_lower"]
        assert block["secret_key_rate"] == pytest.approx(
            block["final_bits"] / block["simulated_seconds"]
        )
    totals = report["totals"]
    assert totals["final_bits"] == sum(b["final_bits"] for b in report["blocks"])
    # At this block size the key is a small difference of large bounds: within 50 %.
    assert 0.5 < totals["secret_key_rate"] / report["model"]["finite_secret_key_rate"] < 1.5
    assert totals["secret_key_rate"] < report["model"]["asymptotic_secret_key_rate"]


def test_simulate_explains_inconsistent_parameters() -> None:
    proc = run_simulate("--decoy-mu", "0.8")
    assert proc.returncode == 2 and "decoy intensity" in proc.stderr
    proc = run_simulate("--intrinsic-qber", "0.7")
    assert proc.returncode == 2 and "--intrinsic-qber" in proc.stderr
    proc = run_simulate("--pns-attack", "--source", "single-photon")
    assert proc.returncode == 2 and "laser" in proc.stderr


def test_simulate_table_output() -> None:
    proc = run_simulate("--blocks", "1", "--block-detections", "200000", "--eve-fraction", "1")
    assert proc.returncode == 0, proc.stderr
    assert "above threshold" in proc.stdout and "total: 0 final bits" in proc.stdout
    assert "eps_sec 1e-10 = detection counts" in proc.stdout  # the budget, per block


def test_simulate_shows_why_a_laser_without_decoys_makes_no_key() -> None:
    proc = run_simulate(
        "--blocks",
        "1",
        "--block-detections",
        "300000",
        "--no-decoy",
        "--pns-attack",
        "--length-km",
        "50",
        "--seed",
        "2",
    )
    assert proc.returncode == 0, proc.stderr
    assert "WITHOUT decoy states" in proc.stdout and "total: 0 final bits" in proc.stdout
    line = next(x for x in proc.stdout.splitlines() if "PNS:" in x)
    assert "known to Eve" in line


def test_simulate_labels_a_single_photon_source() -> None:
    proc = run_simulate(
        "--blocks", "1", "--block-detections", "100000", "--source", "single-photon"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("source: IDEAL SINGLE-PHOTON SOURCE")
