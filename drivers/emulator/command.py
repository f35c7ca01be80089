"""``qkd-emulator``: a QKD link emulated in one process, exposed as two pseudo-terminals.

``qkd-emulator simulate ...`` runs the simulated BB84 link offline and prints its report.

``qkd-emulator pty --link-a PATH --link-b PATH`` opens two ptys, makes each slave raw (so
the line discipline neither echoes nor rewrites frame bytes), links PATH -> /dev/pts/N, and
speaks the device side of the serial protocol on each master. Both sides get the same keys
with the same IDs (see ``device_side.EmulatedLink``), made by the simulated BB84 link
(``bb84_source``) or, with ``--physics random``, drawn at random. The emulator keeps each slave open
itself so that the master never sees EIO while no daemon is attached. It prints ``ready``
(or a JSON object with ``--json``) once both links exist, and exits 0 on SIGTERM/SIGINT
after removing the links it made.

``qkd-emulator half --role alice|bob --link PATH (--listen|--connect) HOST:PORT`` runs one
half of the link on a site host of its own: one pty here, the other half over TCP
(``half``, wire format in ``fibre_protocol``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence

import trio

from ..serial.serial_constants import (
    DEFAULT_RETRANSMIT_TIMEOUT,
    DEFAULT_STATUS_INTERVAL,
    DEFAULT_WINDOW,
    MAX_SITE_ID_SIZE,
)
from .device_side import EmulatedLink
from .half import (
    DEFAULT_DRAIN_TIMEOUT,
    DEFAULT_RECONNECT_MAX_DELAY,
    half_main,
    parse_address,
)
from .key_source import RandomKeySource
from .ptys import EmulatorError, PtyLink, close_pty_link, open_pty_link
from .simulate import (
    add_link_arguments,
    add_simulate_arguments,
    key_source_from_args,
    simulate_main,
)

__all__ = ["EmulatorError", "PtyLink", "close_pty_link", "main", "open_pty_link"]

log = logging.getLogger("qkdd.emulator")


async def run_pty(args: argparse.Namespace) -> None:
    links: list[PtyLink] = []
    streams: list[trio.lowlevel.FdStream] = []
    # Signal handling is installed before "ready" so a prompt SIGTERM still exits cleanly.
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        try:
            for path in (args.link_a, args.link_b):
                links.append(open_pty_link(path))
            source = (
                RandomKeySource(args.key_bits)
                if args.physics == "random"
                else key_source_from_args(args)
            )
            link = EmulatedLink(
                source,
                rate=args.rate,
                buffer=args.buffer,
                window=args.window,
                retransmit_timeout=args.retransmit_timeout,
                status_interval=args.status_interval,
                sites=(args.site_a, args.site_b) if args.site_a else None,
            )
            if args.json:
                print(json.dumps({"link_a": args.link_a, "link_b": args.link_b}), flush=True)
            else:
                print("ready", flush=True)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(link.produce)
                for half, pty_link in zip(link.halves, links, strict=True):
                    stream = trio.lowlevel.FdStream(pty_link.master)
                    streams.append(stream)
                    nursery.start_soon(half.serve, stream)
                async for signum in signals:
                    log.info("emulator.stopping signal=%s", signal.Signals(signum).name)
                    nursery.cancel_scope.cancel()
                    break
        finally:
            for stream in streams:
                await trio.aclose_forcefully(stream)
            for i, pty_link in enumerate(links):
                # Masters handed to a stream were closed with it.
                close_pty_link(pty_link, close_master=i >= len(streams))


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value


def _site_id(text: str) -> str:
    if not text or len(text.encode()) > MAX_SITE_ID_SIZE:
        raise argparse.ArgumentTypeError(f"must be 1 to {MAX_SITE_ID_SIZE} bytes")
    return text


def _key_bits(text: str) -> int:
    value = int(text)
    if value % 8 or not 8 <= value <= 8192:
        raise argparse.ArgumentTypeError("must be a multiple of 8 between 8 and 8192")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qkd-emulator",
        description="Emulated QKD link speaking the qkdd serial protocol.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    pty_cmd = sub.add_parser(
        "pty",
        help="expose both ends of an emulated QKD link as pseudo-terminals",
        description=(
            "Expose both ends of one emulated QKD link as pseudo-terminals. Each site's qkdd "
            "opens one link path as its serial device; both receive the same keys with the "
            "same IDs. Prints 'ready' (or JSON with --json) once both paths exist; exits 0 "
            "on SIGTERM or SIGINT and removes the paths."
        ),
    )
    pty_cmd.add_argument(
        "--link-a",
        required=True,
        metavar="PATH",
        help="symlink to create for side A, pointing at its /dev/pts/N "
        "(an existing symlink is replaced; any other file is refused)",
    )
    pty_cmd.add_argument(
        "--link-b", required=True, metavar="PATH", help="symlink to create for side B (likewise)"
    )
    pty_cmd.add_argument(
        "--site-a",
        type=_site_id,
        metavar="SITE",
        help="site ID of the qkdd at side A; with --site-b, each side tells its qkdd which "
        "end of the link it is, and a qkdd attached to the wrong end refuses it",
    )
    pty_cmd.add_argument(
        "--site-b", type=_site_id, metavar="SITE", help="site ID of the qkdd at side B"
    )
    pty_cmd.add_argument(
        "--key-bits",
        type=_key_bits,
        default=256,
        metavar="BITS",
        help="size of each key in bits, a multiple of 8 up to 8192 (default: 256)",
    )
    pty_cmd.add_argument(
        "--rate",
        type=_positive_float,
        default=None,
        metavar="KEYS_PER_S",
        help="keys generated per second (default: unpaced, as fast as the hosts take them)",
    )
    pty_cmd.add_argument(
        "--buffer",
        type=_positive_int,
        default=4096,
        metavar="N",
        help="keys each side holds at most, unacknowledged ones included; generation "
        "pauses while either side is full (default: 4096)",
    )
    pty_cmd.add_argument(
        "--window",
        type=_positive_int,
        default=DEFAULT_WINDOW,
        metavar="N",
        help=f"keys each side keeps in flight before an ACK (default: {DEFAULT_WINDOW})",
    )
    pty_cmd.add_argument(
        "--retransmit-timeout",
        type=_positive_float,
        default=DEFAULT_RETRANSMIT_TIMEOUT,
        metavar="S",
        help="resend an unacknowledged key after this many seconds "
        f"(default: {DEFAULT_RETRANSMIT_TIMEOUT:g})",
    )
    pty_cmd.add_argument(
        "--status-interval",
        type=_positive_float,
        default=DEFAULT_STATUS_INTERVAL,
        metavar="S",
        help=f"seconds between STATUS heartbeats (default: {DEFAULT_STATUS_INTERVAL:g})",
    )
    pty_cmd.add_argument(
        "--json",
        action="store_true",
        help='print {"link_a": PATH, "link_b": PATH} instead of "ready" once both paths exist',
    )
    pty_cmd.add_argument(
        "--physics",
        choices=["bb84", "random"],
        default="bb84",
        help="bb84: simulate the link (photons, loss, errors, eavesdropper) and its "
        "post-processing, with the flags below; random: shared random keys, no physics "
        "(default: bb84)",
    )
    add_link_arguments(pty_cmd)
    pty_cmd.add_argument(
        "--log-level",
        default="WARNING",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging threshold for messages on stderr (default: WARNING)",
    )
    add_half_parser(sub)
    simulate = sub.add_parser(
        "simulate",
        help="run the simulated BB84 link offline and report its figures",
        description=(
            "Simulate the BB84 link and its post-processing with no serial endpoint, and "
            "report per block and in total: detections, sifted bits, QBER estimate, disclosed "
            "bits, final key bits and secret key rate. For planning a link (what key rate at "
            "this distance?) and for checking the physics."
        ),
    )
    add_simulate_arguments(simulate)
    return parser


def add_half_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    half = sub.add_parser(
        "half",
        help="run one half of an emulated QKD link on this host, the other half over TCP",
        description=(
            "Run one half of an emulated BB84 link: one pseudo-terminal for this site's "
            "qkdd, and a TCP connection to the half on the other site host. That "
            "connection stands for the fibre (Alice's half simulates each block and sends "
            "Bob's detection record, where a real link would send photons) and for the "
            "classical post-processing channel. Both halves hand out the same keys with "
            "the same IDs, a block at a time, and only once both have it. Run both halves "
            "with the same link flags: halves that differ refuse each other (exit 2). "
            "Prints 'ready' (or JSON with --json) once the link path exists and the TCP "
            "side is set up; exits 0 on SIGTERM or SIGINT and removes the path."
        ),
    )
    half.add_argument(
        "--role",
        required=True,
        choices=["alice", "bob"],
        help="alice simulates the blocks and answers the post-processing; bob asks for "
        "blocks and drives it. One half of each link runs each role",
    )
    half.add_argument(
        "--link",
        required=True,
        metavar="PATH",
        help="symlink to create, pointing at this half's /dev/pts/N (an existing symlink "
        "is replaced; any other file is refused)",
    )
    where = half.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--listen",
        type=parse_address,
        metavar="HOST:PORT",
        help="accept the other half's connection here (port 0: any free port, printed "
        "with --json); a new connection replaces the previous one",
    )
    where.add_argument(
        "--connect",
        type=parse_address,
        metavar="HOST:PORT",
        help="connect to the other half here, and again with backoff whenever the "
        "connection is lost",
    )
    half.add_argument(
        "--site",
        type=_site_id,
        metavar="SITE",
        help="site ID of the qkdd this half serves; with --peer-site, the half tells its "
        "qkdd which end of the link it is, and a qkdd of another site refuses it",
    )
    half.add_argument(
        "--peer-site", type=_site_id, metavar="SITE", help="site ID at the other half's end"
    )
    half.add_argument(
        "--key-bits",
        type=_key_bits,
        default=256,
        metavar="BITS",
        help="size of each key in bits, a multiple of 8 up to 8192 (default: 256)",
    )
    half.add_argument(
        "--buffer",
        type=_positive_int,
        default=4096,
        metavar="N",
        help="keys this half holds for its host before it asks for no more blocks (default: 4096)",
    )
    half.add_argument(
        "--window",
        type=_positive_int,
        default=DEFAULT_WINDOW,
        metavar="N",
        help=f"keys kept in flight before an ACK (default: {DEFAULT_WINDOW})",
    )
    half.add_argument(
        "--retransmit-timeout",
        type=_positive_float,
        default=DEFAULT_RETRANSMIT_TIMEOUT,
        metavar="S",
        help="resend an unacknowledged key after this many seconds "
        f"(default: {DEFAULT_RETRANSMIT_TIMEOUT:g})",
    )
    half.add_argument(
        "--status-interval",
        type=_positive_float,
        default=DEFAULT_STATUS_INTERVAL,
        metavar="S",
        help=f"seconds between STATUS heartbeats (default: {DEFAULT_STATUS_INTERVAL:g})",
    )
    half.add_argument(
        "--reconnect-max-delay",
        type=_positive_float,
        default=DEFAULT_RECONNECT_MAX_DELAY,
        metavar="S",
        help="with --connect, the longest wait between connection attempts "
        f"(default: {DEFAULT_RECONNECT_MAX_DELAY:g})",
    )
    half.add_argument(
        "--drain-timeout",
        type=_positive_float,
        default=DEFAULT_DRAIN_TIMEOUT,
        metavar="S",
        help="on SIGTERM/SIGINT, wait at most this long for the block under way and for "
        f"the host to take the keys already handed over (default: {DEFAULT_DRAIN_TIMEOUT:g})",
    )
    half.add_argument(
        "--json",
        action="store_true",
        help='print {"role": ..., "link": PATH, "listen" or "connect": HOST:PORT} instead '
        'of "ready" (with --listen, the port actually bound)',
    )
    half.add_argument(
        "--physics",
        choices=["bb84"],
        default="bb84",
        help="bb84: the simulated link, with the flags below (the only physics that can "
        "be split between two hosts; default: bb84)",
    )
    add_link_arguments(half)
    half.add_argument(
        "--log-level",
        default="WARNING",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging threshold for messages on stderr (default: WARNING)",
    )


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=level,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "simulate":
        return simulate_main(args)
    if args.command == "half":
        _setup_logging(args.log_level)
        return half_main(args)
    if os.path.abspath(args.link_a) == os.path.abspath(args.link_b):
        print("qkd-emulator: --link-a and --link-b must be different paths", file=sys.stderr)
        return 2
    if bool(args.site_a) != bool(args.site_b) or (args.site_a and args.site_a == args.site_b):
        print(
            "qkd-emulator: give both --site-a and --site-b, and two different sites",
            file=sys.stderr,
        )
        return 2
    logging.basicConfig(
        stream=sys.stderr,
        level=args.log_level,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    try:
        trio.run(run_pty, args)
    except EmulatorError as exc:
        print(f"qkd-emulator: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
