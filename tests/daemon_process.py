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
