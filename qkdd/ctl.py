"""`qkdctl`: ask the key service for its status and for keys, from a shell.

Talks to the local Unix socket (`--socket`), or to the HTTPS listener (`--url https://host:port`
with a client certificate `--cert`, its key `--key` and the service's CA `--cacert`). Prints the
standard's JSON objects (Status, Key container) so the output can be piped to other tools.
`qkdctl status` without an SAE ID shows the site itself (links, QKD devices, key pools, recent
errors) for a person, or as JSON with `--json`; `qkdctl metrics` prints the Prometheus metrics.
Those two are served on the local socket only, to any user the socket admits.
`qkdctl send` / `recv` / `ack` move secure messages to and from SAEs at other sites, and
`qkdctl events` follows key events (local socket only). Exit codes: 0 success, 1 the
service refused or could not be reached, 2 usage error, 3 `recv` found no message in time.

It talks through the light client (`qkdd.client`) and imports nothing else of the daemon, so
it runs where only the client is installed.
"""

from __future__ import annotations

import argparse
import base64
import importlib.metadata
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from qkdd.client import (
    BlockingKeyClient,
    ClientError,
    DeliveredKey,
    KeyServiceClientError,
    Message,
)

DEFAULT_SOCKET = "/run/qkdd/api.sock"
SOCKET_ENV = "QKDD_SOCKET"


