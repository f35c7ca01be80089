"""``qkdd demo`` works from any directory, also one holding a folder named ``qkdd`` (its
daemons must run the installed package, not whatever the working directory holds)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from timeouts import timeout

QKDD = Path(sys.executable).parent / "qkdd"


@pytest.mark.skipif(not QKDD.exists(), reason="the qkdd entry point is not installed here")
def test_demo_from_a_directory_with_a_qkdd_folder(tmp_path: Path) -> None:
    decoy = tmp_path / "qkdd"
    decoy.mkdir()
    (decoy / "__init__.py").write_text("raise SystemExit('the working directory was imported')\n")
    shutil.copy(decoy / "__init__.py", decoy / "__main__.py")
    proc = subprocess.run(
        [str(QKDD), "demo", "--json"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=timeout(120),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["all_match"] is True
