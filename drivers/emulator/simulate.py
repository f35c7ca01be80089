"""Command-line pieces for the simulated BB84 link: the device-parameter flags (shared by
``qkd-emulator pty`` and ``qkd-emulator simulate``), their conversion to parameter objects,
and ``simulate_main``, which runs blocks and prints a report (JSON with ``--json``).

Wiring into ``command.build_parser``::

    sim = sub.add_parser("simulate", help=..., description=...)
    add_simulate_arguments(sim)          # link flags + --blocks, --key-bits, --json
    ...
    if args.command == "simulate":
        return simulate_main(args)

and for ``pty``: ``add_link_arguments(pty_cmd)`` then ``key_source_from_args(args)``
(``--key-bits`` stays the pty command's own flag).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Sequence
from typing import Any

from .bb84_source import DEFAULT_BLOCK_DETECTIONS, Bb84KeySource
from .finite_key import asymptotic_secret_key_rate, finite_secret_key_rate
from .physics import Bb84Parameters, channel_transmittance, link_model
from .postprocessing import PostProcessingParameters

__all__ = [
    "add_link_arguments",
    "add_simulate_arguments",
    "key_source_from_args",
    "bb84_parameters_from_args",
    "postprocessing_parameters_from_args",
    "simulate_main",
]

_LINK = Bb84Parameters()
_POST = PostProcessingParameters()


def _number(low: float, high: float, *, low_open: bool = False, high_open: bool = False):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        too_low = value <= low if low_open else value < low
        too_high = value >= high if high_open else value > high
        if too_low or too_high:
            lo = "(" if low_open else "["
            hi = ")" if high_open else "]"
            raise argparse.ArgumentTypeError(f"must be in {lo}{low:g}, {high:g}{hi}")
        return value

    return parse


def _count(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}")
        return value

    return parse


_INF = float("inf")


def add_link_arguments(parser: argparse.ArgumentParser) -> None:
    """Every physical and post-processing parameter of the simulated link, with defaults."""
    g = parser.add_argument_group("simulated BB84 link: source")
    g.add_argument(
        "--source",
        choices=["laser", "single-photon"],
        default=_LINK.source,
        help="laser: phase-randomised weak coherent pulses (decoy states by default); "
        "single-photon: an ideal source of exactly one photon per pulse, which no "
        "deployed link has (default: laser)",
    )
    g.add_argument(
        "--mu",
        type=_number(0, 2, low_open=True),
        default=_LINK.mu,
        help=f"mean photon number of signal pulses (default: {_LINK.mu:g})",
    )
    g.add_argument(
        "--decoy-mu",
        type=_number(0, _INF, low_open=True),
        default=_LINK.decoy_mu,
        metavar="NU",
        help=f"decoy intensity, below --mu (default: {_LINK.decoy_mu:g})",
    )
    g.add_argument(
        "--vacuum-mu",
        type=_number(0, _INF),
        default=_LINK.vacuum_mu,
        metavar="OMEGA",
        help="intensity of the weakest decoy; 0 is vacuum, a real intensity modulator "
        f"leaves ~1e-4 (default: {_LINK.vacuum_mu:g})",
    )
    g.add_argument(
        "--decoy-prob",
        type=_number(0, 1, low_open=True, high_open=True),
        default=_LINK.decoy_prob,
        help=f"share of decoy pulses (default: {_LINK.decoy_prob:g})",
    )
    g.add_argument(
        "--vacuum-prob",
        type=_number(0, 1, low_open=True, high_open=True),
        default=_LINK.vacuum_prob,
        help=f"share of vacuum-decoy pulses (default: {_LINK.vacuum_prob:g})",
    )
    g.add_argument(
        "--no-decoy",
        action="store_true",
        help="a laser without decoy states: the key rests on the GLLP bound, which "
        "counts every multi-photon pulse as Eve's (no key at the default mu)",
    )
    g.add_argument(
        "--x-basis-prob",
        type=_number(0, 1, low_open=True, high_open=True),
        default=_LINK.x_basis_prob,
        metavar="QX",
        help="probability of the X (key) basis, for Alice and Bob; Z-basis clicks test "
        f"the phase error (default: {_LINK.x_basis_prob:g})",
    )
    g.add_argument(
        "--pulse-rate",
        type=_number(0, _INF, low_open=True),
        default=_LINK.pulse_rate,
        metavar="HZ",
        help=f"pulses (detector gates) per second (default: {_LINK.pulse_rate:g})",
    )
    c = parser.add_argument_group("simulated BB84 link: channel and eavesdropper")
    c.add_argument(
        "--fibre-loss",
        type=_number(0, _INF),
        default=_LINK.alpha_db_per_km,
        metavar="DB_PER_KM",
        help=f"fibre attenuation (default: {_LINK.alpha_db_per_km:g} dB/km)",
    )
    c.add_argument(
        "--length-km",
        "--length",
        dest="length",
        type=_number(0, _INF),
        default=_LINK.length_km,
        metavar="KM",
        help=f"fibre length (default: {_LINK.length_km:g} km)",
    )
    c.add_argument(
        "--intrinsic-qber",
        type=_number(0, 0.5),
        default=_LINK.misalignment,
        metavar="E",
        help="probability that optical misalignment sends a photon to the wrong detector "
        f"(default: {_LINK.misalignment:g})",
    )
    c.add_argument(
        "--eve-fraction",
        type=_number(0, 1),
        default=_LINK.eve_fraction,
        metavar="F",
        help="fraction of pulses an intercept-resend eavesdropper measures and resends "
        "(default: 0, no eavesdropper)",
    )
    c.add_argument(
        "--pns-attack",
        action="store_true",
        help="a photon-number-splitting eavesdropper who keeps a photon of every "
        "multi-photon pulse and keeps the signal click rate unchanged",
    )
    d = parser.add_argument_group("simulated BB84 link: detectors (GHz-gated InGaAs SPADs)")
    d.add_argument(
        "--detector-efficiency",
        type=_number(0, 1, low_open=True),
        default=_LINK.detector_efficiency,
        help=f"efficiency of the bit-0 detector (default: {_LINK.detector_efficiency:g})",
    )
    d.add_argument(
        "--efficiency-mismatch",
        type=_number(0, 1, high_open=True),
        default=_LINK.efficiency_mismatch,
        metavar="M",
        help="the bit-1 detector's efficiency is (1 - M) times the bit-0 one's "
        f"(default: {_LINK.efficiency_mismatch:g})",
    )
    d.add_argument(
        "--dark-count",
        type=_number(0, 0.5, high_open=True),
        default=_LINK.dark_count_prob,
        metavar="P",
        help=f"dark count probability per gate and detector (default: {_LINK.dark_count_prob:g})",
    )
    d.add_argument(
        "--dead-time",
        type=_number(0, _INF),
        default=_LINK.dead_time * 1e9,
        metavar="NS",
        help="receiver blind time after a click, both detectors (default: "
        f"{_LINK.dead_time * 1e9:g} ns)",
    )
    d.add_argument(
        "--afterpulse",
        type=_number(0, 1, high_open=True),
        default=_LINK.afterpulse_prob,
        metavar="P",
        help=f"afterpulse probability per click (default: {_LINK.afterpulse_prob:g})",
    )
    d.add_argument(
        "--afterpulse-time",
        type=_number(0, _INF),
        default=_LINK.afterpulse_time * 1e9,
        metavar="NS",
        help="time constant of the afterpulse decay after the dead time (default: "
        f"{_LINK.afterpulse_time * 1e9:g} ns)",
    )
    d.add_argument(
        "--double-click",
        choices=["squash", "discard"],
        default=_LINK.double_click,
        help="both detectors click: squash (a random bit, as the security proof needs) or "
        "discard (insecure: shown for comparison) (default: squash)",
    )
    p = parser.add_argument_group("post-processing")
    p.add_argument(
        "--block-detections",
        type=_count(1000),
        default=DEFAULT_BLOCK_DETECTIONS,
        metavar="N",
        help=f"expected clicks per block (default: {DEFAULT_BLOCK_DETECTIONS})",
    )
    p.add_argument(
        "--qber-threshold",
        type=_number(0, 0.5, low_open=True),
        default=_POST.qber_threshold,
        help=f"abort a block above this Z-basis QBER (default: {_POST.qber_threshold:g})",
    )
    p.add_argument(
        "--cascade-passes",
        type=_count(1),
        default=_POST.cascade_passes,
        help=f"Cascade passes (default: {_POST.cascade_passes})",
    )
    p.add_argument(
        "--eps-sec",
        type=_number(0, 1, low_open=True, high_open=True),
        default=_POST.eps_sec,
        metavar="EPS",
        help="secrecy of each block's key (finite-key analysis of Lim et al. 2014; "
        f"correctness is 2^-64 from the verification hash) (default: {_POST.eps_sec:g})",
    )
    p.add_argument(
        "--key-rate-limit",
        type=_number(0, _INF, low_open=True),
        default=None,
        metavar="BITS_PER_S",
        help="hand out final key no faster than this (default: as fast as computed)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed the physics simulation for reproducible runs (the keys are "
        "then predictable: testing only; default: system randomness)",
    )


def add_simulate_arguments(parser: argparse.ArgumentParser) -> None:
    """Link flags plus what only ``simulate`` has."""
    add_link_arguments(parser)
    parser.add_argument(
        "--blocks", type=_count(1), default=3, help="blocks to simulate (default: 3)"
    )
    parser.add_argument(
        "--detections",
        type=_count(1),
        default=None,
        metavar="N",
        help="detections to simulate in all, instead of --blocks: split into blocks of at "
        "most --block-detections",
    )
    parser.add_argument(
        "--key-bits",
        type=_count(8),
        default=_POST.key_bits,
        metavar="BITS",
        help="size of each key, a multiple of 8 up to 8192 (default: 256)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object instead of a table"
    )


def bb84_parameters_from_args(args: argparse.Namespace) -> Bb84Parameters:
    """Bb84Parameters from parsed flags; raises ValueError with an operator message."""
    return Bb84Parameters(
        source=args.source,
        mu=args.mu,
        decoy_mu=None if args.no_decoy else args.decoy_mu,
        vacuum_mu=args.vacuum_mu,
        decoy_prob=args.decoy_prob,
        vacuum_prob=args.vacuum_prob,
        x_basis_prob=args.x_basis_prob,
        pulse_rate=args.pulse_rate,
        alpha_db_per_km=args.fibre_loss,
        length_km=args.length,
        detector_efficiency=args.detector_efficiency,
        efficiency_mismatch=args.efficiency_mismatch,
        dark_count_prob=args.dark_count,
        dead_time=args.dead_time * 1e-9,
        afterpulse_prob=args.afterpulse,
        afterpulse_time=args.afterpulse_time * 1e-9,
        double_click=args.double_click,
        misalignment=args.intrinsic_qber,
        eve_fraction=args.eve_fraction,
        pns_attack=args.pns_attack,
    )


def postprocessing_parameters_from_args(args: argparse.Namespace) -> PostProcessingParameters:
    return PostProcessingParameters(
        qber_threshold=args.qber_threshold,
        cascade_passes=args.cascade_passes,
        eps_sec=args.eps_sec,
        key_bits=getattr(args, "key_bits", _POST.key_bits),
    )


def key_source_from_args(args: argparse.Namespace, *, truth: bool = False) -> Bb84KeySource:
    return Bb84KeySource(
        bb84_parameters_from_args(args),
        postprocessing_parameters_from_args(args),
        block_detections=args.block_detections,
        rate_bits_per_s=args.key_rate_limit,
        rng=random.Random(args.seed) if args.seed is not None else None,
        truth=truth,
    )


SOURCE_LABELS = {
    "decoy": "laser (weak coherent pulses) with decoy states: signal, decoy and vacuum "
    "intensities, finite-key bounds of Lim et al. 2014",
    "gllp": "laser WITHOUT decoy states: every multi-photon pulse counted as known to "
    "Eve (GLLP bound)",
    "single-photon": "IDEAL SINGLE-PHOTON SOURCE (one photon per pulse): not a deployed "
    "technology; key bounded as if every click were a single photon",
}


def _model(link: Bb84Parameters, detections: int, eps_sec: float) -> dict[str, object]:
    model = link_model(link)
    return {
        "source": SOURCE_LABELS[link.mode],
        "transmittance": channel_transmittance(link),
        "clicks_per_pulse": model.clicks,
        "click_rate": model.clicks * link.pulse_rate,
        "click_rate_without_dead_time": model.timing.photon_click_prob * link.pulse_rate,
        "afterpulse_share": model.timing.afterpulse_share,
        "expected_qber": model.qber_x,
        "expected_qber_z": model.qber_z,
        "single_photon_phase_error": model.single_phase_error,
        "pns_forwarded_fractions": model.pns_fractions,
        "asymptotic_secret_key_rate": asymptotic_secret_key_rate(link),
        "finite_secret_key_rate": finite_secret_key_rate(link, detections, eps_sec=eps_sec),
    }


def _budget_line(estimates: dict[str, Any] | None) -> str:
    if not estimates:
        return ""
    eps = estimates["epsilon"]
    assert isinstance(eps, dict)
    parts = ", ".join(
        f"{name.replace('_', ' ')} {value:.2g}"
        for name, value in eps.items()
        if name not in ("eps_sec", "eps_cor", "eps")
    )
    return f"eps_sec {eps['eps_sec']:.2g} = {parts}; eps_cor {eps['eps_cor']:.2g}"


def simulate_main(args: argparse.Namespace) -> int:
    """Run ``args.blocks`` blocks and print the per-block and total figures. Returns 0,
    or 2 (message on stderr) if the parameters are inconsistent."""
    if args.detections is not None:
        # N detections in blocks of at most --block-detections, as even as possible.
        args.blocks = -(-args.detections // args.block_detections)
        args.block_detections = -(-args.detections // args.blocks)
    try:
        source = key_source_from_args(args, truth=True)
        model = _model(source.link, args.block_detections, source.post.eps_sec)
    except ValueError as exc:
        print(f"qkd-emulator simulate: {exc}", file=sys.stderr)
        return 2
    blocks: list[dict[str, Any]] = []
    for _ in range(args.blocks):
        result = source.run_block()
        entry = result.report.as_dict()
        entry["keys"] = len(result.alice_keys)
        entry["keys_match"] = result.keys_match
        entry["timings"] = result.timings
        blocks.append(entry)
    t = source.totals
    leaks = [b["ec_efficiency"] for b in blocks if b["ec_efficiency"] is not None]
    out = {
        "link": dict(source.link.__dict__),
        "postprocessing": dict(source.post.__dict__),
        "block_pulses": source.block_pulses,
        "model": model,
        "blocks": blocks,
        "totals": {
            **t.as_dict(),
            "ec_efficiency_mean": sum(leaks) / len(leaks) if leaks else None,
            "epsilon_sec_per_block": source.post.eps_sec,
        },
    }
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"source: {model['source']}")
    print(
        f"model: {model['click_rate']:.4g} clicks/s "
        f"({model['click_rate_without_dead_time']:.4g} without dead time), "
        f"QBER {model['expected_qber']:.4f}, secret key rate "
        f"{model['finite_secret_key_rate']:.4g} bit/s for these blocks, "
        f"{model['asymptotic_secret_key_rate']:.4g} bit/s asymptotic"
    )
    print(
        f"{'block':>5} {'clicks':>9} {'X bits':>9} {'Z bits':>7} {'QBER':>7} {'phi_X':>7} "
        f"{'s_X1 >=':>9} {'leak':>8} {'f':>5} {'final':>9} {'SKR bit/s':>11}  status"
    )
    for i, b in enumerate(blocks):
        q, phi = b["qber_estimate"], b["qber_bound"]
        est = b["estimates"] or {}
        s1 = est.get("single_photon_x_lower")
        f = b["ec_efficiency"]
        print(
            f"{i:>5} {b['detections']:>9} {b['kept_bits']:>9} {b['test_bits']:>7} "
            f"{'-' if q is None else f'{q:.4f}':>7} {'-' if phi is None else f'{phi:.4f}':>7} "
            f"{'-' if s1 is None else f'{s1:.0f}':>9} {b['ec_disclosed_bits']:>8} "
            f"{'-' if f is None else f'{f:.3f}':>5} {b['final_bits']:>9} "
            f"{b['secret_key_rate']:>11.4g}  {b['aborted'] or 'ok'}"
        )
        if b["estimates"]:
            print(f"      {_budget_line(b['estimates'])}")
        pns = b.get("pns")
        if pns:
            print(
                f"      PNS: Eve holds {pns['eve_known_key_bits']} of {b['kept_bits']} key "
                f"bits; a single-photon bound would keep {pns['single_photon_bound_bits']} "
                f"bits, {pns['eve_information_bits']} of them known to Eve"
            )
    print(
        f"total: {t.final_bits} final bits in {t.simulated_seconds:.4g} simulated s "
        f"({t.secret_key_rate:.4g} bit/s), computed at {t.throughput / 1e6:.3f} Mbit/s"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m qkdd_drivers.emulator.simulate``: the simulate subcommand on its own."""
    parser = argparse.ArgumentParser(
        prog="qkd-emulator simulate",
        description="Simulate blocks of a BB84 link with its post-processing and report "
        "QBER, disclosed bits, final key and secret key rate.",
    )
    add_simulate_arguments(parser)
    return simulate_main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
