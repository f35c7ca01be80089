"""Choosing the PQC backend: ``auto`` prefers liboqs-python where the liboqs C library is
installed, else pyca/cryptography; ``oqs`` or ``cryptography`` force one.

liboqs is looked for *without* importing ``oqs``: importing liboqs-python on a machine
without the library makes it try to download and build liboqs.
"""

from __future__ import annotations

import functools
import logging

from qkdd.crypto import BackendUnavailable, PqcBackend

_log = logging.getLogger(__name__)

BACKEND_CHOICES = ("auto", "oqs", "cryptography")


@functools.cache
def select_backend(choice: str = "auto") -> PqcBackend:
    if choice not in BACKEND_CHOICES:
        raise BackendUnavailable(
            f"unknown PQC backend {choice!r}; expected one of {BACKEND_CHOICES}"
        )
    if choice in ("auto", "oqs"):
        # Importing backend_oqs is always safe: it imports ``oqs`` only once
        # liboqs_probe has found the C library.
        from qkdd.crypto.backend_oqs import OqsBackend

        try:
            return OqsBackend()
        except BackendUnavailable as exc:
            if choice == "oqs":
                raise
            _log.info("liboqs backend not used (%s); using pyca/cryptography", exc)
    from qkdd.crypto.backend_pyca import PycaBackend

    return PycaBackend()
