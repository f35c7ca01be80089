"""The ``qkdd`` command: ``run`` (the service), ``keygen``, ``check-config`` and ``demo``.

Every known failure ends in one plain line on stderr and a non-zero exit status:
1 for a runtime failure, 2 for a usage or config error. Known failures are the daemon's
own errors (``qkdd.errors.QkddError``: a device the drivers refuse arrives as one of them
too) and what the operating system refuses (``OSError``), caught once, here.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from qkdd.config import ConfigError, check_files, config_warnings, load_config
from qkdd.errors import QkddError

if TYPE_CHECKING:
    from qkdd.config import SiteConfig

# What ends a command with its message instead of a traceback.
OPERATOR_ERRORS: tuple[type[Exception], ...] = (QkddError, OSError)


def package_version() -> str:
    """The installed qkdd version, as `--version` prints it."""
    try:
        return importlib.metadata.version("qkdd")
    except importlib.metadata.PackageNotFoundError:  # a source tree never installed
        return "unknown (not installed)"


class VersionAction(argparse.Action):
    """`--version` of `qkdd` and `qkdctl`, looking the version up only when asked (not on
    every run)."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs=0, help="print the version and exit")

    def __call__(self, parser: argparse.ArgumentParser, *args: object, **kwargs: object) -> None:
        print(f"{parser.prog} {package_version()}")
        parser.exit()


def stderr_is_journal(environ: dict[str, str] | None = None) -> bool:
    """True when stderr is the journal: systemd sets JOURNAL_STREAM to the "dev:inode" of
    the stream it connected, which a redirected stderr no longer matches."""
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    device, sep, inode = value.partition(":")
    if not sep or not (device.isdigit() and inode.isdigit()):
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):  # no stderr, or one without a file descriptor
        return False
    return (st.st_dev, st.st_ino) == (int(device), int(inode))


def _configure_logging(verbose: bool) -> None:
    # One event per line, level and logger name; journald stamps time and unit itself,
    # anywhere else the line carries its own ISO 8601 time (UTC offset included).
    stamp = "" if stderr_is_journal() else "%(asctime)s "
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format=stamp + "%(levelname)s %(name)s %(message)s",
        datefmt="%Y-%m-%dT%H:%M:%S%z",
        stream=sys.stderr,
    )


