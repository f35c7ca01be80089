"""Shared fixtures: the PQC backends and site identities made with each."""

from __future__ import annotations

import os

import pytest
from backends import BACKENDS

from qkdd.crypto import PqcBackend, SigningKey
from qkdd.crypto.select import select_backend


@pytest.fixture(scope="session", params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> PqcBackend:
    """Each PQC backend in turn (liboqs only where its C library is installed)."""
    return select_backend(request.param)


@pytest.fixture(scope="session")
def identities(backend: PqcBackend) -> dict[str, SigningKey]:
    return {
        site: backend.signing_key_from_seed(os.urandom(32))
        for site in ("site-a", "site-b", "mallory")
    }


@pytest.fixture(scope="session")
def any_backend() -> PqcBackend:
    """A PQC backend, for tests where which one does not matter."""
    return select_backend("cryptography")
