"""The one small cryptographic interface qkdd uses: KEM, signature, KDF, AEAD, X25519.

Every algorithm name is written once, here. Callers never touch a library directly:
they get a :class:`PqcBackend` (ML-KEM-768 and ML-DSA-65, from pyca/cryptography or
liboqs-python) from :func:`qkdd.crypto.select.select_backend`, and use the classical
helpers below, which always come from pyca/cryptography.

Failures raise (``verify`` never returns False). Secret values never appear in reprs.
"""

from __future__ import annotations

import abc
import hmac
import os
from collections.abc import Iterable
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from qkdd.errors import CryptoError as CryptoError

# -- Algorithm names (the only place they are written) ------------------------------------

KEM_ALGORITHM: Final = "ML-KEM-768"
SIGNATURE_ALGORITHM: Final = "ML-DSA-65"
KEX_ALGORITHM: Final = "X25519"
KDF_ALGORITHM: Final = "HKDF-SHA256"
SESSION_AEAD_ALGORITHM: Final = "ChaCha20-Poly1305"
AT_REST_AEAD_ALGORITHM: Final = "AES-256-GCM"
# Application messages between sites, each under its own one-time key.
MESSAGE_AEAD_ALGORITHM: Final = SESSION_AEAD_ALGORITHM
# One-time-pad messages: an information-theoretic one-time authenticator (its key, fresh
# QKD material, is used for one message only).
ONE_TIME_MAC_ALGORITHM: Final = "Poly1305"
ONE_TIME_MAC_KEY_SIZE: Final = 32
ONE_TIME_MAC_TAG_SIZE: Final = 16

# -- Sizes (FIPS 203 / FIPS 204 / RFC 7748 / RFC 8439) -------------------------------------

KEM_SEED_SIZE: Final = 64  # FIPS 203 d || z
KEM_PUBLIC_KEY_SIZE: Final = 1184
KEM_CIPHERTEXT_SIZE: Final = 1088
KEM_SHARED_SECRET_SIZE: Final = 32
SIGNATURE_SEED_SIZE: Final = 32  # FIPS 204 xi
SIGNATURE_PUBLIC_KEY_SIZE: Final = 1952
SIGNATURE_SIZE: Final = 3309
X25519_KEY_SIZE: Final = 32
AEAD_KEY_SIZE: Final = 32
AEAD_NONCE_SIZE: Final = 12
AEAD_TAG_SIZE: Final = 16
HASH_SIZE: Final = 32


class AuthenticationFailed(CryptoError):
    """A signature, MAC or AEAD tag did not verify."""


class BackendUnavailable(CryptoError):
    """The requested PQC backend cannot be used on this machine (the message says why)."""


class SeedNotSupported(CryptoError):
    """The backend cannot load a private key from its FIPS 203/204 seed."""


# -- PQC: one abstract backend, two implementations --------------------------------------


class KemPrivateKey(abc.ABC):
    """An ML-KEM-768 decapsulation key. ``seed`` is the FIPS 203 64-byte d||z."""

    @property
    @abc.abstractmethod
    def public_bytes(self) -> bytes: ...

    @abc.abstractmethod
    def decapsulate(self, ciphertext: bytes) -> bytes: ...

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {KEM_ALGORITHM} (secret hidden)>"


class SigningKey(abc.ABC):
    """An ML-DSA-65 signing key loaded from its FIPS 204 32-byte seed."""

    @property
    @abc.abstractmethod
    def public_bytes(self) -> bytes: ...

    @abc.abstractmethod
    def sign(self, message: bytes, context: bytes) -> bytes: ...

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {SIGNATURE_ALGORITHM} (secret hidden)>"


class PqcBackend(abc.ABC):
    """ML-KEM-768 and ML-DSA-65. Both implementations interoperate byte for byte."""

    name: str

    @abc.abstractmethod
    def kem_generate(self) -> KemPrivateKey:
        """A fresh ephemeral decapsulation key."""

    @abc.abstractmethod
    def kem_from_seed(self, seed: bytes) -> KemPrivateKey:
        """Load a decapsulation key from its 64-byte seed (raises SeedNotSupported)."""

    @abc.abstractmethod
    def kem_encapsulate(self, public_key: bytes) -> tuple[bytes, bytes]:
        """Return ``(shared_secret, ciphertext)``; raises CryptoError on a bad key."""

    @abc.abstractmethod
    def signing_key_from_seed(self, seed: bytes) -> SigningKey:
        """Load a signing key from its 32-byte seed (raises SeedNotSupported)."""

    @abc.abstractmethod
    def verify(self, public_key: bytes, message: bytes, signature: bytes, context: bytes) -> None:
        """Raise AuthenticationFailed unless ``signature`` is valid."""

    def __repr__(self) -> str:
        return f"<PqcBackend {self.name}>"


def new_signature_seed() -> bytes:
    return os.urandom(SIGNATURE_SEED_SIZE)


# -- Classical primitives (always pyca/cryptography or the standard library) --------------


