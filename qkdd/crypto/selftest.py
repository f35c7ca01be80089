"""Known-answer self-tests the daemon runs at start with the PQC backend it selected.

Each check feeds a published test vector (NIST ACVP ML-KEM/ML-DSA, RFC 7748, RFC 5869,
RFC 8439, NIST GCM) through the same code paths the daemon uses and compares the
result; a mismatch raises :class:`SelfTestFailed` naming the primitive, and the daemon
must not start. Large expected values are recorded as SHA-256 hashes.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from qkdd.crypto import (
    AT_REST_AEAD_ALGORITHM,
    KDF_ALGORITHM,
    KEM_ALGORITHM,
    KEM_CIPHERTEXT_SIZE,
    KEX_ALGORITHM,
    SESSION_AEAD_ALGORITHM,
    SIGNATURE_ALGORITHM,
    Aead,
    AuthenticationFailed,
    CryptoError,
    PqcBackend,
    X25519KeyPair,
    constant_time_equal,
    hkdf,
)


class SelfTestFailed(CryptoError):
    """A known-answer self-test gave the wrong result: this crypto stack must not be used."""


# -- ML-KEM-768: first vector (count = 0) of NIST kat_MLKEM_768.rsp ------------------------

_KEM_SEED = bytes.fromhex(  # d || z
    "6dbbc4375136df3b07f7c70e639e223e177e7fd53b161b3f4d57791794f12624"
    "f696484048ec21f96cf50a56d0759c448f3779752f0383d37449690694cf7a68"
)
_KEM_PUBLIC_KEY_SHA256 = "4bec4730f26273c6319ef7387dd4758315240a9394cd89264b148b9113060b61"
_KEM_CIPHERTEXT = base64.b64decode(
    "FqYf+EeH/UpfGcpZs2V9s6EGpzKeLWJ0ei74UUkWMQm+//a8sz32YjC49nJc5xn1j3EZbolb78l1TZ8EJJRkjIim"
    "7UxM8T8vr59lHeedrgd3M8sjX53ORIl3/ULVSGt9/fbXvZFysUJHZV008QUk1GlHjZqWOfNNKs3m48BI1Sswi2Yk"
    "X+mijN55g7nRTAOzdxX+OXDNNXNHca3XqptYz7Ct+MYT3q+ysx9uXINk1DNOk6+OSUP6lHzGdmdEfP/QNiNa+up/"
    "YDyy6id7l9rfgup0b2snOW3QjIXP+TBKLlzgVx/eLpJnFryfjk1HS06P00sNwoN2IE6jBtMOmm3YglC3mCPncxny"
    "7zp3cE9And6L622xvkqfJa4uFZOd7fGxGlqlH8/wQGi0bUL7uv0kmCZMyk+3iw8qsWLH71aYdaExSLmksLnaF4fK"
    "CnAz4+yhNHHby74V408rUGW5lf4iHCt6wVAzTRTmjtxeBJZj3jYvro014kwgLF+tIVPNBE6pYqOI8DDNxd7Bw0Ix"
    "g7Fzwysi9YAK5F6OicjuRhfOJOYPJ4v9HqD4+pJIa2+EkSfamb575MZh4romZp1qz2GaMwVoCWg+JKLynjO+f1+a"
    "xmhpfllIjpuGhZVs2Ht8RxCdYDICwgFHLsgp6mSSLk0OrdSktaj7BuD0vyWlnO1UVXOI3NkbOHy2FIWX7fhKIllY"
    "AYUcpLnp4Jb9/JbyRErJ8SR6XmQHh/yiPj6yHsEFnEKmWANEHfASeQE8RI38Pu38M1Xu4fUQCGoRX4VMNtt5eoXt"
    "4ZpHOjPnmoD29/ZGfhsNhm/g5XqKvTeZNKampJL18yWU1D3i7C7qgUh5gbtjlL+m31SY10xtsiAqY0ijJfvJBrjo"
    "ILsAZZou4SdAsUsuNvTF2rQRwM0JbF5juk1Iqp6Ssx9E3JfA/vZhvPTbiV8XRhPZ1e2eg2ZXdF7J3ux68nPOyH7w"
    "6vgF2hvIQBYIgQuKhvlSxjJtCfyNHX/YO06GLgUFjod8BWzFRl7DGSsDpMM8xrFlWNJILV+EUYy7xSaq5uiEAxfv"
    "s6GYLD0XGe8V0Q+LB3xcaGgL5tPZLoaqpus3jPBVnUkyVxR7VXMPSaBCMlrwZrT5dBuf/11Hly1ayvUra+pOnjVO"
    "+USLYvbSoTF2daki4U4xV41sq1oJpxqycNhlFRuKtMYStf1dzJfkVBmhz7a4ua7GD2JgIJj5HwfCOBhmV5Qcehjk"
    "1+4iDwItX//SkYU7nAY+VhtxdveiNc5FvIbORxgIbflTbFpfCr8EwKhNgr32lVKt4xNUM8EKG6adaIlp5tnc5U07"
    "Oq46fyq5BOZX4/sFJB+sEQqgfmLMOZHX0NYym1q51p1zNsDRSFiMnwkhMluF31/TDbgKVqNyQ3IVNkGWGqfgQr8m"
    "Rv9GAiwFnVeUw6S3+QxBDecaUjHdm4O70Oa9qxv55i8="
)
_KEM_SHARED_SECRET = bytes.fromhex(
    "b408d5d115713f0a93047dbbea832e4340787686d59a9a2d106bd662ba0aa035"
)

# -- ML-DSA-65: first vector (count = 0) of NIST kat_MLDSA_65_det_pure.rsp -----------------

_SIGNATURE_SEED = bytes.fromhex(  # xi
    "f696484048ec21f96cf50a56d0759c448f3779752f0383d37449690694cf7a68"
)
_SIGNATURE_PUBLIC_KEY_SHA256 = "ab0f27cfe4f84d2a9fa74d48467439df9e5dd8401f8715f82ed70e43a371400a"

# -- X25519: RFC 7748 section 5.2, first vector -------------------------------------------

_X25519_SCALAR = bytes.fromhex("a546e36bf0527c9d3b16154b82465edd62144c0ac1fc5a18506a2244ba449ac4")
_X25519_U = bytes.fromhex("e6db6867583030db3594c1a424b15f7c726624ec26b3353b10a903a6d0ab1c4c")
_X25519_OUT = bytes.fromhex("c3da55379de9c6908e94ea4df28d084f32eccf03491c71f754b4075577a28552")

# -- HKDF-SHA256: RFC 5869 test case 1 ------------------------------------------------------

_HKDF_OKM = bytes.fromhex(
    "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
)

# -- ChaCha20-Poly1305: RFC 8439 section 2.8.2 ----------------------------------------------

_CHACHA_PLAINTEXT = (
    b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for "
    b"the future, sunscreen would be it."
)
_CHACHA_NONCE = bytes.fromhex("070000004041424344454647")
_CHACHA_AAD = bytes.fromhex("50515253c0c1c2c3c4c5c6c7")
_CHACHA_SEALED_SHA256 = "4e54427e462f3beb69677d39865c5da8d57f603a85f7bf71368dce8ec9b9933c"

# -- AES-256-GCM: NIST GCM spec test case 14 (zero key, zero IV, one zero block) -----------

_GCM_SEALED = bytes.fromhex("cea7403d4d606b6e074ec5d3baf39d18d0d1c8a799996bf0265b98b5d48ab919")


def _expect(condition: bool, primitive: str, what: str) -> None:
    if not condition:
        raise SelfTestFailed(f"{primitive} self-test failed: {what}")


def _sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _check_kem(backend: PqcBackend) -> None:
    key = backend.kem_from_seed(_KEM_SEED)
    _expect(
        _sha256_hex(key.public_bytes) == _KEM_PUBLIC_KEY_SHA256,
        KEM_ALGORITHM,
        "key generation from the NIST seed gave the wrong public key",
    )
    _expect(
        constant_time_equal(key.decapsulate(_KEM_CIPHERTEXT), _KEM_SHARED_SECRET),
        KEM_ALGORITHM,
        "decapsulation of the NIST ciphertext gave the wrong shared secret",
    )
    # FIPS 203 implicit rejection: a modified ciphertext yields J(z || c) = SHAKE256(z||c)
    # truncated to 32 bytes, computed here independently of the backend.
    tampered = bytes([_KEM_CIPHERTEXT[0] ^ 1]) + _KEM_CIPHERTEXT[1:]
    z = _KEM_SEED[32:]
    _expect(
        constant_time_equal(key.decapsulate(tampered), hashlib.shake_256(z + tampered).digest(32)),
        KEM_ALGORITHM,
        "a tampered ciphertext was not implicitly rejected",
    )
    shared, ciphertext = backend.kem_encapsulate(key.public_bytes)
    _expect(
        len(ciphertext) == KEM_CIPHERTEXT_SIZE
        and constant_time_equal(key.decapsulate(ciphertext), shared),
        KEM_ALGORITHM,
        "encapsulate/decapsulate round trip disagreed",
    )


def _check_signature(backend: PqcBackend) -> None:
    key = backend.signing_key_from_seed(_SIGNATURE_SEED)
    _expect(
        _sha256_hex(key.public_bytes) == _SIGNATURE_PUBLIC_KEY_SHA256,
        SIGNATURE_ALGORITHM,
        "key generation from the NIST seed gave the wrong public key",
    )
    message, context = b"qkdd self-test", b"qkdd/selftest"
    signature = key.sign(message, context)
    try:
        backend.verify(key.public_bytes, message, signature, context)
    except AuthenticationFailed:
        raise SelfTestFailed(
            f"{SIGNATURE_ALGORITHM} self-test failed: a fresh signature did not verify"
        ) from None
    tampered = bytes([signature[0] ^ 1]) + signature[1:]
    for bad_signature, bad_context, what in (
        (tampered, context, "a tampered signature"),
        (signature, b"qkdd/other", "a signature under another context"),
    ):
        try:
            backend.verify(key.public_bytes, message, bad_signature, bad_context)
        except AuthenticationFailed:
            continue
        raise SelfTestFailed(f"{SIGNATURE_ALGORITHM} self-test failed: {what} was accepted")


def _check_x25519(_backend: PqcBackend) -> None:
    # The vector goes through pyca directly (X25519KeyPair only makes fresh keys),
    # then the wrapper itself must agree with itself.
    out = X25519PrivateKey.from_private_bytes(_X25519_SCALAR).exchange(
        X25519PublicKey.from_public_bytes(_X25519_U)
    )
    _expect(out == _X25519_OUT, KEX_ALGORITHM, "RFC 7748 vector gave the wrong output")
    alice, bob = X25519KeyPair(), X25519KeyPair()
    _expect(
        constant_time_equal(alice.exchange(bob.public_bytes), bob.exchange(alice.public_bytes)),
        KEX_ALGORITHM,
        "the two sides of an exchange disagreed",
    )


def _check_hkdf(_backend: PqcBackend) -> None:
    okm = hkdf(bytes(range(13)), b"\x0b" * 22, bytes(range(0xF0, 0xFA)), 42)
    _expect(okm == _HKDF_OKM, KDF_ALGORITHM, "RFC 5869 test case 1 gave the wrong output")


def _flip_last_bit(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 1])


def _check_aead(_backend: PqcBackend) -> None:
    chacha = Aead(bytes(range(0x80, 0xA0)), SESSION_AEAD_ALGORITHM)
    chacha_sealed = chacha.seal(_CHACHA_NONCE, _CHACHA_PLAINTEXT, _CHACHA_AAD)
    _expect(
        _sha256_hex(chacha_sealed) == _CHACHA_SEALED_SHA256,
        SESSION_AEAD_ALGORITHM,
        "RFC 8439 vector gave the wrong ciphertext or tag",
    )
    _expect(
        chacha.open(_CHACHA_NONCE, chacha_sealed, _CHACHA_AAD) == _CHACHA_PLAINTEXT,
        SESSION_AEAD_ALGORITHM,
        "RFC 8439 vector did not decrypt",
    )
    gcm = Aead(bytes(32), AT_REST_AEAD_ALGORITHM)
    _expect(
        gcm.seal(bytes(12), bytes(16), b"") == _GCM_SEALED,
        AT_REST_AEAD_ALGORITHM,
        "NIST GCM test case 14 gave the wrong ciphertext or tag",
    )
    gcm_nonce, gcm_aad = bytes(range(12)), b"qkdd at rest"
    gcm_sealed = gcm.seal(gcm_nonce, b"key material", gcm_aad)
    _expect(
        gcm.open(gcm_nonce, gcm_sealed, gcm_aad) == b"key material",
        AT_REST_AEAD_ALGORITHM,
        "round trip did not give back the plaintext",
    )
    for aead, nonce, sealed, aad in (
        (chacha, _CHACHA_NONCE, _flip_last_bit(chacha_sealed), _CHACHA_AAD),
        (gcm, gcm_nonce, _flip_last_bit(gcm_sealed), gcm_aad),
    ):
        try:
            aead.open(nonce, sealed, aad)
        except AuthenticationFailed:
            continue
        raise SelfTestFailed(f"{aead.algorithm} self-test failed: a tampered message was accepted")


_CHECKS: tuple[tuple[str, Callable[[PqcBackend], None]], ...] = (
    (KEM_ALGORITHM, _check_kem),
    (SIGNATURE_ALGORITHM, _check_signature),
    (KEX_ALGORITHM, _check_x25519),
    (KDF_ALGORITHM, _check_hkdf),
    (f"{SESSION_AEAD_ALGORITHM} / {AT_REST_AEAD_ALGORITHM}", _check_aead),
)


def run_self_tests(backend: PqcBackend) -> None:
    """Raise SelfTestFailed (naming the primitive) unless every known answer matches."""
    for primitive, check in _CHECKS:
        try:
            check(backend)
        except SelfTestFailed:
            raise
        except CryptoError as exc:
            raise SelfTestFailed(
                f"{primitive} self-test failed with the {backend.name} backend: {exc}"
            ) from exc
