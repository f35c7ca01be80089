"""One API socket path everywhere on a site host: qkdctl's default, the socket unit's
ListenStream= and the example site config."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from qkdd.ctl import DEFAULT_SOCKET

ROOT = Path(__file__).resolve().parent.parent


def test_qkdctl_default_is_where_the_units_and_example_config_put_the_socket() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read(ROOT / "systemd" / "qkdd.socket")
    assert unit["Socket"]["ListenStream"] == DEFAULT_SOCKET
    example = tomllib.loads((ROOT / "config" / "site-host.example.toml").read_text())
    assert example["api"]["socket"] == DEFAULT_SOCKET


def test_docs_name_no_other_socket_path() -> None:
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for line in doc.read_text().splitlines():
            if "/run/qkdd/" in line and ".sock" in line:
                assert DEFAULT_SOCKET in line, f"{doc.name}: {line.strip()}"


TMPFILES = shutil.which("systemd-tmpfiles")
SYSUSERS = shutil.which("systemd-sysusers")


@pytest.mark.skipif(
    TMPFILES is None or SYSUSERS is None, reason="systemd-tmpfiles/-sysusers missing"
)
def test_tmpfiles_make_the_socket_directory_so_a_config_checks_before_first_start(
    tmp_path: Path,
) -> None:
    """README step 2 (tmpfiles) comes before step 5 (check-config), which needs the
    socket's directory to exist although qkdd.socket has not started yet."""
    assert TMPFILES is not None and SYSUSERS is not None
    (tmp_path / "etc").mkdir()
    for command in (
        [SYSUSERS, f"--root={tmp_path}", str(ROOT / "systemd/qkdd.sysusers.conf")],
        [TMPFILES, f"--root={tmp_path}", "--create", str(ROOT / "systemd/qkdd.tmpfiles.conf")],
    ):
        proc = subprocess.run(command, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
    directory = tmp_path / Path(DEFAULT_SOCKET).parent.relative_to("/")
    assert directory.is_dir()
    assert directory.stat().st_mode & 0o777 == 0o755
