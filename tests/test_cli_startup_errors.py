"""`qkdd run` failing at start ends in one plain line on stderr, never a traceback; its log
lines carry a timestamp unless stderr is the journal (which stamps them itself); and both
commands print their version."""

from __future__ import annotations

import base64
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from timeouts import timeout

from qkdd.crypto.select import select_backend
from qkdd.demo_sites import SITE_A, SITE_B, render
from qkdd.identity import write_identity, write_key_encryption_key

QKDD = [sys.executable, "-m", "qkdd.cli"]
ISO_TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d")


@pytest.fixture
def site_a(tmp_path: Path) -> Path:
    """Site A's demo config with its secret files, ready for `qkdd run`."""
    backend = select_backend("auto")
    for site in (SITE_A, SITE_B):
        (tmp_path / site.directory).mkdir()
        key = write_identity(tmp_path / site.directory / "identity.key", backend)
        (tmp_path / site.directory / "identity.pub").write_text(
            base64.b64encode(key.public_bytes).decode()
        )
        write_key_encryption_key(tmp_path / site.directory / "kek.bin")
        (tmp_path / f"{site.site_id}.toml").write_text(render(site))
    return tmp_path / "site-a.toml"


def run_qkdd(
    config: Path, env: dict[str, str], stderr_file: Path, listen_fds: str | None = None
) -> tuple[int, str]:
    """`qkdd run` as a real subprocess; LISTEN_PID is the daemon's own pid, as systemd sets it."""
    command = " ".join(QKDD) + f" run --config {config}"
    if listen_fds is not None:
        command = f"LISTEN_PID=$$ LISTEN_FDS={listen_fds} exec {command}"
    else:
        command = f"exec {command}"
    with open(stderr_file, "wb") as stderr:
        proc = subprocess.run(
            ["sh", "-c", command],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            timeout=timeout(120),
        )
    return proc.returncode, stderr_file.read_text()


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "JOURNAL_"))}
    env.pop("NOTIFY_SOCKET", None)
    return env


def test_malformed_listen_fds_ends_in_one_line_with_a_timestamped_log(
    site_a: Path, tmp_path: Path
) -> None:
    status, err = run_qkdd(site_a, clean_env(), tmp_path / "err.txt", listen_fds="notanumber")
    assert status == 1, err
    assert "Traceback" not in err
    plain = [line for line in err.splitlines() if line.startswith("qkdd: ")]
    assert len(plain) == 1 and "LISTEN_FDS" in plain[0], err
    failed = [line for line in err.splitlines() if "event=failed" in line]
    assert failed and ISO_TIMESTAMP.match(failed[0]), err


def test_log_lines_carry_no_timestamp_when_stderr_is_the_journal(
    site_a: Path, tmp_path: Path
) -> None:
    err_file = tmp_path / "journal.txt"
    err_file.touch()
    st = os.stat(err_file)
    env = clean_env() | {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
    status, err = run_qkdd(site_a, env, err_file, listen_fds="notanumber")
    assert status == 1, err
    failed = [line for line in err.splitlines() if "event=failed" in line]
    assert failed and failed[0].startswith("ERROR qkdd.daemon "), err


def test_non_pem_kme_certificate_ends_in_one_line(site_a: Path, tmp_path: Path) -> None:
    (tmp_path / "kme.pem").write_text("this is not a certificate\n")
    text = site_a.read_text()
    start = text.index("[peers.device]")
    end = text.index("\n\n", start) if "\n\n" in text[start:] else len(text)
    device = (
        "[peers.device]\n"
        'kind = "etsi014"\n'
        'url = "https://127.0.0.1:9/"\n'
        'certificate = "kme.pem"\n'
        'own_sae_id = "qkdd-a"\n'
        'peer_sae_id = "qkdd-b"\n'
    )
    site_a.write_text(text[:start] + device + text[end:])
    status, err = run_qkdd(site_a, clean_env(), tmp_path / "err.txt")
    assert status == 1, err
    assert "Traceback" not in err
    plain = [line for line in err.splitlines() if line.startswith("qkdd: ")]
    assert len(plain) == 1 and "kme.pem" in plain[0], err


@pytest.mark.parametrize("module", ["qkdd.cli", "qkdd.ctl"])
def test_version(module: str) -> None:
    from importlib.metadata import version

    proc = subprocess.run(
        [sys.executable, "-m", module, "--version"],
        capture_output=True,
        text=True,
        timeout=timeout(60),
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith(version("qkdd")), proc.stdout
