"""ML-KEM-768 and ML-DSA-65 from pyca/cryptography (OpenSSL 3.5+ inside its wheels)."""

from __future__ import annotations

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import mldsa, mlkem

from qkdd.crypto import (
    KEM_CIPHERTEXT_SIZE,
    KEM_PUBLIC_KEY_SIZE,
    KEM_SEED_SIZE,
    SIGNATURE_PUBLIC_KEY_SIZE,
    SIGNATURE_SEED_SIZE,
    AuthenticationFailed,
    BackendUnavailable,
    CryptoError,
    KemPrivateKey,
    PqcBackend,
    SigningKey,
)


class _PycaKemKey(KemPrivateKey):
    def __init__(self, key: mlkem.MLKEM768PrivateKey) -> None:
        self._key = key
        self._public = key.public_key().public_bytes_raw()

    @property
    def public_bytes(self) -> bytes:
        return self._public

    def decapsulate(self, ciphertext: bytes) -> bytes:
        if len(ciphertext) != KEM_CIPHERTEXT_SIZE:
            raise CryptoError(f"ML-KEM-768 ciphertext must be {KEM_CIPHERTEXT_SIZE} bytes")
        return self._key.decapsulate(ciphertext)


class _PycaSigningKey(SigningKey):
    def __init__(self, key: mldsa.MLDSA65PrivateKey) -> None:
        self._key = key
        self._public = key.public_key().public_bytes_raw()

    @property
    def public_bytes(self) -> bytes:
        return self._public

    def sign(self, message: bytes, context: bytes) -> bytes:
        if len(context) > 255:  # FIPS 204: ctx is at most 255 bytes
            raise CryptoError("ML-DSA context must be at most 255 bytes")
        return self._key.sign(message, context)


class PycaBackend(PqcBackend):
    name = "cryptography"

    def __init__(self) -> None:
        try:
            mlkem.MLKEM768PrivateKey.generate()
            mldsa.MLDSA65PrivateKey.generate()
        except UnsupportedAlgorithm as exc:
            raise BackendUnavailable(
                f"this build of pyca/cryptography lacks ML-KEM/ML-DSA ({exc}); "
                "install cryptography>=48 from its wheels"
            ) from None

    def kem_generate(self) -> KemPrivateKey:
        return _PycaKemKey(mlkem.MLKEM768PrivateKey.generate())

    def kem_from_seed(self, seed: bytes) -> KemPrivateKey:
        if len(seed) != KEM_SEED_SIZE:
            raise CryptoError(f"ML-KEM-768 seed must be {KEM_SEED_SIZE} bytes")
        return _PycaKemKey(mlkem.MLKEM768PrivateKey.from_seed_bytes(seed))

    def kem_encapsulate(self, public_key: bytes) -> tuple[bytes, bytes]:
        if len(public_key) != KEM_PUBLIC_KEY_SIZE:
            raise CryptoError(f"ML-KEM-768 public key must be {KEM_PUBLIC_KEY_SIZE} bytes")
        try:
            return mlkem.MLKEM768PublicKey.from_public_bytes(public_key).encapsulate()
        except ValueError as exc:  # FIPS 203 modulus check on the encapsulation key
            raise CryptoError(f"invalid ML-KEM-768 public key: {exc}") from None

    def signing_key_from_seed(self, seed: bytes) -> SigningKey:
        if len(seed) != SIGNATURE_SEED_SIZE:
            raise CryptoError(f"ML-DSA-65 seed must be {SIGNATURE_SEED_SIZE} bytes")
        return _PycaSigningKey(mldsa.MLDSA65PrivateKey.from_seed_bytes(seed))

    def verify(self, public_key: bytes, message: bytes, signature: bytes, context: bytes) -> None:
        if len(public_key) != SIGNATURE_PUBLIC_KEY_SIZE:
            raise AuthenticationFailed("ML-DSA-65 public key has the wrong size")
        try:
            key = mldsa.MLDSA65PublicKey.from_public_bytes(public_key)
            key.verify(signature, message, context)
        except (InvalidSignature, ValueError):
            raise AuthenticationFailed("ML-DSA-65 signature did not verify") from None
