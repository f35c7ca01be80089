"""ML-KEM-768 and ML-DSA-65 from the liboqs C library through liboqs-python.

``oqs`` is imported only after :mod:`qkdd.crypto.liboqs_probe` has loaded liboqs
itself (liboqs-python would otherwise try to download and build it), so importing this
module is always safe; :class:`OqsBackend` raises BackendUnavailable when it cannot run.

Seeds. ML-KEM keys load from the FIPS 203 seed d||z through ``OQS_KEM_keypair_derand``.
liboqs has no ML-DSA keygen-from-seed call, but FIPS 204 ML-DSA.KeyGen is exactly
"draw xi (32 bytes) from the RNG, run KeyGen_internal(xi)", and liboqs lets a caller
install the RNG (``OQS_randombytes_custom_algorithm``, which its own KAT tests use). So a
seeded ML-DSA key is made by handing xi to that one 32-byte draw. The hand-over is
checked (exactly the planned draws, on this thread; other threads get ``os.urandom``
meanwhile) and the start-up self-test compares the result with the NIST vectors; if the
check fails the caller gets SeedNotSupported.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import threading
from collections.abc import Callable
from types import ModuleType
from typing import Any, TypeVar

from qkdd.crypto import (
    KEM_ALGORITHM,
    KEM_CIPHERTEXT_SIZE,
    KEM_PUBLIC_KEY_SIZE,
    KEM_SEED_SIZE,
    SIGNATURE_ALGORITHM,
    SIGNATURE_PUBLIC_KEY_SIZE,
    SIGNATURE_SEED_SIZE,
    AuthenticationFailed,
    BackendUnavailable,
    CryptoError,
    KemPrivateKey,
    PqcBackend,
    SeedNotSupported,
    SigningKey,
)
from qkdd.crypto.liboqs_probe import LiboqsLibrary, explain_missing, probe

_T = TypeVar("_T")
_MAX_CONTEXT_SIZE = 255  # FIPS 204: ctx is at most 255 bytes
_SIGN_RANDOMNESS_SIZE = 32  # FIPS 204 rnd
_USE_CRYPTOGRAPHY = 'use backend = "cryptography"'


@functools.cache
def _load_oqs() -> tuple[ModuleType, LiboqsLibrary]:
    """Import liboqs-python once, and only where the C library is already loadable."""
    found = probe()
    if found is None:
        raise BackendUnavailable(explain_missing())
    # liboqs-python logs chatter at INFO to stdout on import; keep warnings and errors.
    logging.getLogger("oqs.oqs").addFilter(lambda record: record.levelno >= logging.WARNING)
    try:
        # Late on purpose: see the module docstring.
        import oqs  # type: ignore[import-untyped,import-not-found]
    except ImportError:
        raise BackendUnavailable(
            f"liboqs {found.version} is installed at {found.path} but liboqs-python is not: "
            f"pip install 'liboqs-python>=0.14', or {_USE_CRYPTOGRAPHY}"
        ) from None
    except (Exception, SystemExit) as exc:  # liboqs-python exits when it cannot load
        raise BackendUnavailable(
            f"liboqs-python failed to load liboqs {found.version} from {found.path} ({exc}); "
            f"{_USE_CRYPTOGRAPHY}"
        ) from None
    return oqs, found


class _RandomnessInjector:
    """Hands planned bytes to liboqs's ``OQS_randombytes`` for one operation on one thread.

    liboqs's RNG hook is process-wide, so operations are serialised by a lock, and any
    other thread drawing randomness while the hook is in place gets ``os.urandom``.
    """

    _CALLBACK = ctypes.CFUNCTYPE(None, ctypes.POINTER(ctypes.c_uint8), ctypes.c_size_t)

    def __init__(self, native: Any) -> None:
        self._native = native
        native.OQS_randombytes_custom_algorithm.argtypes = [self._CALLBACK]
        native.OQS_randombytes_custom_algorithm.restype = None
        native.OQS_randombytes_switch_algorithm.argtypes = [ctypes.c_char_p]
        native.OQS_randombytes_switch_algorithm.restype = ctypes.c_int
        self._lock = threading.Lock()
        self._owner: int | None = None
        self._planned: list[bytes] = []
        self._drawn: list[int] = []
        self._faulty = False
        self._callback = self._CALLBACK(self._fill)  # kept alive while liboqs may call it

    def _fill(self, buffer: Any, length: int) -> None:
        try:
            if threading.get_ident() == self._owner:
                self._drawn.append(length)
                data = self._planned.pop(0) if self._planned else b""
                if len(data) != length:
                    # An unplanned draw: give it real entropy and fail the operation.
                    self._faulty = True
                    data = os.urandom(length)
            else:
                data = os.urandom(length)
            ctypes.memmove(buffer, data, length)
        except BaseException:  # an exception cannot cross into C
            self._faulty = True

    def _restore_default(self) -> None:
        # liboqs's default source is OpenSSL where it was built with it, else the OS.
        if self._native.OQS_randombytes_switch_algorithm(b"OpenSSL") != 0:
            self._native.OQS_randombytes_switch_algorithm(b"system")

    def run(self, planned: list[bytes], operation: Callable[[], _T], what: str) -> _T:
        with self._lock:
            self._owner = threading.get_ident()
            self._planned = list(planned)
            self._drawn = []
            self._faulty = False
            self._native.OQS_randombytes_custom_algorithm(self._callback)
            try:
                result = operation()
            finally:
                self._restore_default()
                self._owner = None
                self._planned = []
            expected = [len(chunk) for chunk in planned]
            if self._faulty or self._drawn != expected:
                raise SeedNotSupported(
                    f"this liboqs build does not draw its {what} randomness as FIPS 204 "
                    f"specifies (expected draws of {expected} bytes, saw {self._drawn}); "
                    f"{_USE_CRYPTOGRAPHY}"
                )
            return result


@functools.cache
def _owned_types() -> tuple[type, type]:
    """liboqs-python objects that free themselves exactly once, and never crash in repr.

    Plain ``oqs.KeyEncapsulation``/``oqs.Signature`` leak their C struct unless ``free()``
    is called, and after ``free()`` their ``repr`` reads freed memory (a traceback
    printer showing locals would crash). These free (and wipe the secret key) when the
    last reference goes, and have a constant repr.
    """
    oqs, _ = _load_oqs()

    class _Owned:
        _freed = False

        def free(self) -> None:
            if not self._freed:
                self._freed = True
                super().free()  # type: ignore[misc]

        def __del__(self) -> None:
            # Not contextlib.suppress: at interpreter exit module globals may be None.
            try:  # noqa: SIM105
                self.free()
            except Exception:
                pass

        def __repr__(self) -> str:
            return f"<liboqs {type(self).__name__} (secret hidden)>"

    kem_base: Any = oqs.KeyEncapsulation
    signature_base: Any = oqs.Signature

    class OwnedKem(_Owned, kem_base):
        pass

    class OwnedSignature(_Owned, signature_base):
        pass

    return OwnedKem, OwnedSignature


@functools.cache
def _shared_injector() -> _RandomnessInjector:
    # One per process: liboqs's RNG hook is global, so every backend shares one lock.
    oqs, _ = _load_oqs()
    return _RandomnessInjector(oqs.native())


class _OqsKemKey(KemPrivateKey):
    def __init__(self, kem: Any, public: bytes) -> None:
        self._kem = kem  # an oqs.KeyEncapsulation holding the expanded secret key
        self._public = public

    @property
    def public_bytes(self) -> bytes:
        return self._public

    def decapsulate(self, ciphertext: bytes) -> bytes:
        if len(ciphertext) != KEM_CIPHERTEXT_SIZE:
            raise CryptoError(f"ML-KEM-768 ciphertext must be {KEM_CIPHERTEXT_SIZE} bytes")
        try:
            return bytes(self._kem.decap_secret(ciphertext))
        except RuntimeError as exc:  # liboqs's decapsulation-key hash check failed
            raise CryptoError(f"ML-KEM-768 decapsulation failed: {exc}") from None


class _OqsSigningKey(SigningKey):
    def __init__(self, sig: Any, public: bytes, injector: _RandomnessInjector) -> None:
        self._sig = sig  # an oqs.Signature holding the expanded secret key
        self._public = public
        self._injector = injector

    @property
    def public_bytes(self) -> bytes:
        return self._public

    def sign(self, message: bytes, context: bytes) -> bytes:
        """Hedged ML-DSA (FIPS 204 default), as the protocol uses it."""
        if len(context) > _MAX_CONTEXT_SIZE:
            raise CryptoError(f"ML-DSA context must be at most {_MAX_CONTEXT_SIZE} bytes")
        try:
            return bytes(self._sig.sign_with_ctx_str(message, context))
        except RuntimeError as exc:
            raise CryptoError(f"ML-DSA-65 signing failed: {exc}") from None

    def sign_deterministic(self, message: bytes, context: bytes) -> bytes:
        """FIPS 204 deterministic ML-DSA (rnd = 32 zero bytes), for known-answer tests."""
        return self._injector.run(
            [bytes(_SIGN_RANDOMNESS_SIZE)],
            lambda: self.sign(message, context),
            "ML-DSA signing",
        )


class OqsBackend(PqcBackend):
    """liboqs through liboqs-python; ``library_path``/``library_version`` say which one."""

    name = "liboqs"

    def __init__(self) -> None:
        oqs, found = _load_oqs()
        self._kem_type, self._signature_type = _owned_types()
        self.library_path = found.path
        self.library_version = found.version
        for enabled, algorithm in (
            (oqs.get_enabled_kem_mechanisms(), KEM_ALGORITHM),
            (oqs.get_enabled_sig_mechanisms(), SIGNATURE_ALGORITHM),
        ):
            if algorithm not in enabled:
                raise BackendUnavailable(
                    f"liboqs {found.version} at {found.path} was built without {algorithm}; "
                    f"rebuild it with that algorithm enabled, or {_USE_CRYPTOGRAPHY}"
                )
        # Shared public-key objects: encapsulation and verification keep no state in them.
        self._encapsulator = self._kem_type(KEM_ALGORITHM)
        self._verifier = self._signature_type(SIGNATURE_ALGORITHM)
        if not (
            getattr(self._verifier, "sig_with_ctx_support", False)
            and hasattr(self._verifier, "sign_with_ctx_str")
        ):
            raise BackendUnavailable(
                f"liboqs {found.version} / liboqs-python cannot sign with FIPS 204 context "
                f"strings; upgrade both to >= 0.12, or {_USE_CRYPTOGRAPHY}"
            )
        self._injector = _shared_injector()

    def kem_generate(self) -> KemPrivateKey:
        kem = self._kem_type(KEM_ALGORITHM)
        return _OqsKemKey(kem, bytes(kem.generate_keypair()))

    def kem_from_seed(self, seed: bytes) -> KemPrivateKey:
        if len(seed) != KEM_SEED_SIZE:
            raise CryptoError(f"ML-KEM-768 seed must be {KEM_SEED_SIZE} bytes")
        kem = self._kem_type(KEM_ALGORITHM)
        if not hasattr(kem, "generate_keypair_seed") or kem.length_keypair_seed != KEM_SEED_SIZE:
            raise SeedNotSupported(
                "this liboqs-python cannot make an ML-KEM key from its FIPS 203 seed "
                f"(needs generate_keypair_seed, liboqs-python >= 0.14); {_USE_CRYPTOGRAPHY}"
            )
        return _OqsKemKey(kem, bytes(kem.generate_keypair_seed(seed)))

    def kem_encapsulate(self, public_key: bytes) -> tuple[bytes, bytes]:
        if len(public_key) != KEM_PUBLIC_KEY_SIZE:
            raise CryptoError(f"ML-KEM-768 public key must be {KEM_PUBLIC_KEY_SIZE} bytes")
        try:
            ciphertext, shared = self._encapsulator.encap_secret(public_key)
        except RuntimeError:  # FIPS 203 modulus check on the encapsulation key
            raise CryptoError("invalid ML-KEM-768 public key (modulus check failed)") from None
        return bytes(shared), bytes(ciphertext)

    def signing_key_from_seed(self, seed: bytes) -> SigningKey:
        if len(seed) != SIGNATURE_SEED_SIZE:
            raise CryptoError(f"ML-DSA-65 seed must be {SIGNATURE_SEED_SIZE} bytes")
        sig = self._signature_type(SIGNATURE_ALGORITHM)
        public = self._injector.run([seed], sig.generate_keypair, "ML-DSA key generation")
        return _OqsSigningKey(sig, bytes(public), self._injector)

    def verify(self, public_key: bytes, message: bytes, signature: bytes, context: bytes) -> None:
        if len(public_key) != SIGNATURE_PUBLIC_KEY_SIZE:
            raise AuthenticationFailed("ML-DSA-65 public key has the wrong size")
        if len(context) > _MAX_CONTEXT_SIZE:
            raise AuthenticationFailed("ML-DSA-65 signature did not verify (context too long)")
        if not self._verifier.verify_with_ctx_str(message, signature, context, public_key):
            raise AuthenticationFailed("ML-DSA-65 signature did not verify")
