"""Shared fixtures: crypto backends and identities."""

from __future__ import annotations

import os

import pytest

from qkdd.crypto import PqcBackend, SigningKey
from qkdd.crypto.select import select_backend


@pytest.fixture(scope="session")
def backend() -> PqcBackend:
    return select_backend("cryptography")


@pytest.fixture(scope="session")
def identities(backend: PqcBackend) -> dict[str, SigningKey]:
    return {
        site: backend.signing_key_from_seed(os.urandom(32))
        for site in ("site-a", "site-b", "mallory")
    }
