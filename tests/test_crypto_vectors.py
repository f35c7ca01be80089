"""NIST known-answer tests (ACVP-derived vectors shipped in ``cryptography-vectors``)
for ML-KEM-768 and ML-DSA-65, run against every PQC backend available here."""

from __future__ import annotations

import os

import pytest

from qkdd.crypto import SIGNATURE_SIZE, AuthenticationFailed, PqcBackend
from qkdd.crypto.liboqs_probe import find_liboqs
from qkdd.crypto.select import select_backend

cryptography_vectors = pytest.importorskip("cryptography_vectors")


def load_nist_vectors(relative_path: str) -> list[dict[str, bytes]]:
    """Parse a NIST ``.rsp`` file: ``count = N`` starts a vector, ``key = hex`` lines fill it."""
    vectors: list[dict[str, bytes]] = []
    with cryptography_vectors.open_vector_file(relative_path, "r") as handle:
        for raw_line in handle:
            line = raw_line.strip()
            if not line or line.startswith(("#", "[")) or " = " not in line:
                continue
            key, value = (part.strip() for part in line.split(" = ", 1))
            if key == "count":
                vectors.append({"count": value.encode()})
            elif key in ("mlen", "smlen"):
                vectors[-1][key] = value.encode()
            else:
                vectors[-1][key] = bytes.fromhex(value)
    return vectors


MLKEM_VECTORS = load_nist_vectors(os.path.join("asymmetric", "MLKEM", "kat_MLKEM_768.rsp"))
MLDSA_VECTORS = load_nist_vectors(os.path.join("asymmetric", "MLDSA", "kat_MLDSA_65_det_pure.rsp"))


def test_vector_files_were_read() -> None:
    # A loader that silently read nothing would make every KAT below pass vacuously.
    assert len(MLKEM_VECTORS) == 1000
    assert len(MLDSA_VECTORS) == 100
    assert {"d", "z", "pk", "ct", "ss", "ct_n", "ss_n"} <= MLKEM_VECTORS[-1].keys()
    assert {"xi", "pk", "msg", "ctx", "sm"} <= MLDSA_VECTORS[-1].keys()
    for vector in MLDSA_VECTORS:
        assert len(vector["msg"]) == int(vector["mlen"])
        assert len(vector["sm"]) == SIGNATURE_SIZE + len(vector["msg"])


def test_mlkem768_kat(backend: PqcBackend) -> None:
    failures = []
    for vector in MLKEM_VECTORS:
        key = backend.kem_from_seed(vector["d"] + vector["z"])
        if key.public_bytes != vector["pk"]:
            failures.append((vector["count"], "public key"))
        if key.decapsulate(vector["ct"]) != vector["ss"]:
            failures.append((vector["count"], "shared secret"))
        # An invalid ciphertext: FIPS 203 implicit rejection gives a fixed pseudorandom key.
        if key.decapsulate(vector["ct_n"]) != vector["ss_n"]:
            failures.append((vector["count"], "implicit rejection"))
    assert failures == []


def test_mldsa65_kat_keygen_and_verify(backend: PqcBackend) -> None:
    failures = []
    for vector in MLDSA_VECTORS:
        key = backend.signing_key_from_seed(vector["xi"])
        if key.public_bytes != vector["pk"]:
            failures.append((vector["count"], "public key"))
        signature = vector["sm"][:SIGNATURE_SIZE]
        try:
            backend.verify(vector["pk"], vector["msg"], signature, vector["ctx"])
        except AuthenticationFailed:
            failures.append((vector["count"], "verify"))
    assert failures == []


def test_mldsa65_kat_signatures_are_rejected_for_other_inputs(backend: PqcBackend) -> None:
    for vector in MLDSA_VECTORS[:10]:
        signature = vector["sm"][:SIGNATURE_SIZE]
        other_message = vector["msg"] + b"\x00"
        other_context = bytes([vector["ctx"][0] ^ 1]) + vector["ctx"][1:] if vector["ctx"] else b"x"
        for message, context in ((other_message, vector["ctx"]), (vector["msg"], other_context)):
            with pytest.raises(AuthenticationFailed):
                backend.verify(vector["pk"], message, signature, context)


def test_mldsa65_kat_deterministic_signing_liboqs() -> None:
    """pyca signs hedged only; the liboqs backend can also sign deterministically
    (FIPS 204 rnd = 0), which must reproduce the NIST signatures byte for byte."""
    if find_liboqs() is None:
        pytest.skip("liboqs C library not found (set OQS_INSTALL_PATH)")
    backend = select_backend("oqs")
    failures = []
    for vector in MLDSA_VECTORS:
        key = backend.signing_key_from_seed(vector["xi"])
        signature = key.sign_deterministic(vector["msg"], vector["ctx"])  # type: ignore[attr-defined]
        if signature != vector["sm"][:SIGNATURE_SIZE]:
            failures.append(vector["count"])
    assert failures == []


def test_mldsa65_signing_is_hedged(backend: PqcBackend) -> None:
    vector = MLDSA_VECTORS[0]
    key = backend.signing_key_from_seed(vector["xi"])
    first = key.sign(vector["msg"], vector["ctx"])
    second = key.sign(vector["msg"], vector["ctx"])
    assert first != second  # fresh randomness per signature (FIPS 204 hedged variant)
    assert vector["sm"][:SIGNATURE_SIZE] not in (first, second)
    for signature in (first, second):
        backend.verify(vector["pk"], vector["msg"], signature, vector["ctx"])
