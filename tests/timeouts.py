"""One setting for every hang-catching wait in the tests.

Tests never assert a speed: they wait for the event they need (a log line, a state, a
count) and give up only when something hangs. The limit for such a wait is written in
seconds for an ordinary machine and passed through `timeout`, so a very slow or busy
machine can stretch every limit at once with QKDD_TEST_TIMEOUT_SCALE (e.g. 3).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable


def timeout(seconds: float) -> float:
    """Return `seconds` scaled by QKDD_TEST_TIMEOUT_SCALE (default 1).

    Use it for every deadline that only exists to catch a hang: trio.fail_after,
    subprocess waits, polling loops. Pick `seconds` generously (many times what an idle
    machine needs); the scale is for machines slower than that.
    """
    return seconds * float(os.environ.get("QKDD_TEST_TIMEOUT_SCALE", "1"))


def wait_until(
    condition: Callable[[], object],
    what: str,
    seconds: float,
    detail: Callable[[], str] = lambda: "",
    interval: float = 0.05,
) -> None:
    """Poll ``condition`` until it holds; fail (saying ``what`` and ``detail()``) only if it
    still does not after ``timeout(seconds)``, i.e. when something hangs."""
    deadline = time.monotonic() + timeout(seconds)
    while not condition():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out waiting for {what}\n{detail()}")
        time.sleep(interval)
