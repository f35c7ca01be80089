"""The PQC backends a benchmark can measure here: pyca/cryptography always, liboqs where
its C library is installed (found without importing ``oqs``)."""

from __future__ import annotations

from qkdd.crypto import BackendUnavailable, PqcBackend
from qkdd.crypto.liboqs_probe import explain_missing, find_liboqs
from qkdd.crypto.select import select_backend


def available_backends(omitted: str = "liboqs omitted") -> dict[str, PqcBackend]:
    """Backends by name; says on stdout why liboqs is left out when it is."""
    backends = {"cryptography": select_backend("cryptography")}
    if find_liboqs() is None:
        print(f"({omitted}: {explain_missing()})")
        return backends
    try:
        backends["liboqs"] = select_backend("oqs")
    except BackendUnavailable as exc:
        print(f"({omitted}: {exc})")
    return backends