class X25519KeyPair:
    """An ephemeral X25519 key share."""

    def __init__(self, private_bytes: bytes | None = None) -> None:
        # A given private key only where a recorded transcript is replayed.
        if private_bytes is None:
            self._private = X25519PrivateKey.generate()
        elif len(private_bytes) != X25519_KEY_SIZE:
            raise CryptoError("X25519 private key must be 32 bytes")
        else:
            self._private = X25519PrivateKey.from_private_bytes(private_bytes)
        self.public_bytes = self._private.public_key().public_bytes_raw()

    def exchange(self, peer_public: bytes) -> bytes:
        if len(peer_public) != X25519_KEY_SIZE:
            raise CryptoError("X25519 public key must be 32 bytes")
        try:
            shared = self._private.exchange(X25519PublicKey.from_public_bytes(peer_public))
        except ValueError as exc:  # all-zero output: a low-order point
            raise CryptoError(f"X25519 exchange failed: {exc}") from None
        return shared

    def __repr__(self) -> str:
        return "<X25519KeyPair (secret hidden)>"


def hkdf_extract(salt: bytes, ikm: bytes) -> bytes:
    """RFC 5869 HKDF-Extract with SHA-256 (stdlib HMAC: fast enough to derive in bulk)."""
    return hmac.digest(salt or bytes(HASH_SIZE), ikm, "sha256")


def hkdf_expand(prk: bytes, info: bytes, length: int) -> bytes:
    """RFC 5869 HKDF-Expand with SHA-256."""
    if not 0 < length <= 255 * HASH_SIZE:
        raise CryptoError(f"HKDF output length {length} out of range")
    if length <= HASH_SIZE:  # the common case: one block
        return hmac.digest(prk, info + b"\x01", "sha256")[:length]
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = hmac.digest(prk, block + info + bytes([counter]), "sha256")
        out += block
        counter += 1
    return out[:length]


def hkdf(salt: bytes, ikm: bytes, info: bytes, length: int) -> bytes:
    return hkdf_expand(hkdf_extract(salt, ikm), info, length)


def mac(key: bytes, message: bytes) -> bytes:
    """HMAC-SHA256, for key confirmation and PSK binders."""
    return hmac.digest(key, message, "sha256")


def hash_bytes(data: bytes) -> bytes:
    import hashlib

    return hashlib.sha256(data).digest()


def xof(data: bytes, length: int) -> bytes:
    """SHAKE-256 (FIPS 202) as an extendable-output function: ``length`` bytes in one call.
    A shorter output is a prefix of a longer one for the same input, so callers put every
    length that matters into ``data``."""
    import hashlib

    return hashlib.shake_256(data).digest(length)


def constant_time_equal(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(a, b)


def xor_bytes(a: bytes, b: bytes) -> bytes:
    """``a`` XOR ``b`` (of equal length): a one-time pad, or a keystream laid over key
    material."""
    # numpy XORs a 128 KiB batch in ~6 µs, int.from_bytes/to_bytes in ~470 µs. Imported
    # here, not at the top: the light paths that import this module need no numpy.
    import numpy as np

    return np.bitwise_xor(np.frombuffer(a, np.uint8), np.frombuffer(b, np.uint8)).tobytes()


def one_time_mac(key: bytes, message: bytes) -> bytes:
    """Poly1305 under a key used for this one message only: with a uniformly random key
    a forgery succeeds with probability at most 8 * ceil(len/16) / 2^106, whatever the
    attacker's computing power."""
    from cryptography.hazmat.primitives.poly1305 import Poly1305

    if len(key) != ONE_TIME_MAC_KEY_SIZE:
        raise CryptoError(f"a {ONE_TIME_MAC_ALGORITHM} key is {ONE_TIME_MAC_KEY_SIZE} bytes")
    return Poly1305.generate_tag(key, message)


def one_time_mac_verify(key: bytes, message: bytes, tag: bytes) -> None:
    """AuthenticationFailed unless ``tag`` is the one-time MAC of ``message`` (compared in
    constant time)."""
    if not constant_time_equal(one_time_mac(key, message), tag):
        raise AuthenticationFailed(f"{ONE_TIME_MAC_ALGORITHM} tag did not verify")


class Aead:
    """AEAD with a fixed key; ``open`` raises AuthenticationFailed on any tampering."""

    def __init__(self, key: bytes, algorithm: str = SESSION_AEAD_ALGORITHM) -> None:
        if len(key) != AEAD_KEY_SIZE:
            raise CryptoError("AEAD key must be 32 bytes")
        if algorithm == SESSION_AEAD_ALGORITHM:
            self._cipher: ChaCha20Poly1305 | AESGCM = ChaCha20Poly1305(key)
        elif algorithm == AT_REST_AEAD_ALGORITHM:
            self._cipher = AESGCM(key)
        else:
            raise CryptoError(f"unknown AEAD algorithm {algorithm!r}")
        self.algorithm = algorithm

    def seal(self, nonce: bytes, plaintext: bytes, associated_data: bytes) -> bytes:
        return self._cipher.encrypt(nonce, plaintext, associated_data)

    def open(self, nonce: bytes, ciphertext: bytes, associated_data: bytes) -> bytes:
        try:
            return self._cipher.decrypt(nonce, ciphertext, associated_data)
        except InvalidTag:
            raise AuthenticationFailed(f"{self.algorithm} tag did not verify") from None

    def open_many(self, items: Iterable[tuple[bytes, bytes, bytes]]) -> list[bytes | None]:
        """``open`` for many (nonce, ciphertext, associated data): None for each whose tag
        does not verify (one call for a batch of sealed rows)."""
        decrypt = self._cipher.decrypt
        opened: list[bytes | None] = []
        for nonce, ciphertext, associated_data in items:
            try:
                opened.append(decrypt(nonce, ciphertext, associated_data))
            except InvalidTag:
                opened.append(None)
        return opened

    def __repr__(self) -> str:
        return f"<Aead {self.algorithm} (key hidden)>"
