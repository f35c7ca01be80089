"""The PQC backends: behaviour, failures, byte-for-byte interoperability between
pyca/cryptography and liboqs, and choosing a backend (liboqs found without importing it)."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from backends import HAVE_LIBOQS, needs_liboqs
from hypothesis import given, settings
from hypothesis import strategies as st
from timeouts import timeout

from qkdd.crypto import (
    KEM_CIPHERTEXT_SIZE,
    KEM_PUBLIC_KEY_SIZE,
    KEM_SEED_SIZE,
    KEM_SHARED_SECRET_SIZE,
    SIGNATURE_PUBLIC_KEY_SIZE,
    SIGNATURE_SEED_SIZE,
    SIGNATURE_SIZE,
    AuthenticationFailed,
    BackendUnavailable,
    CryptoError,
    PqcBackend,
    SeedNotSupported,
    liboqs_probe,
)
from qkdd.crypto.liboqs_probe import find_liboqs
from qkdd.crypto.select import select_backend

AVAILABLE = ["cryptography"] + (["oqs"] if HAVE_LIBOQS else [])
PAIRS = [pytest.param(a, b, id=f"{a}->{b}") for a, b in itertools.product(AVAILABLE, repeat=2)]


def flip(data: bytes, index: int = 0) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1 :]


# -- Each backend on its own -----------------------------------------------------------


def test_backend_names(backend: PqcBackend) -> None:
    assert backend.name in ("cryptography", "liboqs")
    assert backend.name in repr(backend)


def test_kem_round_trip_and_sizes(backend: PqcBackend) -> None:
    key = backend.kem_generate()
    assert len(key.public_bytes) == KEM_PUBLIC_KEY_SIZE
    shared, ciphertext = backend.kem_encapsulate(key.public_bytes)
    assert len(shared) == KEM_SHARED_SECRET_SIZE
    assert len(ciphertext) == KEM_CIPHERTEXT_SIZE
    assert key.decapsulate(ciphertext) == shared
    # Fresh keys and fresh encapsulations.
    assert backend.kem_generate().public_bytes != key.public_bytes
    assert backend.kem_encapsulate(key.public_bytes)[1] != ciphertext


def test_kem_from_seed_is_deterministic(backend: PqcBackend) -> None:
    seed = os.urandom(KEM_SEED_SIZE)
    public = backend.kem_from_seed(seed).public_bytes
    assert backend.kem_from_seed(seed).public_bytes == public
    assert backend.kem_from_seed(flip(seed)).public_bytes != public


def test_kem_tampered_ciphertext_is_implicitly_rejected(backend: PqcBackend) -> None:
    seed = os.urandom(KEM_SEED_SIZE)
    key = backend.kem_from_seed(seed)
    shared, ciphertext = backend.kem_encapsulate(key.public_bytes)
    for index in (0, KEM_CIPHERTEXT_SIZE // 2, KEM_CIPHERTEXT_SIZE - 1):
        tampered = flip(ciphertext, index)
        rejected = key.decapsulate(tampered)
        assert rejected != shared
        # FIPS 203: the rejection key is J(z || c) = SHAKE256(z || c), 32 bytes.
        assert rejected == hashlib.shake_256(seed[32:] + tampered).digest(32)


@pytest.mark.parametrize("size", [0, KEM_SEED_SIZE - 1, KEM_SEED_SIZE + 1, 32])
def test_kem_seed_of_wrong_size(backend: PqcBackend, size: int) -> None:
    with pytest.raises(CryptoError, match="seed must be 64 bytes"):
        backend.kem_from_seed(bytes(size))


@pytest.mark.parametrize("size", [0, KEM_PUBLIC_KEY_SIZE - 1, KEM_PUBLIC_KEY_SIZE + 1])
def test_kem_public_key_of_wrong_size(backend: PqcBackend, size: int) -> None:
    with pytest.raises(CryptoError, match="public key"):
        backend.kem_encapsulate(bytes(size))


def test_kem_public_key_failing_the_modulus_check(backend: PqcBackend) -> None:
    # Every 12-bit coefficient 0xfff >= q = 3329: FIPS 203 says reject the key.
    with pytest.raises(CryptoError):
        backend.kem_encapsulate(b"\xff" * KEM_PUBLIC_KEY_SIZE)


@pytest.mark.parametrize("size", [0, KEM_CIPHERTEXT_SIZE - 1, KEM_CIPHERTEXT_SIZE + 1])
def test_kem_ciphertext_of_wrong_size(backend: PqcBackend, size: int) -> None:
    key = backend.kem_generate()
    with pytest.raises(CryptoError, match="ciphertext must be 1088 bytes"):
        key.decapsulate(bytes(size))


def test_signature_round_trip(backend: PqcBackend) -> None:
    key = backend.signing_key_from_seed(os.urandom(SIGNATURE_SEED_SIZE))
    assert len(key.public_bytes) == SIGNATURE_PUBLIC_KEY_SIZE
    for message, context in ((b"hello", b"qkdd/test"), (b"", b""), (b"x" * 5000, b"c" * 255)):
        signature = key.sign(message, context)
        assert len(signature) == SIGNATURE_SIZE
        assert backend.verify(key.public_bytes, message, signature, context) is None


def test_signature_failures(backend: PqcBackend) -> None:
    key = backend.signing_key_from_seed(os.urandom(SIGNATURE_SEED_SIZE))
    message, context = b"handshake transcript", b"qkdd/bootstrap"
    signature = key.sign(message, context)
    other_key = backend.signing_key_from_seed(os.urandom(SIGNATURE_SEED_SIZE))
    cases = {
        "tampered signature start": (key.public_bytes, message, flip(signature), context),
        "tampered signature end": (
            key.public_bytes,
            message,
            flip(signature, SIGNATURE_SIZE - 1),
            context,
        ),
        "tampered message": (key.public_bytes, flip(message), signature, context),
        "wrong context": (key.public_bytes, message, signature, b"qkdd/other"),
        "empty context": (key.public_bytes, message, signature, b""),
        "context too long": (key.public_bytes, message, signature, b"c" * 256),
        "other key": (other_key.public_bytes, message, signature, context),
        "short signature": (key.public_bytes, message, signature[:-1], context),
        "long signature": (key.public_bytes, message, signature + b"\x00", context),
        "empty signature": (key.public_bytes, message, b"", context),
        "short public key": (key.public_bytes[:-1], message, signature, context),
        "long public key": (key.public_bytes + b"\x00", message, signature, context),
    }
    for name, arguments in cases.items():
        with pytest.raises(AuthenticationFailed):
            backend.verify(*arguments)
            pytest.fail(f"{name} was accepted")


@pytest.mark.parametrize("size", [0, SIGNATURE_SEED_SIZE - 1, SIGNATURE_SEED_SIZE + 1, 64])
def test_signature_seed_of_wrong_size(backend: PqcBackend, size: int) -> None:
    with pytest.raises(CryptoError, match="seed must be 32 bytes"):
        backend.signing_key_from_seed(bytes(size))


@pytest.mark.parametrize(
    "choice",
    [
        "cryptography",
        pytest.param("oqs", id="liboqs", marks=needs_liboqs),
    ],
)
def test_sign_with_too_long_context(choice: str) -> None:
    backend = select_backend(choice)
    key = backend.signing_key_from_seed(os.urandom(SIGNATURE_SEED_SIZE))
    with pytest.raises(CryptoError, match="context"):
        key.sign(b"m", b"c" * 256)


def test_reprs_hide_secrets(backend: PqcBackend) -> None:
    kem_seed, sig_seed = os.urandom(KEM_SEED_SIZE), os.urandom(SIGNATURE_SEED_SIZE)
    for key, seed in (
        (backend.kem_from_seed(kem_seed), kem_seed),
        (backend.signing_key_from_seed(sig_seed), sig_seed),
    ):
        text = repr(key)
        assert "secret hidden" in text
        assert seed.hex() not in text and seed.hex()[:16] not in text


# -- Between backends ----------------------------------------------------------------------


@pytest.mark.parametrize(("first", "second"), PAIRS)
def test_same_seed_same_public_keys(first: str, second: str) -> None:
    a, b = select_backend(first), select_backend(second)
    kem_seed, sig_seed = os.urandom(KEM_SEED_SIZE), os.urandom(SIGNATURE_SEED_SIZE)
    assert a.kem_from_seed(kem_seed).public_bytes == b.kem_from_seed(kem_seed).public_bytes
    assert (
        a.signing_key_from_seed(sig_seed).public_bytes
        == b.signing_key_from_seed(sig_seed).public_bytes
    )


@pytest.mark.parametrize(("first", "second"), PAIRS)
def test_encapsulation_interoperates(first: str, second: str) -> None:
    a, b = select_backend(first), select_backend(second)
    seed = os.urandom(KEM_SEED_SIZE)
    receiver_a, receiver_b = a.kem_from_seed(seed), b.kem_from_seed(seed)
    shared, ciphertext = a.kem_encapsulate(receiver_b.public_bytes)
    assert receiver_b.decapsulate(ciphertext) == shared
    assert receiver_a.decapsulate(ciphertext) == shared
    ephemeral = b.kem_generate()
    shared, ciphertext = a.kem_encapsulate(ephemeral.public_bytes)
    assert ephemeral.decapsulate(ciphertext) == shared
    # Implicit rejection agrees too.
    assert receiver_b.decapsulate(flip(ciphertext)) == receiver_a.decapsulate(flip(ciphertext))


@pytest.mark.parametrize(("first", "second"), PAIRS)
@settings(max_examples=15, deadline=None)
@given(message=st.binary(max_size=2000), context=st.binary(max_size=255))
def test_signatures_interoperate(first: str, second: str, message: bytes, context: bytes) -> None:
    signer, verifier = select_backend(first), select_backend(second)
    seed = bytes(SIGNATURE_SEED_SIZE - 1) + bytes([len(context) % 256])
    key = signer.signing_key_from_seed(seed)
    signature = key.sign(message, context)
    public = verifier.signing_key_from_seed(seed).public_bytes
    verifier.verify(public, message, signature, context)
    with pytest.raises(AuthenticationFailed):
        verifier.verify(public, message + b"!", signature, context)
    with pytest.raises(AuthenticationFailed):
        verifier.verify(public, message, signature, context + b"!" if len(context) < 255 else b"")


# -- liboqs-specific: seeded ML-DSA through liboqs's RNG hook ------------------------------


@needs_liboqs
def test_seed_injection_is_confined_to_its_thread() -> None:
    backend = select_backend("oqs")
    pyca = select_backend("cryptography")
    seed = os.urandom(SIGNATURE_SEED_SIZE)
    others: list[bytes] = []
    sig = backend._signature_type("ML-DSA-65")  # type: ignore[attr-defined]

    def operation() -> bytes:
        # Other threads drawing liboqs randomness while the hook is in place must get
        # real entropy, not the seed, and must not consume it.
        workers = [
            threading.Thread(target=lambda: others.append(backend.kem_generate().public_bytes))
            for _ in range(3)
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        return bytes(sig.generate_keypair())

    injector = backend._injector  # type: ignore[attr-defined]
    # One injector (one lock) per process, however many backends: the hook is global.
    assert type(backend)()._injector is injector  # type: ignore[attr-defined]
    public = injector.run([seed], operation, "test")
    assert public == pyca.signing_key_from_seed(seed).public_bytes
    assert len(set(others)) == 3


@needs_liboqs
def test_unplanned_randomness_draw_raises_seed_not_supported() -> None:
    backend = select_backend("oqs")
    injector = backend._injector  # type: ignore[attr-defined]
    seed = os.urandom(SIGNATURE_SEED_SIZE)
    # ML-KEM keygen draws 64 bytes, not the planned 32: the hand-over must be refused.
    with pytest.raises(SeedNotSupported, match='backend = "cryptography"'):
        injector.run([seed], backend.kem_generate, "test")
    # And the hook is gone afterwards: draws on this thread no longer reach it.
    signing_key = backend.signing_key_from_seed(seed)
    injector._owner, injector._drawn = threading.get_ident(), []
    try:
        backend.kem_generate()
        signing_key.sign(b"m", b"")
        assert injector._drawn == []
    finally:
        injector._owner = None


# -- Choosing a backend ----------------------------------------------------------------------


def test_unknown_backend_choice() -> None:
    with pytest.raises(BackendUnavailable, match="unknown PQC backend"):
        select_backend("openssl")


def test_forced_cryptography_backend() -> None:
    assert select_backend("cryptography").name == "cryptography"


def test_auto_prefers_liboqs_when_found() -> None:
    assert select_backend("auto").name == ("liboqs" if HAVE_LIBOQS else "cryptography")


def test_candidate_paths_mirror_liboqs_python_order(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    hits = {"oqs": "liboqs.so.9", "liboqs": "liboqs.so.8"}
    monkeypatch.setattr(liboqs_probe.ctypes.util, "find_library", hits.get)
    monkeypatch.setenv("OQS_INSTALL_PATH", str(tmp_path))
    assert liboqs_probe.candidate_paths() == [
        "liboqs.so.8",
        "liboqs.so.9",
        str(tmp_path / "lib" / "liboqs.so"),
        str(tmp_path / "lib64" / "liboqs.so"),
    ]
    monkeypatch.delenv("OQS_INSTALL_PATH")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(liboqs_probe.ctypes.util, "find_library", lambda name: None)
    assert liboqs_probe.candidate_paths() == [
        str(tmp_path / "_oqs" / "lib" / "liboqs.so"),
        str(tmp_path / "_oqs" / "lib64" / "liboqs.so"),
    ]


def test_probe_skips_files_that_do_not_load(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(liboqs_probe.ctypes.util, "find_library", lambda name: None)
    monkeypatch.setenv("OQS_INSTALL_PATH", str(tmp_path))
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "liboqs.so").write_text("not an ELF file")
    assert liboqs_probe.find_liboqs() is None
    assert "OQS_INSTALL_PATH" in liboqs_probe.explain_missing()


_CHOOSE_IN_FRESH_PROCESS = textwrap.dedent(
    """
    import json, sys
    from qkdd.crypto import BackendUnavailable
    from qkdd.crypto.liboqs_probe import find_liboqs
    from qkdd.crypto.select import select_backend
    result = {"found": find_liboqs(), "oqs_imported_by_probe": "oqs" in sys.modules}
    try:
        result["forced"] = select_backend("oqs").name
    except BackendUnavailable as exc:
        result["forced_error"] = str(exc)
    result["auto"] = select_backend("auto").name
    result["oqs_imported"] = "oqs" in sys.modules
    print(json.dumps(result))
    """
)


def _choose_in_subprocess(install_path: str, home: Path) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    env.update(OQS_INSTALL_PATH=install_path, HOME=str(home))
    completed = subprocess.run(
        [sys.executable, "-c", _CHOOSE_IN_FRESH_PROCESS],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout(60),
        check=True,
    )
    return json.loads(completed.stdout.strip().splitlines()[-1])


def test_without_liboqs_oqs_is_never_imported(tmp_path: Path) -> None:
    import ctypes.util

    if ctypes.util.find_library("oqs") or ctypes.util.find_library("liboqs"):
        pytest.skip("liboqs is in the system linker path here; cannot hide it")
    empty = tmp_path / "empty"
    empty.mkdir()
    result = _choose_in_subprocess(str(empty), tmp_path)
    assert result["found"] is None
    assert "forced" not in result
    error = str(result["forced_error"])
    assert "liboqs C library not found" in error and "OQS_INSTALL_PATH" in error
    assert str(empty) in error
    assert result["auto"] == "cryptography"
    assert result["oqs_imported"] is False


@needs_liboqs
def test_with_liboqs_probe_finds_it_before_importing_oqs(tmp_path: Path) -> None:
    found = find_liboqs()
    assert found is not None
    install_path = str(Path(found).parent.parent)
    result = _choose_in_subprocess(install_path, tmp_path)
    assert result["found"] is not None
    assert result["oqs_imported_by_probe"] is False
    assert result["forced"] == "liboqs"
    assert result["auto"] == "liboqs"
    assert result["oqs_imported"] is True
