"""`qkdd run` and `qkdd check-config` failing at start end in one plain line on stderr that
names the file, key or variable at fault, never a traceback; the daemon's log lines carry a
timestamp unless stderr is the journal (which stamps them itself); and both commands print
their version."""

from __future__ import annotations

import base64
import os
import re
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pki
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


# Execs the command in its argv[2:] with fd argv[1] as its fd 3, and LISTEN_PID its own pid.
WITH_FD3 = (
    "import os, sys; os.dup2(int(sys.argv[1]), 3); "
    "os.environ['LISTEN_PID'] = str(os.getpid()); os.execv(sys.argv[2], sys.argv[2:])"
)


def run_qkdd(
    config: Path,
    env: dict[str, str],
    stderr_file: Path,
    listen_fds: str | None = None,
    fd3: socket.socket | None = None,
) -> tuple[int, str]:
    """`qkdd run` as a real subprocess; LISTEN_PID is the daemon's own pid, as systemd sets it,
    and `fd3` becomes its fd 3, where systemd puts the first socket it passes."""
    command = " ".join(QKDD) + f" run --config {config}"
    if fd3 is not None:
        assert listen_fds is not None
        argv = [sys.executable, "-c", WITH_FD3, str(fd3.fileno()), *QKDD, "run"]
        argv += ["--config", str(config)]
        env = env | {"LISTEN_FDS": listen_fds}
    elif listen_fds is not None:
        argv = ["sh", "-c", f"LISTEN_PID=$$ LISTEN_FDS={listen_fds} exec {command}"]
    else:
        argv = ["sh", "-c", f"exec {command}"]
    with open(stderr_file, "wb") as stderr:
        proc = subprocess.run(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            pass_fds=() if fd3 is None else (fd3.fileno(),),
            timeout=timeout(120),
        )
    return proc.returncode, stderr_file.read_text()


def check_config(config: Path) -> tuple[int, str]:
    """`qkdd check-config` as a real subprocess."""
    proc = subprocess.run(
        [*QKDD, "check-config", str(config)],
        env=clean_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout(120),
    )
    return proc.returncode, proc.stderr


def one_plain_line(err: str) -> str:
    """The one `qkdd: ` line a failure prints, after checking there is no traceback."""
    assert "Traceback" not in err, err
    plain = [line for line in err.splitlines() if line.startswith("qkdd: ")]
    assert len(plain) == 1, err
    return plain[0]


def with_kme_device(config: Path, *lines: str) -> None:
    """Give the config's peer a KME (kind "etsi014") with these settings for its device."""
    text = config.read_text()
    start = text.index("[peers.device]")
    end = text.index("\n\n", start) if "\n\n" in text[start:] else len(text)
    device = "\n".join(["[peers.device]", 'kind = "etsi014"', *lines]) + "\n"
    config.write_text(text[:start] + device + text[end:])


def kme_client(directory: Path) -> list[str]:
    """The device settings of a KME client with a real certificate and key."""
    client = pki.write(directory, "kme-client", *pki.issue(pki.new_ca("KME CA"), "qkdd-a"))
    return [f'certificate = "{client.cert}"', f'private_key = "{client.key}"']


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
    with_kme_device(
        site_a,
        'url = "https://127.0.0.1:9/"',
        'certificate = "kme.pem"',
        'own_sae_id = "qkdd-a"',
        'peer_sae_id = "qkdd-b"',
    )
    status, err = run_qkdd(site_a, clean_env(), tmp_path / "err.txt")
    assert status == 1, err
    line = one_plain_line(err)
    assert "kme.pem" in line and "peers[0].device" in line, err


# -- socket activation that does not match what was passed --------------------------------


@pytest.mark.parametrize(
    "kind",
    [
        (socket.AF_INET, socket.SOCK_DGRAM),  # a ListenDatagram= socket
        (socket.AF_UNIX, socket.SOCK_STREAM),  # a stream socket nobody listens on
    ],
    ids=["datagram", "not-listening"],
)
def test_listen_fds_naming_a_socket_that_does_not_listen_ends_in_one_line(
    site_a: Path, tmp_path: Path, kind: tuple[int, int]
) -> None:
    with socket.socket(*kind) as passed:
        status, err = run_qkdd(
            site_a, clean_env(), tmp_path / "err.txt", listen_fds="1", fd3=passed
        )
    assert status == 1, err
    line = one_plain_line(err)
    assert "LISTEN_FDS=1" in line and "fd 3" in line and "ListenStream=" in line, err


