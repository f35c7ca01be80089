"""Throughput of the simulated BB84 link on one core: final key produced per second of
computation, at 10, 50 and 100 km with 2 % intrinsic QBER, beside the secret key rate the
simulated link itself achieves (final bits per simulated second).

Both ends' post-processing runs in this process (Alice and Bob each sift, hash and
amplify their own strings), so every figure counts the work of the two parties. The time
split is simulation / sifting (with QBER estimation) / error correction / verification +
privacy amplification. The floor is ``secrets.token_bytes`` producing the same number of
bits in the same run (what ``RandomKeySource`` costs).

    python bench/bench_emulator.py [--blocks N] [--block-detections N]
"""

from __future__ import annotations

import argparse
import secrets
import time

from qkdd_drivers.bb84 import LinkParameters, asymptotic_secret_key_rate
from qkdd_drivers.bb84_source import DEFAULT_BLOCK_DETECTIONS, Bb84KeySource


def floor_seconds(bits: int) -> float:
    """Time for secrets.token_bytes to draw ``bits`` random bits (256-bit keys)."""
    keys = max(1, bits // 256)
    start = time.perf_counter()
    for _ in range(keys):
        secrets.token_bytes(32)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--block-detections", type=int, default=DEFAULT_BLOCK_DETECTIONS)
    parser.add_argument("--qber", type=float, default=0.02)
    args = parser.parse_args()

    header = (
        f"{'km':>4} {'QBER':>6} {'final Mbit':>10} {'wall s':>7} {'Mbit/s':>7} "
        f"{'SKR sim Mbit/s':>14} {'asympt.':>8} {'sim %':>6} {'sift %':>6} {'EC %':>5} "
        f"{'PA %':>5} {'floor s':>8} {'x floor':>8}"
    )
    print(header)
    for km in (10, 50, 100):
        link = LinkParameters(length_km=km, misalignment=args.qber)
        source = Bb84KeySource(link, block_detections=args.block_detections)
        source.run_block()  # warm-up, not counted
        source.totals = type(source.totals)()
        for _ in range(args.blocks):
            source.run_block()
        t = source.totals
        wall = t.wall_seconds
        split = {k: 100 * v / wall for k, v in t.timings.items()}
        floor = floor_seconds(t.final_bits)
        qber = source.qber or 0.0
        print(
            f"{km:>4} {qber:>6.3f} {t.final_bits / 1e6:>10.3f} {wall:>7.2f} "
            f"{t.throughput / 1e6:>7.3f} {t.secret_key_rate / 1e6:>14.3f} "
            f"{asymptotic_secret_key_rate(link) / 1e6:>8.3f} {split['simulation']:>6.1f} "
            f"{split['sifting']:>6.1f} {split['ec']:>5.1f} {split['pa']:>5.1f} "
            f"{floor:>8.4f} {wall / floor if floor else float('inf'):>8.0f}"
        )


if __name__ == "__main__":
    main()
