"""The PQC backends tests run against: pyca/cryptography always, liboqs where installed."""

from __future__ import annotations

import pytest

from qkdd.crypto.liboqs_probe import find_liboqs

LIBOQS_MISSING = "liboqs C library not found (set OQS_INSTALL_PATH)"
HAVE_LIBOQS = find_liboqs() is not None
needs_liboqs = pytest.mark.skipif(not HAVE_LIBOQS, reason=LIBOQS_MISSING)

BACKENDS = [
    pytest.param("cryptography", id="cryptography"),
    pytest.param("oqs", id="liboqs", marks=needs_liboqs),
]
