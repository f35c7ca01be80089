"""The ``qkdd`` command: ``run`` (the service), ``keygen``, ``check-config`` and ``demo``.

Every known failure ends in one plain line on stderr and a non-zero exit status:
1 for a runtime failure, 2 for a usage or config error.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from qkdd.config import ConfigError, check_files, load_config


def _configure_logging(verbose: bool) -> None:
    # journald stamps time and unit itself: one event per line, level and logger name.
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )


def _cmd_run(args: argparse.Namespace) -> int:
    import trio

    from qkdd.crypto import CryptoError
    from qkdd.daemon import run_daemon
    from qkdd.etsi014.pool import KeyServiceError
    from qkdd.identity import IdentityError
    from qkdd.keystore import StoreError
    from qkdd.wireguard import WireGuardError

    _configure_logging(args.verbose)
    config = load_config(args.config)
    expected = (IdentityError, StoreError, CryptoError, KeyServiceError, WireGuardError, OSError)
    try:
        trio.run(run_daemon, config)
    except BaseException as exc:  # noqa: BLE001 - unwrapped below, re-raised if unknown
        known = _first_known(exc, expected)
        if known is None:
            raise
        logging.getLogger("qkdd.daemon").error("event=failed reason=%r", str(known))
        print(f"qkdd: {known}", file=sys.stderr)
        return 1
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
    from qkdd.daemon import STORE_FILE
    from qkdd.identity import IdentityError, read_key_encryption_key
    from qkdd.keystore import KeyStore, StoreError

    config = load_config(args.config)
    if config.peer(args.peer) is None:
        known = ", ".join(p.site_id for p in config.peers) or "none"
        print(
            f"qkdd: {args.peer!r} is not a peer in {config.file} (peers: {known})", file=sys.stderr
        )
        return 2
    try:
        kek = read_key_encryption_key(config.key_encryption_key)
        store = KeyStore(config.state_directory / STORE_FILE, kek)
    except (IdentityError, StoreError) as exc:
        print(f"qkdd: {exc}", file=sys.stderr)
        return 1
    try:
        store.allow_bootstrap(args.peer)
    finally:
        store.close()
    print(
        f"A new ML-DSA bootstrap with {args.peer} is allowed: the next handshake uses signatures "
        "instead of the PSK chain, and the allowance ends once a new PSK is agreed. Do the same "
        "on the peer site."
    )
    return 0


def _cmd_check_config(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    problems = check_files(config)
    for problem in problems:
        print(f"qkdd: config error: {problem}", file=sys.stderr)
    if problems:
        return 2
    print(
        f"{config.file}: OK (site {config.site_id}, {len(config.peers)} peer(s), "
        f"{len(config.consumers)} consumer SAE(s))"
    )
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from qkdd.demo import run_demo

    return run_demo(number=args.keys, as_json=args.json, serve=args.serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qkdd", description="Hybrid QKD + post-quantum key daemon."
    )
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
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"qkdd: config error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
