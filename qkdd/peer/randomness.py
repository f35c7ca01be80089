"""Where the peer protocol's randomness comes from: handshake nonces, ephemeral ML-KEM and
X25519 key pairs, and ML-KEM encapsulations (the handshake's and each batch's).

The sans-IO cores (``qkdd.peer.connection``, the key agreement) draw every random value
through a ``Randomness`` given to them, so a recorded transcript can be replayed byte for
byte (``tests/vectors/peer_transcript.json``). The daemon always uses ``SYSTEM_RANDOMNESS``:
the operating system's generator and the backend's own key generation and encapsulation.

Encapsulation is part of this interface because its randomness cannot be fixed in every
backend (pyca/cryptography draws it internally): a source that replays recorded
transcripts hands back the recorded (shared secret, ciphertext) pair instead.
"""

from __future__ import annotations

import os
from typing import Final, Protocol

from qkdd.crypto import KemPrivateKey, PqcBackend, X25519KeyPair


class Randomness(Protocol):
    """Every random value the peer protocol uses."""

    def nonce(self, size: int) -> bytes:
        """``size`` fresh random bytes (a handshake nonce)."""

    def kem_key(self, backend: PqcBackend) -> KemPrivateKey:
        """A fresh ephemeral ML-KEM-768 decapsulation key."""

    def x25519_key(self) -> X25519KeyPair:
        """A fresh ephemeral X25519 key share."""

    def kem_encapsulate(self, backend: PqcBackend, public_key: bytes) -> tuple[bytes, bytes]:
        """``(shared_secret, ciphertext)`` to ``public_key``; raises CryptoError on a bad
        key."""


class SystemRandomness:
    """The operating system's randomness, through the backend's own key generation and
    encapsulation."""

    def nonce(self, size: int) -> bytes:
        return os.urandom(size)

    def kem_key(self, backend: PqcBackend) -> KemPrivateKey:
        return backend.kem_generate()

    def x25519_key(self) -> X25519KeyPair:
        return X25519KeyPair()

    def kem_encapsulate(self, backend: PqcBackend, public_key: bytes) -> tuple[bytes, bytes]:
        return backend.kem_encapsulate(public_key)

    def __repr__(self) -> str:
        return "<SystemRandomness>"


SYSTEM_RANDOMNESS: Final[Randomness] = SystemRandomness()
