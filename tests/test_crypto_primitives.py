"""The classical helpers of qkdd.crypto: HKDF (RFC 5869 vectors), AEAD (RFC 8439 vector,
tampering), X25519 (RFC 7748), MAC and comparisons."""

from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import given, settings
from hypothesis import strategies as st

from qkdd.crypto import (
    AEAD_TAG_SIZE,
    AT_REST_AEAD_ALGORITHM,
    SESSION_AEAD_ALGORITHM,
    Aead,
    AuthenticationFailed,
    CryptoError,
    X25519KeyPair,
    constant_time_equal,
    hkdf,
    hkdf_expand,
    hkdf_extract,
    mac,
)

# RFC 5869 appendix A, test cases 1-3 (SHA-256): ikm, salt, info, length, prk, okm.
RFC5869_CASES = [
    pytest.param(
        b"\x0b" * 22,
        bytes(range(0x00, 0x0D)),
        bytes(range(0xF0, 0xFA)),
        42,
        "077709362c2e32df0ddc3f0dc47bba6390b6c73bb50f9c3122ec844ad7c2b3e5",
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865",
        id="case1",
    ),
    pytest.param(
        bytes(range(0x00, 0x50)),
        bytes(range(0x60, 0xB0)),
        bytes(range(0xB0, 0x100)),
        82,
        "06a6b88c5853361a06104c9ceb35b45cef760014904671014a193f40c15fc244",
        "b11e398dc80327a1c8e7f78c596a49344f012eda2d4efad8a050cc4c19afa97c"
        "59045a99cac7827271cb41c65e590e09da3275600c2f09b8367793a9aca3db71"
        "cc30c58179ec3e87c14c01d5c1f3434f1d87",
        id="case2",
    ),
    pytest.param(
        b"\x0b" * 22,
        b"",
        b"",
        42,
        "19ef24a32c717b167f33a91d6f648bdf96596776afdb6377ac434c1c293ccb04",
        "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8",
        id="case3",
    ),
]


@pytest.mark.parametrize(("ikm", "salt", "info", "length", "prk", "okm"), RFC5869_CASES)
def test_hkdf_rfc5869(
    ikm: bytes, salt: bytes, info: bytes, length: int, prk: str, okm: str
) -> None:
    assert hkdf_extract(salt, ikm).hex() == prk
    assert hkdf_expand(bytes.fromhex(prk), info, length).hex() == okm
    assert hkdf(salt, ikm, info, length).hex() == okm
    # The one-block fast path must agree with the first block of the general one.
    assert hkdf(salt, ikm, info, 32).hex() == okm[:64]


@settings(max_examples=60, deadline=None)
@given(
    ikm=st.binary(max_size=100),
    salt=st.binary(max_size=80),
    info=st.binary(max_size=80),
    length=st.integers(min_value=1, max_value=255 * 32),
)
def test_hkdf_agrees_with_pyca(ikm: bytes, salt: bytes, info: bytes, length: int) -> None:
    expected = HKDF(hashes.SHA256(), length, salt or None, info).derive(ikm)
    assert hkdf(salt, ikm, info, length) == expected


@pytest.mark.parametrize("length", [0, -1, 255 * 32 + 1])
def test_hkdf_length_out_of_range(length: int) -> None:
    with pytest.raises(CryptoError, match="out of range"):
        hkdf_expand(bytes(32), b"", length)


def test_chacha20_poly1305_rfc8439_vector() -> None:
    plaintext = (
        b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for "
        b"the future, sunscreen would be it."
    )
    nonce = bytes.fromhex("070000004041424344454647")
    aad = bytes.fromhex("50515253c0c1c2c3c4c5c6c7")
    sealed = Aead(bytes(range(0x80, 0xA0))).seal(nonce, plaintext, aad)
    assert sealed[:-AEAD_TAG_SIZE].hex() == (
        "d31a8d34648e60db7b86afbc53ef7ec2a4aded51296e08fea9e2b5a736ee62d6"
        "3dbea45e8ca9671282fafb69da92728b1a71de0a9e060b2905d6a5b67ecd3b36"
        "92ddbd7f2d778b8c9803aee328091b58fab324e4fad675945585808b4831d7bc"
        "3ff4def08e4b7a9de576d26586cec64b6116"
    )
    assert sealed[-AEAD_TAG_SIZE:].hex() == "1ae10b594f09e26a7e902ecbd0600691"


