"""A recording stand-in for wg(8), for tests: written into a directory that goes first on
PATH. A real `wg set` needs a WireGuard interface, which this project's CI containers
cannot create (no kernel module, no right to add links); tests that use it say so.
"""

from __future__ import annotations

import base64
import json
import os
import sys
from pathlib import Path

STANDIN = """\
#!{python} -IS
# A stand-in for wg(8) in tests: records argv and the key file it was given, checks the
# key the way wg does, and fails when a file named fail-INTERFACE exists.
import base64, binascii, json, os, sys

here = {here!r}
args = sys.argv[1:]
key = None
if "preshared-key" in args:
    with open(args[args.index("preshared-key") + 1]) as key_file:  # wg reads it by path
        key = key_file.read()
with open(os.path.join(here, "calls.jsonl"), "a") as log:
    log.write(json.dumps({{"argv": args, "key_file": key}}) + "\\n")
fail = os.path.join(here, "fail-" + (args[1] if len(args) > 1 else ""))
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
        return [
            base64.b64decode(str(call["key_file"]))
            for call in self.calls()
            if call["argv"][1] == interface  # type: ignore[index]
        ]

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
