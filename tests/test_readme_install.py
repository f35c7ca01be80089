"""The README's "Install on a site host" puts on the host every program the shipped units
run: each entry point an ``ExecStart=`` names under /usr/bin is linked there."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_entry_point_a_unit_runs_is_installed_by_the_readme() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    readme = (ROOT / "README.md").read_text()
    named = set()
    for unit in (ROOT / "systemd").glob("*.service"):
        for line in unit.read_text().splitlines():
            if line.startswith(("ExecStart=", "ExecReload=", "ExecStartPre=")):
                named.update(re.findall(r"/usr/bin/([\w-]+)", line))
    ours = named & set(scripts)
    assert {"qkdd", "qkd-emulator"} <= ours
    for program in sorted(ours):
        assert f"ln -s /opt/qkdd/bin/{program} /usr/bin/{program}" in readme, program
