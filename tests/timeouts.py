"""One setting for every hang-catching wait in the tests.

Tests never assert a speed: they wait for the event they need (a log line, a state, a
count) and give up only when something hangs. The limit for such a wait is written in
seconds for an ordinary machine and passed through `timeout`, so a very slow or busy
machine can stretch every limit at once with QKDD_TEST_TIMEOUT_SCALE (e.g. 3).
"""

from __future__ import annotations

import os


def timeout(seconds: float) -> float:
    """Return `seconds` scaled by QKDD_TEST_TIMEOUT_SCALE (default 1).

    Use it for every deadline that only exists to catch a hang: trio.fail_after,
    subprocess waits, polling loops. Pick `seconds` generously (many times what an idle
    machine needs); the scale is for machines slower than that.
    """
    return seconds * float(os.environ.get("QKDD_TEST_TIMEOUT_SCALE", "1"))
