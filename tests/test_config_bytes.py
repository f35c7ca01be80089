"""A config file that is not what it should be at the byte level (not UTF-8, unreadable,
missing, a directory, huge, nested without end) gets one clear error naming the file, from
the loader, from `qkdd check-config` and `qkdd run`; and a SIGHUP with such a file leaves the
running daemon serving with its config."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
from daemon_process import stop_daemon
from timeouts import timeout, wait_until

from qkdd.client import BlockingKeyClient
from qkdd.config import MAX_CONFIG_BYTES, ConfigError, load_config
from qkdd.demo import prepare_directory, start_emulator
from qkdd.demo_sites import SITE_B

NOT_UTF8 = b'site_id = "site-\xff"\n'


@pytest.fixture
def site_a(tmp_path: Path):
    """Site A's files; its QKD device is an emulator pty, its peer is absent."""
    configs = prepare_directory(tmp_path)
    emulator = start_emulator(tmp_path)
    yield configs["site-a"]
    emulator.terminate()
    emulator.wait(timeout=timeout(10))


@pytest.mark.parametrize(
    ("content", "key", "fragment"),
    [
        (NOT_UTF8, "(encoding)", "byte 0xff at offset 16 (line 1)"),
        (b"# ok\n\x80\n", "(encoding)", "byte 0x80 at offset 5 (line 2)"),
        ("site_id = 'x'".encode("utf-16"), "(encoding)", "UTF-8"),
        (b"a = " + b"[" * 10_000, "(syntax)", "nested"),
        (b"a = " + b"{b=" * 10_000, "(syntax)", "nested"),
        (b"x" * (MAX_CONFIG_BYTES + 1), "(file)", f"at most {MAX_CONFIG_BYTES} bytes"),
    ],
    ids=["not-utf8", "not-utf8-line-2", "utf16", "deep-arrays", "deep-tables", "huge"],
)
def test_bad_bytes_are_a_config_error_naming_the_file(
    tmp_path: Path, content: bytes, key: str, fragment: str
) -> None:
    path = tmp_path / "site.toml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.file == str(path) and info.value.key == key
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_a_directory_or_a_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a directory"):
        load_config(tmp_path)
    with pytest.raises(ConfigError, match="an existing TOML config file"):
        load_config(tmp_path / "missing.toml")


def test_non_utf8_public_key_file_is_a_config_error(site_a: Path) -> None:
    (site_a.parent / "site-b" / "identity.pub").write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="public_key_file") as info:
        load_config(site_a)
    assert "not UTF-8" in str(info.value)


def qkdd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qkdd", *args],
        capture_output=True,
        text=True,
        timeout=timeout(60),
    )


@pytest.mark.parametrize("command", [("check-config",), ("run", "--config")])
@pytest.mark.parametrize("problem", ["not-utf8", "directory", "missing"])
def test_commands_print_one_line_naming_the_file(
    tmp_path: Path, command: tuple[str, ...], problem: str
) -> None:
    path = tmp_path / "site.toml"
    if problem == "not-utf8":
        path.write_bytes(NOT_UTF8)
    elif problem == "directory":
        path.mkdir()
    result = qkdd(*command, str(path))
    # Exit status 2: a config error, as for a TOML syntax error (see qkdd.cli).
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith(f"qkdd: config error: {path}: "), lines


def start_daemon(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as handle:
        return subprocess.Popen(
            [sys.executable, "-m", "qkdd", "run", "--config", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=handle,
        )


def wait_for_log(daemon: subprocess.Popen[bytes], log: Path, fragment: str, count: int = 1) -> None:
    def seen() -> bool:
        assert daemon.poll() is None, log.read_text()[-3000:]
        return log.read_text().count(fragment) >= count

    wait_until(seen, f"{fragment!r} x{count} in the log", 30, lambda: log.read_text()[-3000:])


def test_sighup_with_a_bad_file_keeps_the_daemon_serving(site_a: Path, tmp_path: Path) -> None:
    log = tmp_path / "a.log"
    good = site_a.read_bytes()
    socket_path = str(site_a.parent / "site-a" / "api.sock")
    daemon = start_daemon(site_a, log)
    try:
        wait_for_log(daemon, log, "event=ready")
        breakages = [
            lambda: site_a.write_bytes(good.replace(b'"site-a"', b'"site-\xff"')),  # not UTF-8
            site_a.unlink,  # removed
            lambda: (site_a.unlink(), site_a.mkdir()),  # replaced by a directory
        ]
        for count, breakage in enumerate(breakages, start=1):
            breakage()
            daemon.send_signal(signal.SIGHUP)
            wait_for_log(daemon, log, "event=reload_failed", count)
            with BlockingKeyClient(socket_path, timeout=timeout(30)) as client:
                assert client.status(SITE_B.sae_id)["master_SAE_ID"] == "sae-a"
            if site_a.is_dir():
                site_a.rmdir()
            site_a.write_bytes(good)
        # A good file again: the reload is applied as usual.
        daemon.send_signal(signal.SIGHUP)
        wait_for_log(daemon, log, "event=reloaded")
    finally:
        stop_daemon(daemon)
    text = log.read_text()
    assert daemon.returncode == 0, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    failures = [line for line in text.splitlines() if "event=reload_failed" in line]
    assert "(encoding)" in failures[0] and str(site_a) in failures[0]
    assert "an existing TOML config file" in failures[1]
    assert "not a directory" in failures[2]
