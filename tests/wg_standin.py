"""Helpers for the WireGuard tests: a recording stand-in for wg(8), and the two demo sites'
[[wireguard]] bindings.

The stand-in is written into a directory that goes first on PATH. A real `wg set` needs a
WireGuard interface (the kernel module, or wireguard-go and /dev/net/tun, and the right to
add links); tests that use the stand-in say so, and tests/test_wireguard_real.py runs the
real tools where the machine allows.
"""

from __future__ import annotations

import base64
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

from rotation_helpers import bind_demo_sites

STANDIN = """\
#!{python} -IS
# A stand-in for wg(8) in tests: records argv and the key file it was given, checks the
# key the way wg does, keeps each interface's peers in state-INTERFACE.json for `wg set`,
# `wg show IF dump` and `wg show IF preshared-keys`, and fails when a file named
# fail-INTERFACE exists.
import base64, binascii, json, os, sys

here = {here!r}
args = sys.argv[1:]
key = None
if "preshared-key" in args:
    with open(args[args.index("preshared-key") + 1]) as key_file:  # wg reads it by path
        key = key_file.read()
with open(os.path.join(here, "calls.jsonl"), "a") as log:
    log.write(json.dumps({{"argv": args, "key_file": key}}) + "\\n")
interface = args[1] if len(args) > 1 else ""
fail = os.path.join(here, "fail-" + interface)
if os.path.exists(fail):
    with open(fail) as message:
        sys.stderr.write(message.read().replace("{{key}}", (key or "").strip()))
    sys.exit(3)
if key is not None:
    try:
        ok = len(base64.b64decode(key.strip(), validate=True)) == 32
    except binascii.Error:
        ok = False
    if not ok:
        sys.stderr.write("Key is not the correct length or format: `%s'\\n" % key.strip())
        sys.exit(1)
state_file = os.path.join(here, "state-" + interface + ".json")
peers = json.load(open(state_file)) if os.path.exists(state_file) else {{}}
if args[:1] == ["show"]:
    if args[2:] == ["dump"]:
        print("(private)\\t(public)\\t51820\\toff")
    for pub, peer in peers.items():
        psk = peer.get("psk", "(none)")
        if args[2:] == ["dump"]:
            print("\\t".join([pub, psk, peer.get("endpoint", "(none)"),
                              peer.get("allowed-ips", "(none)"), "0", "0", "0",
                              peer.get("persistent-keepalive", "off")]))
        else:
            print(pub + "\\t" + psk)
    sys.exit(0)
peer = None
rest = args[2:]
while rest:
    if rest[0] == "peer":
        peer = peers.setdefault(rest[1], {{}})
        current, rest = rest[1], rest[2:]
    elif rest[0] == "remove":
        del peers[current]
        peer, rest = None, rest[1:]
    elif rest[0] == "preshared-key":
        peer["psk"], rest = key.strip(), rest[2:]
    else:
        peer[rest[0]], rest = rest[1], rest[2:]
with open(state_file, "w") as state:
    json.dump(peers, state)
"""


class StandinWg:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def calls(self) -> list[dict[str, object]]:
        log = self.directory / "calls.jsonl"
        if not log.exists():
            return []
        return [json.loads(line) for line in log.read_text().splitlines()]

    def installed(self, interface: str) -> list[bytes]:
        """Every PSK set on ``interface``, in order."""
        return [
            base64.b64decode(str(call["key_file"]))
            for call in self.calls()
            if call["argv"][1] == interface and call["key_file"] is not None  # type: ignore[index]
        ]

    def peers(self, interface: str) -> dict[str, dict[str, str]]:
        """The interface's peers as `wg set` left them: public key -> settings."""
        state = self.directory / f"state-{interface}.json"
        return json.loads(state.read_text()) if state.exists() else {}

    def fail(self, interface: str, stderr: str) -> None:
        (self.directory / f"fail-{interface}").write_text(stderr)

    def recover(self, interface: str) -> None:
        (self.directory / f"fail-{interface}").unlink()


def install_standin(directory: Path) -> StandinWg:
    """Write the stand-in as ``directory/wg``; the caller puts ``directory`` first on PATH."""
    directory.mkdir(parents=True, exist_ok=True)
    script = directory / "wg"
    script.write_text(STANDIN.format(python=sys.executable, here=str(directory)))
    script.chmod(0o755)
    return StandinWg(directory)


def path_with(directory: Path) -> str:
    return f"{directory}{os.pathsep}{os.environ.get('PATH', '')}"


def wireguard_bindings(
    interfaces: tuple[str, str],
    public_keys: tuple[str, str],
    *,
    wg_command: str | None = None,
    interval: float = 1,
    max_key_age: float = 4,
    startup_timeout: float = 20,
) -> Callable[[Path], None]:
    """A ``tamper`` for ``qkdd.demo.running_demo`` that gives the two demo sites one
    WireGuard binding "tunnel-a-b": site A's end is ``interfaces[0]`` with WireGuard key
    ``public_keys[0]``, site B's the second; each site gets the binding's SAE as a consumer
    and the other's as a remote SAE."""

    def tamper(directory: Path) -> None:
        command = f'wg_command = "{wg_command}"\n' if wg_command else ""
        timers = f"interval = {interval}\nmax_key_age = {max_key_age}\n"
        timers += f"startup_timeout = {startup_timeout}\n{command}"
        fields = tuple(
            f'interface = "{interfaces[i]}"\npeer_public_key = "{public_keys[1 - i]}"\n{timers}'
            for i in (0, 1)
        )
        bind_demo_sites(directory, "wireguard", ("wg-a", "wg-b"), (fields[0], fields[1]))

    return tamper
