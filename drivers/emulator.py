"""``qkd-emulator``: a QKD link emulated in one process, exposed as two pseudo-terminals.

``qkd-emulator simulate ...`` runs the simulated BB84 link offline and prints its report.

``qkd-emulator pty --link-a PATH --link-b PATH`` opens two ptys, makes each slave raw (so
the line discipline neither echoes nor rewrites frame bytes), links PATH -> /dev/pts/N, and
speaks the device side of serial protocol v1 on each master. Both sides get the same keys
with the same IDs (see ``emulated_device.EmulatedLink``), made by the simulated BB84 link
(``bb84_source``) or, with ``--physics random``, drawn at random. The emulator keeps each slave open
itself so that the master never sees EIO while no daemon is attached. It prints ``ready``
(or a JSON object with ``--json``) once both links exist, and exits 0 on SIGTERM/SIGINT
after removing the links it made.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import tty
from collections.abc import Sequence
from dataclasses import dataclass

import trio

from .constants import DEFAULT_RETRANSMIT_TIMEOUT, DEFAULT_STATUS_INTERVAL, DEFAULT_WINDOW
from .emulated_device import EmulatedLink
from .errors import DeviceError
from .key_source import RandomKeySource
from .simulate_cli import (
    add_link_arguments,
    add_simulate_arguments,
    key_source_from_args,
    simulate_main,
)

__all__ = ["EmulatorError", "PtyLink", "close_pty_link", "main", "open_pty_link"]

log = logging.getLogger("qkdd.emulator")


class EmulatorError(DeviceError):
    """The emulator cannot start (bad arguments, a path it must not replace...)."""


@dataclass
class PtyLink:
    master: int  # the emulated device's end
    slave: int  # held open by the emulator so the master never sees EIO
    slave_name: str  # /dev/pts/N
    link_path: str  # the symlink given to the daemon


def open_pty_link(link_path: str) -> PtyLink:
    """Open a raw pty and point ``link_path`` at its slave (replacing only a symlink)."""
    if os.path.lexists(link_path) and not os.path.islink(link_path):
        raise EmulatorError(
            f"refusing to replace {link_path}: it exists and is not a symlink; "
            "choose another --link path or remove it"
        )
    master, slave = os.openpty()
    try:
        tty.setraw(slave)
        name = os.ttyname(slave)
        tmp = f"{link_path}.{os.getpid()}.tmp"
        os.symlink(name, tmp)
        os.replace(tmp, link_path)  # atomic: the path is never missing or half made
    except OSError as exc:
        os.close(master)
        os.close(slave)
        raise EmulatorError(f"cannot create {link_path}: {exc.strerror}") from None
    log.info("emulator.pty link=%s pty=%s", link_path, name)
    return PtyLink(master, slave, name, link_path)


def close_pty_link(link: PtyLink, *, close_master: bool = True) -> None:
    """Remove the symlink if it still points at our pty, and close the fds."""
    try:
        if os.path.islink(link.link_path) and os.readlink(link.link_path) == link.slave_name:
            os.unlink(link.link_path)
    except OSError as exc:
        log.warning("emulator.unlink-failed link=%s reason=%r", link.link_path, exc.strerror)
    for fd in (link.master, link.slave) if close_master else (link.slave,):
        with contextlib.suppress(OSError):
            os.close(fd)


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


def _key_bits(text: str) -> int:
    value = int(text)
    if value % 8 or not 8 <= value <= 8192:
        raise argparse.ArgumentTypeError("must be a multiple of 8 between 8 and 8192")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qkd-emulator",
        description="Emulated QKD link speaking qkdd serial protocol v1.",
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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "simulate":
        return simulate_main(args)
    if os.path.abspath(args.link_a) == os.path.abspath(args.link_b):
        print("qkd-emulator: --link-a and --link-b must be different paths", file=sys.stderr)
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
