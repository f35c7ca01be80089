"""A clean stop is clean: SIGTERM or SIGINT ends the daemon with exit status 0 after
`event=stopped`, however many more of them arrive while it is stopping, and also when the
first one arrives while it is still starting."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from timeouts import timeout, wait_until

from qkdd.demo import prepare_directory, start_emulator


@pytest.fixture
def site_a(tmp_path):
    """Site A's config; its QKD device is an emulator pty, its peer is absent."""
    configs = prepare_directory(tmp_path)
    emulator = start_emulator(tmp_path)
    yield configs["site-a"]
    emulator.terminate()
    emulator.wait(timeout=timeout(30))


def wait_for_log(log: Path, text: str, process: subprocess.Popen[bytes]) -> None:
    def logged() -> bool:
        assert process.poll() is None, log.read_text()
        return text in log.read_text()

    wait_until(logged, repr(text), 60, log.read_text)


def stop_impatiently(process: subprocess.Popen[bytes], signals: list[signal.Signals]) -> int:
    """Send the signals in turn, over and over, until the process has exited: the first
    starts the stop, the rest land in every later stage of it."""
    index = 0

    def stopped() -> bool:
        nonlocal index
        if process.poll() is not None:
            return True
        process.send_signal(signals[index % len(signals)])
        index += 1
        return False

    wait_until(stopped, "the daemon to stop", 60, interval=0.001)
    assert index > 1  # more than one signal reached the daemon
    return process.returncode


@pytest.mark.parametrize(
    "signals",
    [
        [signal.SIGTERM],
        [signal.SIGINT],
        [signal.SIGTERM, signal.SIGINT],
    ],
    ids=["SIGTERM", "SIGINT", "SIGTERM-then-SIGINT"],
)
def test_signals_during_shutdown_still_exit_0(site_a, tmp_path, signals):
    log = tmp_path / "a.log"
    with open(log, "wb") as handle:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "qkdd", "run", "--config", str(site_a)],
            stdout=subprocess.DEVNULL,
            stderr=handle,
        )
    try:
        wait_for_log(log, "event=ready", daemon)
        returncode = stop_impatiently(daemon, signals)
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
    text = log.read_text()
    assert returncode == 0, text
    assert text.count("event=stopping") == 1, text
    assert "event=stopped" in text.split("event=stopping", 1)[1]
    assert "Traceback" not in text


SIGNAL_WHILE_STARTING = """
import os
import signal
import sys

import qkdd.daemon
from qkdd.cli import main

# The signal arrives while the daemon is still starting (during its crypto self-test),
# before it listens for signals itself.
self_test = qkdd.daemon._self_test

def self_test_then_signal(backend):
    os.kill(os.getpid(), getattr(signal, sys.argv[2]))
    self_test(backend)

qkdd.daemon._self_test = self_test_then_signal
sys.exit(main(["run", "--config", sys.argv[1]]))
"""


@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT"])
def test_a_signal_while_starting_stops_the_daemon_cleanly(site_a, name):
    result = subprocess.run(
        [sys.executable, "-c", SIGNAL_WHILE_STARTING, str(site_a), name],
        env=os.environ,
        capture_output=True,
        text=True,
        timeout=timeout(60),
    )
    assert result.returncode == 0, result.stderr
    assert f"event=stopping signal={name}" in result.stderr
    assert "event=stopped" in result.stderr
    assert "event=ready" not in result.stderr  # it stopped instead of going on to serve
    assert "Traceback" not in result.stderr
