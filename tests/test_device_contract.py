"""Every device driver passes the same suite: the ``QkdDevice`` contract of
tests/device_contract.py, run once per driver and device side (serial, emulator, KME master,
KME slave)."""

from __future__ import annotations

from device_contract import *  # noqa: F403  (the `harness` fixture and the checks)
