"""Reading a site daemon's log in tests: the sessions it established."""

from __future__ import annotations

from pathlib import Path


def established_sessions(log_file: Path, auth: str) -> list[str]:
    """The log's session_established lines whose authentication starts with ``auth``
    (``ml-dsa-bootstrap``, ``psk:``). A session of crossed dials that was not taken up
    logs ``session_unused`` with its ``auth=`` instead, and is not counted."""
    return [
        line
        for line in log_file.read_text().splitlines()
        if "event=session_established" in line and f" auth={auth}" in line
    ]
