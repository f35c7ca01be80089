"""Stopping a daemon that a test started as a subprocess: SIGTERM, then a wait that only
catches a hang; a daemon still running after it is killed, so no test leaves one behind."""

from __future__ import annotations

import signal
import subprocess

from timeouts import timeout


def stop_daemon(daemon: subprocess.Popen, seconds: float = 30) -> int:
    """Send SIGTERM and return the exit status (the caller asserts it: 0 is a clean stop)."""
    daemon.send_signal(signal.SIGTERM)
    try:
        return daemon.wait(timeout=timeout(seconds))
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()


def stop_all(processes: list[subprocess.Popen], seconds: float = 10) -> None:
    """SIGTERM to every process still running, then wait for each (killing one that does
    not stop): a fixture's clean-up, which asserts nothing about how they ended."""
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout(seconds))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