class _VersionAction(argparse.Action):
    """`--version`, looking the version up only when asked."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs=0, help="print the version and exit")

    def __call__(self, parser: argparse.ArgumentParser, *args: object, **kwargs: object) -> None:
        try:
            version = importlib.metadata.version("qkdd")
        except importlib.metadata.PackageNotFoundError:  # a source tree never installed
            version = "unknown (not installed)"
        print(f"{parser.prog} {version}")
        parser.exit()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qkdctl",
        description="Query the local ETSI GS QKD 014 key service, or the site's own status.",
        epilog="`status` without an SAE ID and `metrics` are served on the local socket only, "
        "to any user the socket admits (its mode and group are the gate).",
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--socket",
        default=os.environ.get(SOCKET_ENV, DEFAULT_SOCKET),
        help=f"API socket path (default: ${SOCKET_ENV} or {DEFAULT_SOCKET})",
    )
    where.add_argument("--url", help="the HTTPS API instead of the socket: https://HOST:PORT")
    parser.add_argument("--cert", help="with --url: client certificate (PEM)")
    parser.add_argument("--key", help="with --url: its private key (PEM; default: in --cert)")
    parser.add_argument(
        "--cacert", help="with --url: CA certificates to trust (PEM; default: the system's)"
    )
    parser.add_argument("--sae-id", help="act as this SAE when the user may act as several")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds (default: 10)")
    parser.add_argument("--compact", action="store_true", help="one-line JSON output")
    parser.add_argument("--version", action=_VersionAction)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    status = commands.add_parser(
        "status",
        help="the site's status; with SLAVE_SAE_ID, the ETSI key pool status towards it",
        description="Without SLAVE_SAE_ID: this site's links, QKD devices, key pools and "
        "recent errors (--json for the raw object). With SLAVE_SAE_ID: the ETSI GS QKD 014 "
        "Status object of the pool from this SAE to that slave SAE.",
    )
    status.add_argument("slave_sae_id", metavar="SLAVE_SAE_ID", nargs="?")
    status.add_argument(
        "--json", action="store_true", help="the site status as JSON instead of for a person"
    )

    enc = commands.add_parser("enc-keys", help="get new keys, as master, for a slave SAE")
    enc.add_argument("slave_sae_id", metavar="SLAVE_SAE_ID")
    enc.add_argument("--number", type=_positive_int, default=1, help="keys to get (default: 1)")
    enc.add_argument("--size", type=_positive_int, help="key size in bits (default: the KME's)")
    enc.add_argument(
        "--additional-slave",
        metavar="SAE_ID",
        action="append",
        default=[],
        help="another slave SAE that may collect the same keys (repeatable)",
    )

    dec = commands.add_parser("dec-keys", help="collect, as slave, keys a master SAE got")
    dec.add_argument("master_sae_id", metavar="MASTER_SAE_ID")
    dec.add_argument("key_ids", metavar="KEY_ID", nargs="+")

    commands.add_parser("metrics", help="the daemon's Prometheus metrics (text format)")

    send = commands.add_parser(
        "send",
        help="send a message to an SAE at another site",
        description="Sends the message (from --text, --file, or standard input) and prints its "
        "message ID once the recipient's site has stored it. After a failure, send again with "
        "the same --message-id: the message is kept once.",
    )
    send.add_argument("recipient", metavar="RECIPIENT_SAE_ID")
    body = send.add_mutually_exclusive_group()
    body.add_argument("--text", help="the message, as UTF-8 text")
    body.add_argument("--file", help="read the message from this file ('-': standard input)")
    send.add_argument("--message-id", help="a UUID to send under (default: a new one)")
    send.add_argument(
        "--otp",
        action="store_true",
        help="protect it with a one-time pad of QKD material (default: a hybrid key)",
    )

    recv = commands.add_parser(
        "recv",
        help="receive messages for this SAE",
        description="Prints the oldest unacknowledged message as JSON (body in base64), or "
        "with --raw writes its body alone. Exits 3 if none arrives within --wait.",
    )
    recv.add_argument("--wait", type=float, default=0.0, help="seconds to wait (default: 0)")
    recv.add_argument("--ack", action="store_true", help="acknowledge (erase) what was printed")
    recv.add_argument("--raw", action="store_true", help="write the body bytes, not JSON")
    recv.add_argument(
        "--follow", action="store_true", help="keep printing messages as they arrive (JSON lines)"
    )

    ack = commands.add_parser("ack", help="acknowledge (erase) a received message")
    ack.add_argument("message_id", metavar="MESSAGE_ID")

    events = commands.add_parser(
        "events",
        help="follow key events for this SAE (JSON lines, until interrupted)",
        description="Prints each key event for this SAE as a JSON line: keys_available, "
        "pool_low, keys_expired, keys_withdrawn, link_down, link_up, events_lost.",
    )
    events.add_argument(
        "--kind", action="append", default=[], help="only events of this kind (repeatable)"
    )
    events.add_argument(
        "--count", type=_positive_int, help="stop after this many events (default: never)"
    )
    return parser


def _site_level(args: argparse.Namespace) -> bool:
    """The command is served on the local socket only: the site itself, or messages."""
    return args.command in ("metrics", "send", "recv", "ack", "events") or (
        args.command == "status" and args.slave_sae_id is None
    )


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def _key_container(keys: Sequence[DeliveredKey]) -> dict[str, Any]:
    return {
        "keys": [
            {"key_ID": key.key_id, "key": base64.b64encode(key.material).decode("ascii")}
            for key in keys
        ]
    }


def _https_address(url: str) -> tuple[str, int]:
    """HOST and PORT of an https://HOST[:PORT] URL; ValueError with the reason otherwise."""
    parts = urlsplit(url)
    if parts.scheme != "https":
        raise ValueError(f"--url {url!r} must start with https://")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise ValueError(f"--url {url!r} must be just https://HOST:PORT (the API paths are fixed)")
    if not parts.hostname:
        raise ValueError(f"--url {url!r} has no host")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"--url {url!r} has an invalid port") from None
    return parts.hostname, port or 443


