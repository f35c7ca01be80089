"""The emulator's key rates beside the independent reference (``reference_keyrate.py``,
Lim et al. 2014 written from the paper) for the same parameters, 0 to 150 km and at the
cut-off, as a Markdown table with relative errors.

Parameters: the emulator's defaults except what the reference's channel model (the
paper's section IV) cannot express: no dead time, no afterpulses, no efficiency mismatch,
and a weakest decoy of 2e-4 (the paper's value). Columns:

* asymptotic: the emulator's model (``finite_key.asymptotic_secret_key_rate``) and the
  reference's ``asymptotic_rate``, both with error correction at f = 1.1;
* finite (model): expected counts of a block of ``--block-detections`` clicks through
  each implementation's finite-key bounds, f = 1.1;
* finite (simulated): blocks actually simulated and post-processed by the emulator (real
  Cascade leak, real statistical fluctuations), beside the reference at the Cascade
  efficiency f the blocks measured.

A second table shows the shape of the finite-size rate against block size and distance
for the emulator's default link (dead time, afterpulses and mismatch included): it rises
toward the asymptotic rate as blocks grow, as the curves of the paper's figure 1 do.

    python bench/keyrate_table.py [--block-detections N] [--blocks N]
"""

from __future__ import annotations

import argparse
import random
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import reference_keyrate as ref  # noqa: E402
from qkdd_drivers.emulator.bb84_source import Bb84KeySource  # noqa: E402
from qkdd_drivers.emulator.finite_key import (  # noqa: E402
    asymptotic_secret_key_rate,
    finite_secret_key_rate,
)
from qkdd_drivers.emulator.physics import Bb84Parameters, link_model  # noqa: E402

PLAIN = Bb84Parameters(dead_time=0.0, afterpulse_prob=0.0, efficiency_mismatch=0.0, vacuum_mu=2e-4)
F_EC = 1.1


def setup(link: Bb84Parameters, f_ec: float = F_EC) -> ref.Setup:
    return ref.Setup(
        length_km=link.length_km,
        alpha_db_per_km=link.alpha_db_per_km,
        eta_bob=link.detector_efficiency,
        p_dc=link.dark_count_prob,
        p_ap=0.0,
        e_mis=link.misalignment,
        mu=link.intensities,
        p=link.class_probs,
        q_x=link.x_basis_prob,
        f_ec=f_ec,
        eps_sec=1e-10,
        eps_cor=2.0**-64,
    )


def reference_finite(link: Bb84Parameters, detections: float, f_ec: float = F_EC) -> float:
    """Reference bits per pulse for a block of the emulator's pulse count."""
    pulses = detections / link_model(link).clicks
    s = setup(link, f_ec)
    return ref.key_length(s, ref.expected_counts(s, pulses), True).length / pulses


def rel(a: float, b: float) -> str:
    if b == 0:
        return "—" if a == 0 else "inf"
    return f"{100 * (a - b) / b:+.2f} %"


def cutoff(rate, lo: float = 0.0, hi: float = 400.0) -> float:
    while hi - lo > 0.01:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if rate(mid) > 0 else (lo, mid)
    return lo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--block-detections", type=int, default=2_000_000)
    parser.add_argument("--blocks", type=int, default=2)
    args = parser.parse_args()
    det = args.block_detections
    rate = PLAIN.pulse_rate
    print(f"bits per pulse; blocks of {det} clicks; f = {F_EC} unless measured\n")
    print(
        "| km | asympt. emulator | asympt. reference | rel. | finite model | finite ref. "
        "| rel. | finite simulated (f) | ref. at that f | rel. |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for km in (0, 25, 50, 75, 100, 125, 150):
        link = replace(PLAIN, length_km=km)
        a_emu = asymptotic_secret_key_rate(link, F_EC) / rate
        a_ref = ref.asymptotic_rate(setup(link))
        f_emu = finite_secret_key_rate(link, det, ec_efficiency=F_EC) / rate
        f_ref = reference_finite(link, det)
        source = Bb84KeySource(link, block_detections=det, rng=random.Random(km))
        reports = [source.run_block().report for _ in range(args.blocks)]
        pulses = sum(r.pulses for r in reports)
        sim = sum(r.secure_length for r in reports if r.secure_length > 0) / pulses
        effs = [r.ec_efficiency for r in reports if r.ec_efficiency]
        f_meas = sum(effs) / len(effs) if effs else F_EC
        s_ref = reference_finite(link, det, f_meas)
        print(
            f"| {km} | {a_emu:.4e} | {a_ref:.4e} | {rel(a_emu, a_ref)} | {f_emu:.4e} | "
            f"{f_ref:.4e} | {rel(f_emu, f_ref)} | {sim:.4e} ({f_meas:.3f}) | {s_ref:.4e} | "
            f"{rel(sim, s_ref)} |"
        )
    a_cut_emu = cutoff(lambda km: asymptotic_secret_key_rate(replace(PLAIN, length_km=km), F_EC))
    a_cut_ref = ref.cutoff_km(ref.asymptotic_rate, setup(PLAIN))
    f_cut_emu = cutoff(
        lambda km: finite_secret_key_rate(replace(PLAIN, length_km=km), det, ec_efficiency=F_EC)
    )
    f_cut_ref = cutoff(lambda km: reference_finite(replace(PLAIN, length_km=km), det))
    print(
        f"\ncut-off, asymptotic: emulator {a_cut_emu:.2f} km, reference {a_cut_ref:.2f} km "
        f"({rel(a_cut_emu, a_cut_ref)}); finite ({det} clicks): emulator {f_cut_emu:.2f} km, "
        f"reference {f_cut_ref:.2f} km ({rel(f_cut_emu, f_cut_ref)})"
    )

    sizes = [10**e for e in range(5, 11)]
    print("\ndefault link, bits per second, by block size (clicks per block):\n")
    print("| km | " + " | ".join(f"1e{len(str(n)) - 1}" for n in sizes) + " | asymptotic |")
    print("|---:|" + "---:|" * (len(sizes) + 1))
    for km in (0, 25, 50, 75, 100, 125, 150):
        link = Bb84Parameters(length_km=km)
        cells = [finite_secret_key_rate(link, n) for n in sizes]
        cells.append(asymptotic_secret_key_rate(link))
        print(f"| {km} | " + " | ".join(f"{c:.3g}" for c in cells) + " |")


if __name__ == "__main__":
    main()
