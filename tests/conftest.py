"""Shared fixtures: the PQC backends, site identities made with each, and a pair of
key stores (one per site of a link)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from backends import BACKENDS

from qkdd.crypto import PqcBackend, SigningKey
from qkdd.crypto.select import select_backend
from qkdd.keystore import KeyStore

# The key-encryption key of test stores.
STORE_KEK = bytes(range(32))


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


@pytest.fixture
def stores(tmp_path: Path) -> Iterator[tuple[KeyStore, KeyStore]]:
    """Two empty key stores, site A's and site B's, closed after the test."""
    a, b = KeyStore(tmp_path / "a.db", STORE_KEK), KeyStore(tmp_path / "b.db", STORE_KEK)
    yield a, b
    a.close()
    b.close()
