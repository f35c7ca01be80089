"""Command-line pieces for the simulated BB84 link: the device-parameter flags (shared by
``qkd-emulator pty`` and ``qkd-emulator simulate``), their conversion to parameter objects,
and ``simulate_main``, which runs blocks and prints a report (JSON with ``--json``).

Wiring into ``emulator.build_parser``::

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

from .bb84 import (
    LinkParameters,
    asymptotic_secret_key_rate,
    channel_transmittance,
    detection_probability,
    expected_qber,
)
from .bb84_source import DEFAULT_BLOCK_DETECTIONS, Bb84KeySource
from .postprocessing import PostProcessingParameters

__all__ = [
    "add_link_arguments",
    "add_simulate_arguments",
    "key_source_from_args",
    "link_parameters_from_args",
    "postprocessing_parameters_from_args",
    "simulate_main",
]

_LINK = LinkParameters()
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
    g = parser.add_argument_group("simulated BB84 link (source, channel, detectors)")
    g.add_argument(
        "--mu",
        type=_number(0, _INF, low_open=True),
        default=_LINK.mu,
        help=f"mean photon number of signal pulses (default: {_LINK.mu:g})",
    )
    g.add_argument(
        "--pulse-rate",
        type=_number(0, _INF, low_open=True),
        default=_LINK.pulse_rate,
        metavar="HZ",
        help=f"pulses per second (default: {_LINK.pulse_rate:g})",
    )
    g.add_argument(
        "--decoy-mu",
        type=_number(0, _INF, low_open=True),
        default=None,
        metavar="NU",
        help="enable vacuum + weak decoy states with this decoy "
        "intensity (below --mu; e.g. 0.1); default: no decoy, the key length "
        "uses the ideal single-photon bound",
    )
    g.add_argument(
        "--decoy-prob",
        type=_number(0, 1, low_open=True, high_open=True),
        default=_LINK.decoy_prob,
        help=f"share of decoy pulses with --decoy-mu (default: {_LINK.decoy_prob:g})",
    )
    g.add_argument(
        "--vacuum-prob",
        type=_number(0, 1, low_open=True, high_open=True),
        default=_LINK.vacuum_prob,
        help=f"share of vacuum pulses with --decoy-mu (default: {_LINK.vacuum_prob:g})",
    )
    g.add_argument(
        "--fibre-loss",
        type=_number(0, _INF),
        default=_LINK.alpha_db_per_km,
        metavar="DB_PER_KM",
        help=f"fibre attenuation (default: {_LINK.alpha_db_per_km:g} dB/km)",
    )
    g.add_argument(
        "--length-km",
        "--length",
        dest="length",
        type=_number(0, _INF),
        default=_LINK.length_km,
        metavar="KM",
        help=f"fibre length (default: {_LINK.length_km:g} km)",
    )
    g.add_argument(
        "--detector-efficiency",
        type=_number(0, 1, low_open=True),
        default=_LINK.detector_efficiency,
        help=f"detector efficiency (default: {_LINK.detector_efficiency:g})",
    )
    g.add_argument(
        "--dark-count",
        type=_number(0, 1, high_open=True),
        default=_LINK.dark_count_prob,
        metavar="P",
        help=f"dark count probability per gate (default: {_LINK.dark_count_prob:g})",
    )
    g.add_argument(
        "--intrinsic-qber",
        type=_number(0, 0.5),
        default=_LINK.misalignment,
        metavar="E",
        help="error probability of a signal click from misalignment "
        f"(default: {_LINK.misalignment:g})",
    )
    g.add_argument(
        "--afterpulse",
        type=_number(0, 1, high_open=True),
        default=_LINK.afterpulse_prob,
        metavar="P",
        help=f"afterpulse probability per click (default: {_LINK.afterpulse_prob:g})",
    )
    g.add_argument(
        "--eve-fraction",
        type=_number(0, 1),
        default=_LINK.eve_fraction,
        metavar="F",
        help="fraction of pulses an intercept-resend eavesdropper "
        "measures and resends (default: 0, no eavesdropper)",
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
        "--sample-fraction",
        type=_number(0, 1, low_open=True, high_open=True),
        default=_POST.sample_fraction,
        help="share of sifted bits disclosed to estimate the QBER "
        f"(default: {_POST.sample_fraction:g})",
    )
    p.add_argument(
        "--qber-threshold",
        type=_number(0, 0.5, low_open=True),
        default=_POST.qber_threshold,
        help=f"abort a block above this estimated QBER (default: {_POST.qber_threshold:g})",
    )
    p.add_argument(
        "--cascade-passes",
        type=_count(1),
        default=_POST.cascade_passes,
        help=f"Cascade passes (default: {_POST.cascade_passes})",
    )
    p.add_argument(
        "--eps-pa",
        type=_number(0, 1, low_open=True, high_open=True),
        default=_POST.eps_pa,
        help="privacy amplification failure probability; costs 2 log2(1/eps) "
        f"bits per block (default: {_POST.eps_pa:g})",
    )
    p.add_argument(
        "--pe-epsilon",
        type=_number(0, 1, low_open=True, high_open=True),
        default=None,
        metavar="EPS",
        help="add the finite-sample deviation of the QBER estimate with this "
        "failure probability (default: use the point estimate)",
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


def link_parameters_from_args(args: argparse.Namespace) -> LinkParameters:
    """LinkParameters from parsed flags; raises ValueError with an operator message."""
    return LinkParameters(
        mu=args.mu,
        pulse_rate=args.pulse_rate,
        alpha_db_per_km=args.fibre_loss,
        length_km=args.length,
        detector_efficiency=args.detector_efficiency,
        dark_count_prob=args.dark_count,
        misalignment=args.intrinsic_qber,
        afterpulse_prob=args.afterpulse,
        eve_fraction=args.eve_fraction,
        decoy_mu=args.decoy_mu,
        decoy_prob=args.decoy_prob,
        vacuum_prob=args.vacuum_prob,
    )


def postprocessing_parameters_from_args(args: argparse.Namespace) -> PostProcessingParameters:
    return PostProcessingParameters(
        sample_fraction=args.sample_fraction,
        qber_threshold=args.qber_threshold,
        cascade_passes=args.cascade_passes,
        eps_pa=args.eps_pa,
        pe_epsilon=args.pe_epsilon,
        key_bits=getattr(args, "key_bits", _POST.key_bits),
    )


def key_source_from_args(args: argparse.Namespace) -> Bb84KeySource:
    return Bb84KeySource(
        link_parameters_from_args(args),
        postprocessing_parameters_from_args(args),
        block_detections=args.block_detections,
        rate_bits_per_s=args.key_rate_limit,
        rng=random.Random(args.seed) if args.seed is not None else None,
    )


def _model(link: LinkParameters) -> dict[str, float]:
    return {
        "transmittance": channel_transmittance(link),
        "detection_probability": detection_probability(link),
        "expected_qber": expected_qber(link),
        "asymptotic_secret_key_rate": asymptotic_secret_key_rate(link),
    }


def simulate_main(args: argparse.Namespace) -> int:
    """Run ``args.blocks`` blocks and print the per-block and total figures. Returns 0,
    or 2 (message on stderr) if the parameters are inconsistent."""
    if args.detections is not None:
        # N detections in blocks of at most --block-detections, as even as possible.
        args.blocks = -(-args.detections // args.block_detections)
        args.block_detections = -(-args.detections // args.blocks)
    try:
        source = key_source_from_args(args)
    except ValueError as exc:
        print(f"qkd-emulator simulate: {exc}", file=sys.stderr)
        return 2
    blocks = []
    for _ in range(args.blocks):
        result = source.run_block()
        entry = result.report.as_dict()
        entry["keys"] = len(result.alice_keys)
        entry["keys_match"] = result.keys_match
        entry["timings"] = result.timings
        blocks.append(entry)
    out = {
        "link": dict(source.link.__dict__),
        "postprocessing": dict(source.post.__dict__),
        "block_pulses": source.block_pulses,
        "model": _model(source.link),
        "blocks": blocks,
        "totals": source.totals.as_dict(),
    }
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    model = _model(source.link)
    print(
        f"model: QBER {model['expected_qber']:.4f}, asymptotic secret key rate "
        f"{model['asymptotic_secret_key_rate']:.4g} bit/s"
    )
    print(
        f"{'block':>5} {'clicks':>9} {'sifted':>9} {'QBER':>7} {'disclosed':>9} "
        f"{'final':>9} {'SKR bit/s':>11}  status"
    )
    for i, b in enumerate(blocks):
        q = b["qber_estimate"]
        print(
            f"{i:>5} {b['detections']:>9} {b['sifted_bits']:>9} "
            f"{'-' if q is None else f'{q:.4f}':>7} {b['disclosed_bits']:>9} "
            f"{b['final_bits']:>9} {b['secret_key_rate']:>11.4g}  {b['aborted'] or 'ok'}"
        )
    t = source.totals
    print(
        f"total: {t.final_bits} final bits in {t.simulated_seconds:.4g} simulated s "
        f"({t.secret_key_rate:.4g} bit/s), computed at {t.throughput / 1e6:.3f} Mbit/s"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m qkdd_drivers.simulate_cli``: the simulate subcommand on its own."""
    parser = argparse.ArgumentParser(
        prog="qkd-emulator simulate",
        description="Simulate blocks of a BB84 link with its post-processing and report "
        "QBER, disclosed bits, final key and secret key rate.",
    )
    add_simulate_arguments(parser)
    return simulate_main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