def test_aes256_gcm_nist_vector() -> None:
    # NIST GCM specification, test case 14.
    sealed = Aead(bytes(32), AT_REST_AEAD_ALGORITHM).seal(bytes(12), bytes(16), b"")
    assert sealed.hex() == "cea7403d4d606b6e074ec5d3baf39d18d0d1c8a799996bf0265b98b5d48ab919"


@pytest.mark.parametrize("algorithm", [SESSION_AEAD_ALGORITHM, AT_REST_AEAD_ALGORITHM])
def test_aead_rejects_any_tampering(algorithm: str) -> None:
    key, nonce, aad = os.urandom(32), os.urandom(12), b"header"
    aead = Aead(key, algorithm)
    sealed = aead.seal(nonce, b"some key material", aad)
    assert aead.open(nonce, sealed, aad) == b"some key material"

    def flip(data: bytes, index: int) -> bytes:
        return data[:index] + bytes([data[index] ^ 0x80]) + data[index + 1 :]

    attempts = {
        "ciphertext bit": (nonce, flip(sealed, 0), aad),
        "tag bit": (nonce, flip(sealed, len(sealed) - 1), aad),
        "truncated": (nonce, sealed[:-1], aad),
        "tag only": (nonce, sealed[-AEAD_TAG_SIZE:], aad),
        "empty": (nonce, b"", aad),
        "other nonce": (flip(nonce, 11), sealed, aad),
        "other aad": (nonce, sealed, aad + b"!"),
        "no aad": (nonce, sealed, b""),
    }
    for name, arguments in attempts.items():
        with pytest.raises(AuthenticationFailed, match=algorithm):
            aead.open(*arguments)
            pytest.fail(f"{name} was accepted")
    with pytest.raises(AuthenticationFailed):
        Aead(os.urandom(32), algorithm).open(nonce, sealed, aad)


@pytest.mark.parametrize("size", [0, 16, 31, 33])
def test_aead_key_of_wrong_size(size: int) -> None:
    with pytest.raises(CryptoError, match="32 bytes"):
        Aead(bytes(size))


def test_aead_unknown_algorithm() -> None:
    with pytest.raises(CryptoError, match="unknown AEAD"):
        Aead(bytes(32), "AES-128-CBC")


def test_aead_repr_hides_key() -> None:
    key = os.urandom(32)
    assert key.hex() not in repr(Aead(key))


def test_x25519_exchange_agrees() -> None:
    alice, bob = X25519KeyPair(), X25519KeyPair()
    shared = alice.exchange(bob.public_bytes)
    assert shared == bob.exchange(alice.public_bytes)
    assert len(shared) == 32
    assert X25519KeyPair().exchange(bob.public_bytes) != shared
    assert "secret hidden" in repr(alice)


@pytest.mark.parametrize("size", [0, 31, 33])
def test_x25519_peer_key_of_wrong_size(size: int) -> None:
    with pytest.raises(CryptoError, match="32 bytes"):
        X25519KeyPair().exchange(bytes(size))


def test_x25519_low_order_point_is_refused() -> None:
    # u = 0 is a small-order point: the shared secret would be all zeros (RFC 7748 6.1).
    with pytest.raises(CryptoError, match="X25519"):
        X25519KeyPair().exchange(bytes(32))


def test_mac_and_constant_time_equal() -> None:
    # RFC 4231 test case 2.
    tag = mac(b"Jefe", b"what do ya want for nothing?")
    assert tag.hex() == "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
    assert constant_time_equal(tag, bytes(tag))
    assert not constant_time_equal(tag, tag[:-1] + bytes([tag[-1] ^ 1]))