def test_listen_fds_counting_more_sockets_than_passed_ends_in_one_line(
    site_a: Path, tmp_path: Path
) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as passed:
        passed.bind(str(tmp_path / "api.sock"))
        passed.listen()
        status, err = run_qkdd(
            site_a, clean_env(), tmp_path / "err.txt", listen_fds="2", fd3=passed
        )
    assert status == 1, err
    assert "fd 4" in one_plain_line(err), err


# -- a KME device the driver cannot use ---------------------------------------------------


def test_kme_device_naming_this_site_as_its_own_peer_is_a_config_error(
    site_a: Path, tmp_path: Path
) -> None:
    with_kme_device(
        site_a,
        'url = "https://127.0.0.1:9/"',
        *kme_client(tmp_path),
        'own_sae_id = "qkdd-a"',
        'peer_sae_id = "qkdd-a"',
    )
    status, err = run_qkdd(site_a, clean_env(), tmp_path / "err.txt")
    assert status == 2, err
    line = one_plain_line(err)
    assert str(site_a) in line and "peers[0].device.peer_sae_id" in line, err
    assert "not own_sae_id" in line, err
    status, err = check_config(site_a)
    assert status == 2, err
    assert "peers[0].device.peer_sae_id" in one_plain_line(err), err


@pytest.mark.parametrize(
    ("setting", "named"),
    [
        ('url = "https://127.0.0.1:99999/"', "99999"),
        ('ca = "no-such-ca.pem"', "no-such-ca.pem"),
    ],
    ids=["port-out-of-range", "missing-ca-file"],
)
def test_kme_device_the_driver_refuses_ends_in_one_line_naming_the_table(
    site_a: Path, tmp_path: Path, setting: str, named: str
) -> None:
    url = [] if setting.startswith("url") else ['url = "https://127.0.0.1:9/"']
    with_kme_device(
        site_a,
        *url,
        setting,
        *kme_client(tmp_path),
        'own_sae_id = "qkdd-a"',
        'peer_sae_id = "qkdd-b"',
    )
    status, err = run_qkdd(site_a, clean_env(), tmp_path / "err.txt")
    assert status == 1, err
    line = one_plain_line(err)
    assert f"{site_a}: peers[0].device" in line and named in line, err
    # check-config builds the driver too (without starting it), so it says the same.
    status, err = check_config(site_a)
    assert status == 2, err
    line = one_plain_line(err)
    assert f"{site_a}: peers[0].device" in line and named in line, err


# -- secret files and the key store ---------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "expected"),
    [(None, "does not exist"), (b"not a seed", "32-byte ML-DSA-65 seed")],
    ids=["missing", "malformed"],
)
def test_bad_identity_file_ends_in_one_line(
    site_a: Path, tmp_path: Path, content: bytes | None, expected: str
) -> None:
    identity = tmp_path / "site-a" / "identity.key"
    if content is None:
        identity.unlink()
    else:
        identity.write_bytes(content)
    status, err = run_qkdd(site_a, clean_env(), tmp_path / "err.txt")
    assert status == 1, err
    line = one_plain_line(err)
    assert str(identity) in line and expected in line, err


def made_store(site: Path) -> Path:
    """Site A's key store, created under its key-encryption key as the daemon creates it."""
    from qkdd.daemon import STORE_FILE
    from qkdd.keystore import KeyStore

    state = site / "site-a" / "state"
    state.mkdir()
    store = KeyStore(state / STORE_FILE, (site / "site-a" / "kek.bin").read_bytes())
    store.close()
    return state / STORE_FILE


def test_store_under_another_key_encryption_key_ends_in_one_line(
    site_a: Path, tmp_path: Path
) -> None:
    store = made_store(tmp_path)
    write_key_encryption_key(tmp_path / "site-a" / "kek.bin", overwrite=True)
    status, err = run_qkdd(site_a, clean_env(), tmp_path / "err.txt")
    assert status == 1, err
    line = one_plain_line(err)
    assert str(store) in line and "key-encryption key does not match" in line, err


def test_store_of_a_newer_schema_ends_in_one_line(site_a: Path, tmp_path: Path) -> None:
    from qkdd.store.schema import SCHEMA_NAME, SCHEMA_VERSION

    store = made_store(tmp_path)
    with sqlite3.connect(store) as db:
        db.execute("UPDATE meta SET value=? WHERE name=?", (SCHEMA_VERSION + 1, SCHEMA_NAME))
    status, err = run_qkdd(site_a, clean_env(), tmp_path / "err.txt")
    assert status == 1, err
    line = one_plain_line(err)
    assert str(store) in line and f"knows versions up to {SCHEMA_VERSION}" in line, err


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
