"""The layering rule (README, "Layout"): the drivers (`qkdd_drivers`) import nothing of qkdd
but its light client, `qkdd.client`, whose HTTP client core the KME driver shares; so the
daemon's modules may import the drivers and never the reverse, and the drivers stay free of
whatever the daemon pulls in."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

from timeouts import timeout

DRIVERS = Path(__file__).resolve().parent.parent / "drivers"

LOADED = """
import importlib, json, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
print(json.dumps(sorted(m for m in sys.modules if m == "qkdd" or m.startswith("qkdd."))))
"""


def qkdd_modules_loaded_by(*modules: str) -> set[str]:
    done = subprocess.run(
        [sys.executable, "-c", LOADED, *modules],
        capture_output=True,
        text=True,
        timeout=timeout(60),
    )
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout))


def test_driver_modules_import_only_the_client_of_qkdd() -> None:
    named = []
    for path in sorted(DRIVERS.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            named += [
                (path.relative_to(DRIVERS).as_posix(), name)
                for name in names
                if (name == "qkdd" or name.startswith("qkdd."))
                and not name.startswith("qkdd.client")
            ]
    assert named == []


def test_the_drivers_load_no_more_of_qkdd_than_the_light_client() -> None:
    drivers = qkdd_modules_loaded_by(
        "qkdd_drivers", "qkdd_drivers.serial", "qkdd_drivers.kme", "qkdd_drivers.emulator"
    )
    client = qkdd_modules_loaded_by("qkdd.client")
    assert "qkdd.client.roundtrip" in drivers  # the KME driver's HTTP client core
    assert drivers <= client, sorted(drivers - client)
