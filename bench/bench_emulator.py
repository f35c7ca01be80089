"""Throughput of the simulated BB84 link on one core: final key produced per second of
computation at 10, 50 and 100 km, the share of each stage, and the privacy amplification
beside its floor.

Both ends' post-processing runs in this process (Alice and Bob each sift, correct, hash and
amplify their own strings), so every figure counts the work of the two parties. Stages:
simulation (clicks of the block), sifting (with parameter estimation and the finite-key
bounds), error correction (Cascade, both ends), verification hash, privacy amplification
(FFT Toeplitz hashing, both ends). The floor is numpy's FFT itself, measured in the same
run: the three real FFTs of one cyclic convolution of the block's privacy amplification
length, for each of the two ends ("x floor" = PA time / floor time). The last columns
give the Cascade leak over the Shannon limit (f) and the simulated link's own secret key
rate beside the model's finite-key and asymptotic rates.

    python bench/bench_emulator.py [--blocks N] [--block-detections N] [--quick]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from qkdd_drivers.emulator.bb84_source import DEFAULT_BLOCK_DETECTIONS, Bb84KeySource
from qkdd_drivers.emulator.finite_key import asymptotic_secret_key_rate, finite_secret_key_rate
from qkdd_drivers.emulator.physics import Bb84Parameters
from qkdd_drivers.emulator.toeplitz import _fast_length

STAGES = ("simulation", "sifting", "ec", "verify", "pa")


def fft_floor_seconds(n: int, repeats: int = 3) -> float:
    """Best time for both ends' FFTs of one privacy amplification of n bits."""
    length = _fast_length(n - 1)
    rng = np.random.default_rng(0)
    a = rng.integers(0, 2, n - 1).astype(np.float64)
    b = rng.integers(0, 2, n // 2).astype(np.float64)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _party in range(2):
            np.fft.irfft(np.fft.rfft(a, length) * np.fft.rfft(b, length), length)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--block-detections", type=int, default=DEFAULT_BLOCK_DETECTIONS)
    parser.add_argument(
        "--quick", action="store_true", help="one small block per distance (a smoke test)"
    )
    args = parser.parse_args()
    if args.quick:
        args.blocks, args.block_detections = 1, 300_000

    print(
        f"blocks of {args.block_detections} clicks, {args.blocks} per distance after a "
        "warm-up block; both ends in this process, one core"
    )
    header = (
        f"{'km':>4} {'QBER':>6} {'final Mbit':>10} {'wall s':>7} {'Mbit/s':>7} "
        + " ".join(f"{s + ' %':>{max(6, len(s) + 2)}}" for s in STAGES)
        + f" {'floor s':>8} {'x floor':>7} {'f':>6} {'SKR Mbit/s':>10} {'model':>7} "
        f"{'asympt.':>7}"
    )
    print(header)
    for km in (10, 50, 100):
        link = Bb84Parameters(length_km=km)
        # Unseeded, as in service: Alice's key bits from the system's secure generator.
        source = Bb84KeySource(link, block_detections=args.block_detections)
        source.run_block()  # warm-up (permutation tables, caches), not counted
        source.totals = type(source.totals)()
        floor = 0.0
        leaks = []
        for _ in range(args.blocks):
            result = source.run_block()
            r = result.report
            if r.final_bits:
                floor += fft_floor_seconds(r.kept_bits)
            if r.ec_efficiency is not None:
                leaks.append(r.ec_efficiency)
        t = source.totals
        wall = t.wall_seconds
        split = {k: 100 * t.timings.get(k, 0.0) / wall for k in STAGES}
        pa = t.timings.get("pa", 0.0)
        f = sum(leaks) / len(leaks) if leaks else float("nan")
        print(
            f"{km:>4} {source.qber or 0.0:>6.4f} {t.final_bits / 1e6:>10.3f} {wall:>7.2f} "
            f"{t.throughput / 1e6:>7.3f} "
            + " ".join(f"{split[s]:>{max(6, len(s) + 2)}.1f}" for s in STAGES)
            + f" {floor:>8.4f} {pa / floor if floor else float('nan'):>7.2f} {f:>6.3f} "
            f"{t.secret_key_rate / 1e6:>10.4f} "
            f"{finite_secret_key_rate(link, args.block_detections) / 1e6:>7.4f} "
            f"{asymptotic_secret_key_rate(link) / 1e6:>7.4f}"
        )


if __name__ == "__main__":
    main()