class StopSignals:
    """SIGTERM and SIGINT whenever the daemon's own signal receiver is not listening:
    while it starts (imports, self-test, opening the store) and once its receiver has
    closed during shutdown. A signal then is noted, never fatal, so a stop asked for while
    starting is honoured as soon as the daemon listens, and more signals while stopping
    cannot cut the clean stop short (exit status 0 after ``event=stopped``)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.first: signal.Signals | None = None

    def install(self) -> None:
        for signum in self.SIGNALS:
            signal.signal(signum, self._note)

    def requested(self) -> signal.Signals | None:
        """The first stop signal noted, if any."""
        return self.first

    def ignore_from_now_on(self) -> None:
        # The interpreter resets Python-level handlers to the default (fatal) action while
        # it exits; ignored signals stay ignored through that last stretch.
        for signum in self.SIGNALS:
            signal.signal(signum, signal.SIG_IGN)

    def _note(self, signum: int, frame: FrameType | None) -> None:
        if self.first is None:
            self.first = signal.Signals(signum)


def _cmd_run(args: argparse.Namespace) -> int:
    stop_signals = StopSignals()
    stop_signals.install()  # before the slow imports below: a stop is never fatal
    try:
        return _run_daemon(args, stop_signals)
    finally:
        stop_signals.ignore_from_now_on()


async def _until_stopped(
    run_daemon: Callable[..., Awaitable[None]], config: SiteConfig, stop_signals: StopSignals
) -> None:
    try:
        await run_daemon(config, stop_requested=stop_signals.requested)
    finally:
        # Ignored from here on, still inside trio.run: while Trio closes down, a signal
        # handled in Python would be written to Trio's already closed wake-up socket.
        stop_signals.ignore_from_now_on()


def _run_daemon(args: argparse.Namespace, stop_signals: StopSignals) -> int:
    import trio

    from qkdd.daemon import run_daemon

    _configure_logging(args.verbose)
    config = load_config(args.config)
    try:
        trio.run(_until_stopped, run_daemon, config, stop_signals)
    except BaseException as exc:  # noqa: BLE001 - unwrapped below, re-raised if unknown
        known = _first_known(exc, OPERATOR_ERRORS)
        if known is None:
            raise
        logging.getLogger("qkdd.daemon").error("event=failed reason=%r", _one_line(known))
        return _report(known)
    return 0


def _first_known(
    exc: BaseException, kinds: tuple[type[BaseException], ...]
) -> BaseException | None:
    """The first expected error in ``exc``, looking inside the groups nurseries raise."""
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _first_known(inner, kinds)
            if found is not None:
                return found
        return None
    return exc if isinstance(exc, kinds) else None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).splitlines()) or type(exc).__name__


def _report(exc: BaseException) -> int:
    """Print a known failure for the operator; the exit status it ends the command with."""
    if isinstance(exc, ConfigError):
        for problem in getattr(exc, "problems", (exc,)):
            print(f"qkdd: config error: {problem}", file=sys.stderr)
        return 2
    print(f"qkdd: {_one_line(exc)}", file=sys.stderr)
    return 1


def _cmd_keygen(args: argparse.Namespace) -> int:
    from qkdd.crypto.select import select_backend
    from qkdd.identity import (
        IdentityError,
        fingerprint,
        public_key_text,
        write_identity,
        write_key_encryption_key,
    )

    try:
        if args.kek:
            write_key_encryption_key(Path(args.kek), overwrite=args.force)
            print(
                f"# key-encryption key written to {args.kek} (mode 0600); point "
                "[store] key_encryption_key at it"
            )
            return 0
        out = Path(args.out)
        key = write_identity(out, select_backend(args.backend), overwrite=args.force)
    except IdentityError as exc:
        print(f"qkdd keygen: {exc}", file=sys.stderr)
        return 1
    public = public_key_text(key)
    pub_path = out.with_suffix(".pub")
    pub_path.write_text(public + "\n")
    print(f"# ML-DSA-65 identity written to {out} (mode 0600); public key also in {pub_path}")
    print(f"# fingerprint {fingerprint(key.public_bytes)}: compare it with the peer's operator")
    print("# put this line in the peer site's [[peers]] entry for this site:")
    print(f'public_key = "{public}"')
    return 0


def _cmd_allow_bootstrap(args: argparse.Namespace) -> int:
    import sqlite3

    from qkdd.daemon import STORE_FILE
    from qkdd.identity import IdentityError, read_key_encryption_key
    from qkdd.keystore import KeyStore, StoreError
    from qkdd.systemd import operator_credential_directories

    config = load_config(args.config)
    peer = args.peer
    if config.peer(peer) is None:
        known = ", ".join(p.site_id for p in config.peers) or "none"
        print(f"qkdd: {peer!r} is not a peer in {config.file} (peers: {known})", file=sys.stderr)
        return 2
    store_path = config.state_directory / STORE_FILE
    if not store_path.exists():
        # Never create one here: it would not be the daemon's (and, from root, not its user's).
        print(
            f"qkdd: there is no key store at {store_path}: the daemon creates it when it first "
            f"starts (check state_directory in {config.file})",
            file=sys.stderr,
        )
        return 1
    try:
        # Outside the service: read the credential where the unit's LoadCredential= does.
        kek = read_key_encryption_key(
            config.key_encryption_key, credential_directories=operator_credential_directories()
        )
        store = KeyStore(store_path, kek)
    except (IdentityError, StoreError) as exc:
        print(f"qkdd: {exc}", file=sys.stderr)
        return 1
    try:
        changed = store.revoke_bootstrap(peer) if args.revoke else store.allow_bootstrap(peer)
        chain = store.chain_established(peer)
    except sqlite3.Error as exc:  # e.g. the daemon held the store busy for too long
        print(f"qkdd: cannot update key store {store_path}: {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()
    if args.revoke:
        print(
            f"Withdrew the allowance of a new ML-DSA bootstrap with {peer}."
            if changed
            else f"No new ML-DSA bootstrap with {peer} was allowed; nothing changed."
        )
    else:
        print(
            (
                f"A new ML-DSA bootstrap with {peer} is now allowed at this site."
                if changed
                else f"A new ML-DSA bootstrap with {peer} was already allowed; nothing changed."
            )
            + " It only permits one: a PSK that still works stays in use, and the allowance"
            " ends when the next PSK is agreed. Unless the peer site lost its state, its"
            " operator must allow it too. Withdraw it with"
            f" `qkdd allow-bootstrap --config {args.config} {peer} --revoke`."
        )
    if not chain:
        print(f"(There is no PSK chain with {peer} yet: a first bootstrap needs no allowance.)")
    return 0


def _cmd_check_config(args: argparse.Namespace) -> int:
    from qkdd.link_device import device_setup_problems

    config = load_config(args.config)
    problems: list[QkddError] = [*check_files(config), *device_setup_problems(config)]
    for problem in problems:
        print(f"qkdd: config error: {problem}", file=sys.stderr)
    if problems:
        return 2
    for warning in config_warnings(config):
        print(f"qkdd: config warning: {warning}", file=sys.stderr)
    print(
        f"{config.file}: OK (site {config.site_id}, {len(config.direct_peers)} peer(s), "
        + (f"{len(config.remote_peers)} remote site(s), " if config.remote_peers else "")
        + f"{len(config.consumers)} consumer SAE(s))"
    )
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    if args.sites is not None:
        from qkdd.demo_network import run_network_demo

        if args.serve:
            print("qkdd demo: --serve runs the two-site demo only", file=sys.stderr)
            return 2
        return run_network_demo(args.sites, args.topology, number=args.keys, as_json=args.json)
    if args.topology != "line":
        print("qkdd demo: --topology needs --sites", file=sys.stderr)
        return 2
    from qkdd.demo import run_demo

    return run_demo(number=args.keys, as_json=args.json, serve=args.serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qkdd", description="Hybrid QKD + post-quantum key daemon."
    )
    parser.add_argument("--version", action=VersionAction)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the site daemon (the systemd service entry point)")
    run.add_argument("--config", required=True, help="site config file (TOML)")
    run.add_argument("--verbose", action="store_true", help="log debug events")
    run.set_defaults(func=_cmd_run)

    keygen = sub.add_parser(
        "keygen",
        help="write an ML-DSA-65 identity key and print its public key, or a key-encryption key",
    )
    which = keygen.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--out",
        help="identity key file to create (mode 0600); "
        "the public key goes next to it with the suffix .pub",
    )
    which.add_argument(
        "--kek", metavar="FILE", help="create a 32-byte key-encryption key file (mode 0600)"
    )
    keygen.add_argument("--force", action="store_true", help="overwrite an existing key file")
    keygen.add_argument("--backend", default="auto", choices=("auto", "oqs", "cryptography"))
    keygen.set_defaults(func=_cmd_keygen)

    allow = sub.add_parser(
        "allow-bootstrap",
        help="allow one new ML-DSA bootstrap with a peer whose PSK chain was lost",
    )
    allow.add_argument("--config", required=True, help="site config file (TOML)")
    allow.add_argument("peer", help="the peer's site ID")
    allow.add_argument(
        "--revoke", action="store_true", help="withdraw an allowance not used up yet"
    )
    allow.set_defaults(func=_cmd_allow_bootstrap)

    check = sub.add_parser("check-config", help="validate a config file without starting anything")
    check.add_argument("config")
    check.set_defaults(func=_cmd_check_config)

    demo = sub.add_parser("demo", help="run two sites and an emulated QKD link on this machine")
    demo.add_argument("--keys", type=int, default=8, help="keys to exchange (default 8)")
    demo.add_argument("--json", action="store_true", help="print one JSON object")
    demo.add_argument(
        "--serve", action="store_true", help="keep both sites running until interrupted"
    )
    demo.add_argument(
        "--sites",
        type=int,
        metavar="N",
        help="N sites (3-8) joined by QKD links; the two end sites get keys relayed "
        "through the others",
    )
    demo.add_argument(
        "--topology", choices=("line", "ring"), default="line", help="with --sites (default line)"
    )
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except OPERATOR_ERRORS as exc:
        return _report(exc)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
