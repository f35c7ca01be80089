"""The start-up known-answer self-tests: they pass on every real backend and name the
primitive when a backend is broken."""

from __future__ import annotations

import pytest

from qkdd.crypto import KemPrivateKey, PqcBackend, SeedNotSupported, SigningKey
from qkdd.crypto.selftest import SelfTestFailed, run_self_tests


def _flip(data: bytes) -> bytes:
    return bytes([data[0] ^ 1]) + data[1:]


class _KemKey(KemPrivateKey):
    """Wraps a real key, optionally lying about its public key or its decapsulation."""

    def __init__(self, inner: KemPrivateKey, wrong_public: bool, wrong_secret: bool) -> None:
        self._inner, self._wrong_public, self._wrong_secret = inner, wrong_public, wrong_secret

    @property
    def public_bytes(self) -> bytes:
        public = self._inner.public_bytes
        return _flip(public) if self._wrong_public else public

    def decapsulate(self, ciphertext: bytes) -> bytes:
        secret = self._inner.decapsulate(ciphertext)
        return _flip(secret) if self._wrong_secret else secret


class _SigningKey(SigningKey):
    def __init__(self, inner: SigningKey) -> None:
        self._inner = inner

    @property
    def public_bytes(self) -> bytes:
        return _flip(self._inner.public_bytes)

    def sign(self, message: bytes, context: bytes) -> bytes:
        return self._inner.sign(message, context)


def _broken(backend: PqcBackend, fault: str) -> PqcBackend:
    """A subclass of the real backend class with one deliberate fault."""
    base = type(backend)

    def kem_from_seed(self: PqcBackend, seed: bytes) -> KemPrivateKey:
        return _KemKey(
            base.kem_from_seed(self, seed),
            wrong_public=fault == "kem public key",
            wrong_secret=fault == "kem decapsulation",
        )

    def signing_key_from_seed(self: PqcBackend, seed: bytes) -> SigningKey:
        if fault == "no signature seeds":
            raise SeedNotSupported("cannot load ML-DSA keys from seeds")
        key = base.signing_key_from_seed(self, seed)
        return _SigningKey(key) if fault == "signature public key" else key

    def verify(
        self: PqcBackend, public_key: bytes, message: bytes, signature: bytes, context: bytes
    ) -> None:
        if fault != "verify accepts anything":
            base.verify(self, public_key, message, signature, context)

    methods = {
        "kem_from_seed": kem_from_seed,
        "signing_key_from_seed": signing_key_from_seed,
        "verify": verify,
    }
    return type(f"Broken{base.__name__}", (base,), methods)()


def test_real_backends_pass(backend: PqcBackend) -> None:
    run_self_tests(backend)  # raises on any mismatch


def test_wrapper_without_faults_passes(backend: PqcBackend) -> None:
    # The fault-injection harness itself must not break a good backend.
    run_self_tests(_broken(backend, "none"))


@pytest.mark.parametrize(
    ("fault", "primitive", "detail"),
    [
        ("kem public key", "ML-KEM-768", "wrong public key"),
        ("kem decapsulation", "ML-KEM-768", "wrong shared secret"),
        ("signature public key", "ML-DSA-65", "wrong public key"),
        ("verify accepts anything", "ML-DSA-65", "tampered signature was accepted"),
        ("no signature seeds", "ML-DSA-65", "cannot load ML-DSA keys from seeds"),
    ],
)
def test_broken_backend_is_caught(
    backend: PqcBackend, fault: str, primitive: str, detail: str
) -> None:
    with pytest.raises(SelfTestFailed) as caught:
        run_self_tests(_broken(backend, fault))
    message = str(caught.value)
    assert message.startswith(f"{primitive} self-test failed")
    assert detail in message


def test_broken_classical_primitive_is_caught(
    backend: PqcBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    import qkdd.crypto.selftest as selftest

    def bad_hkdf(salt: bytes, ikm: bytes, info: bytes, length: int) -> bytes:
        return bytes(length)

    monkeypatch.setattr(selftest, "hkdf", bad_hkdf)
    with pytest.raises(SelfTestFailed, match="HKDF-SHA256 self-test failed"):
        run_self_tests(backend)