def _client(parser: argparse.ArgumentParser, args: argparse.Namespace) -> BlockingKeyClient:
    """The client `args` ask for; exits through `parser.error` on a usage error."""
    if args.url is None:
        tls_only = [f"--{name}" for name in ("cert", "key", "cacert") if getattr(args, name)]
        if tls_only:
            parser.error(f"{', '.join(tls_only)} only apply with --url")
        return BlockingKeyClient(args.socket, sae_id=args.sae_id, timeout=args.timeout)
    try:
        host, port = _https_address(args.url)
    except ValueError as exc:
        parser.error(str(exc))
    if not args.cert:
        parser.error(
            "--url needs --cert: the key service identifies SAEs by their client certificate"
        )
    return BlockingKeyClient.tls(
        host,
        port,
        cert_file=args.cert,
        key_file=args.key,
        ca_file=args.cacert,
        sae_id=args.sae_id,
        timeout=args.timeout,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors, 0 on --help
        return exc.code if isinstance(exc.code, int) else 2

    try:
        if args.url is not None and _site_level(args):
            parser.error(
                f"`qkdctl {args.command}` is served on the local socket only; use --socket"
            )
        client = _client(parser, args)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    except ClientError as exc:  # e.g. an unreadable certificate
        print(f"qkdctl: {exc}", file=sys.stderr)
        return 1
    try:
        with client:
            if args.command == "metrics":
                sys.stdout.write(client.metrics())
                return 0
            if args.command == "status" and args.slave_sae_id is None:
                site = client.site_status()
                if not args.json:
                    sys.stdout.write(render_site_status(site))
                    return 0
                result: dict[str, Any] = site
            elif args.command == "status":
                result = client.status(args.slave_sae_id)
            elif args.command == "enc-keys":
                result = _key_container(
                    client.enc_keys(
                        args.slave_sae_id,
                        number=args.number,
                        size=args.size,
                        additional_slave_sae_ids=args.additional_slave,
                    )
                )
            elif args.command == "dec-keys":
                result = _key_container(client.dec_keys(args.master_sae_id, args.key_ids))
            elif args.command == "send":
                message = _message_body(parser, args)
                result = {
                    "message_ID": client.send_message(
                        args.recipient,
                        message,
                        message_id=args.message_id,
                        protection="otp" if args.otp else "hybrid",
                    )
                }
            elif args.command == "events":
                for n, event in enumerate(client.events(args.kind), 1):
                    print(json.dumps(event, separators=(",", ":")), flush=True)
                    if n == args.count:
                        break
                return 0
            elif args.command == "ack":
                client.acknowledge_message(args.message_id)
                result = {"acknowledged": args.message_id}
            else:
                return _receive(client, args)
    except KeyServiceClientError as exc:
        print(f"qkdctl: the key service refused ({exc.status}): {exc.message}", file=sys.stderr)
        for detail in exc.details:
            print(f"  {json.dumps(detail)}", file=sys.stderr)
        return 1
    except ClientError as exc:
        print(f"qkdctl: {exc}", file=sys.stderr)
        return 1

    print(
        json.dumps(
            result,
            separators=(",", ":") if args.compact else None,
            indent=None if args.compact else 2,
        )
    )
    return 0


def _message_body(parser: argparse.ArgumentParser, args: argparse.Namespace) -> bytes:
    if args.text is not None:
        return str(args.text).encode()
    if args.file in (None, "-"):
        return sys.stdin.buffer.read()
    try:
        with open(args.file, "rb") as handle:
            return handle.read()
    except OSError as exc:
        parser.error(f"cannot read --file {args.file}: {exc.strerror or exc}")


def _message_json(message: Message) -> dict[str, Any]:
    return {
        "message_ID": message.message_id,
        "seq": message.seq,
        "sender_SAE_ID": message.sender_sae_id,
        "sender_site_ID": message.sender_site_id,
        "protection": message.protection,
        "received_at": message.received_at,
        "body": base64.b64encode(message.body).decode("ascii"),
    }


def _receive(client: BlockingKeyClient, args: argparse.Namespace) -> int:
    def show(message: Message) -> None:
        if args.raw:
            sys.stdout.buffer.write(message.body)
            sys.stdout.buffer.flush()
        else:
            print(json.dumps(_message_json(message), separators=(",", ":")), flush=True)

    if args.follow:
        for message in client.messages():
            show(message)
            if args.ack:
                # The stream holds its own connection; the call uses the client's.
                client.acknowledge_message(message.message_id)
        return 0
    found = client.receive_message(wait=args.wait)
    if found is None:
        print(f"qkdctl: no message within {args.wait:g} s", file=sys.stderr)
        return 3
    show(found)
    if args.ack:
        client.acknowledge_message(found.message_id)
    return 0


def _when(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def _rate(bits_per_second: float) -> str:
    for unit, scale in (("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bits_per_second >= scale:
            return f"{bits_per_second / scale:.2f} {unit}"
    return f"{bits_per_second:.0f} bit/s"


def _device_lines(device: dict[str, Any]) -> list[str]:
    lines = [f"  QKD device    {device['state']}: {device['detail']}"]
    figures = []
    if device.get("qber") is not None:
        figures.append(f"QBER {device['qber'] * 100:.2f} %")
    if device.get("secret_key_rate_bps") is not None:
        figures.append(f"secret key rate {_rate(device['secret_key_rate_bps'])}")
    figures.append(f"{device['keys_received']} keys received")
    if device.get("keys_buffered") is not None:
        figures.append(f"{device['keys_buffered']} in the device's buffer")
    lines.append(f"                {', '.join(figures)}")
    return lines


def _binding_line(binding: dict[str, Any]) -> str:
    """One WireGuard binding: where, its PSK's state and age, and what went wrong last."""
    line = (
        f"  {binding['binding']:<14} {binding['interface']} <-> {binding['peer_site']} "
        f"({binding['role']}): {binding['state']}"
    )
    if binding.get("last_fresh_install") is not None:
        line += f", fresh PSK installed {_when(binding['last_fresh_install'])}"
    if binding.get("consecutive_failures"):
        line += f", {binding['consecutive_failures']} failed attempts"
        if binding.get("last_error"):
            line += f"; last error: {binding['last_error']}"
    return line


def _psk_chain(peer: dict[str, Any]) -> str:
    if not peer["psk_chain_established"]:
        return "not yet (bootstrap allowed)"
    if peer.get("bootstrap_allowed"):
        return "established; a new bootstrap is allowed by the operator"
    return "established"


def render_site_status(site: dict[str, Any]) -> str:
    """The site status object (``GET /qkdd/v1/status``) as text for a person."""
    lines = [f"site {site['site_id']}   backend {site['backend']}   at {_when(site['time'])}"]
    if not site["peers"]:
        lines.append("no peers configured")
    for peer_id, peer in site["peers"].items():
        session = f"{peer['session']}, {peer['sessions_established']} established so far"
        if peer["session"] != "up" and peer.get("last_error"):
            session += f"; last error: {peer['last_error']}"
        lines += [
            "",
            f"peer {peer_id} (this site is the link {peer['role']})",
            f"  session       {session}",
            f"  PSK chain     {_psk_chain(peer)}",
            *_device_lines(peer["device"]),
            f"  QKD keys      {peer['qkd_keys_buffered']} buffered here",
            f"  key pools     (kept at {peer['pool_size']} keys per pair)",
        ]
        for pool in peer["pools"]:
            pair = f"{pool['master_SAE_ID']} -> {pool['slave_SAE_ID']}"
            lines.append(f"    {pair:<30} {pool['ready']:>6} ready  ({pool['taken_with']} here)")
        reason = peer.get("keys_unavailable_because")
        lines.append(f"  new keys      {'not being made: ' + reason if reason else 'being made'}")
    bindings = site.get("wireguard") or []
    if bindings:
        lines += ["", "WireGuard PSKs"]
    for binding in bindings:
        lines.append(_binding_line(binding))
    quarantined = site.get("store_rows_quarantined")
    if quarantined:
        lines += [
            "",
            f"key store     {quarantined} sealed rows did not open and were set aside "
            "(see row_quarantined in the log)",
        ]
    lines += ["", "recent errors (oldest first)"]
    errors = site["recent_errors"]
    if not errors:
        lines.append("  none")
    for event in errors:
        lines.append(
            f"  {_when(event['time'])} {event['level']} {event['logger']}: {event['message']}"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
