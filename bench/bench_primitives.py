"""Microseconds per operation of the primitives qkdd uses, for each available PQC backend.

Each figure is the median over many samples (each sample times a batch long enough to
dwarf the timer's resolution). The last columns compare liboqs with pyca/cryptography
and every row with a floor measured in the same run (SHA-256 of 32 bytes), so figures
from different machines can be compared.

    python bench/bench_primitives.py [--samples N] [--quick]
    OQS_INSTALL_PATH=/opt/liboqs python bench/bench_primitives.py   # include liboqs
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import time
from collections.abc import Callable

from backends import available_backends

from qkdd.crypto import (
    AT_REST_AEAD_ALGORITHM,
    Aead,
    PqcBackend,
    X25519KeyPair,
    hkdf,
)
from qkdd.crypto.selftest import run_self_tests

_MIN_BATCH_SECONDS = 200e-6


def microseconds_per_op(operation: Callable[[], object], samples: int) -> float:
    """Median µs/op over ``samples`` batches, the batch size calibrated to >= 200 µs."""
    operation()  # warm up (lazy initialisation, caches)
    batch = 1
    while True:
        start = time.perf_counter()
        for _ in range(batch):
            operation()
        if time.perf_counter() - start >= _MIN_BATCH_SECONDS:
            break
        batch *= 2
    timings = []
    for _ in range(samples):
        start = time.perf_counter()
        for _ in range(batch):
            operation()
        timings.append((time.perf_counter() - start) / batch)
    return statistics.median(timings) * 1e6


def pqc_operations(backend: PqcBackend) -> dict[str, Callable[[], object]]:
    kem_seed, sig_seed = os.urandom(64), os.urandom(32)
    receiver = backend.kem_from_seed(kem_seed)
    _, ciphertext = backend.kem_encapsulate(receiver.public_bytes)
    signer = backend.signing_key_from_seed(sig_seed)
    message, context = os.urandom(256), b"qkdd/bench"
    signature = signer.sign(message, context)
    return {
        "ML-KEM-768 keygen (fresh)": backend.kem_generate,
        "ML-KEM-768 keygen (from seed)": lambda: backend.kem_from_seed(kem_seed),
        "ML-KEM-768 encapsulate": lambda: backend.kem_encapsulate(receiver.public_bytes),
        "ML-KEM-768 decapsulate": lambda: receiver.decapsulate(ciphertext),
        "ML-DSA-65 keygen (from seed)": lambda: backend.signing_key_from_seed(sig_seed),
        "ML-DSA-65 sign (256 B)": lambda: signer.sign(message, context),
        "ML-DSA-65 verify (256 B)": lambda: backend.verify(
            signer.public_bytes, message, signature, context
        ),
        "start-up self-tests (all)": lambda: run_self_tests(backend),
    }


def classical_operations() -> dict[str, Callable[[], object]]:
    peer = X25519KeyPair()
    chacha, gcm = Aead(os.urandom(32)), Aead(os.urandom(32), AT_REST_AEAD_ALGORITHM)
    nonce, aad = os.urandom(12), b"header"
    small, kib = os.urandom(32), os.urandom(1024)
    sealed_kib = chacha.seal(nonce, kib, aad)
    ikm, salt = os.urandom(64), os.urandom(32)
    return {
        "X25519 keygen + exchange": lambda: X25519KeyPair().exchange(peer.public_bytes),
        "HKDF-SHA256 (64 B in, 32 B out)": lambda: hkdf(salt, ikm, b"qkdd/bench", 32),
        "HKDF-SHA256 (64 B in, 96 B out)": lambda: hkdf(salt, ikm, b"qkdd/bench", 96),
        "ChaCha20-Poly1305 seal 32 B": lambda: chacha.seal(nonce, small, aad),
        "ChaCha20-Poly1305 seal 1 KiB": lambda: chacha.seal(nonce, kib, aad),
        "ChaCha20-Poly1305 open 1 KiB": lambda: chacha.open(nonce, sealed_kib, aad),
        "AES-256-GCM seal 1 KiB": lambda: gcm.seal(nonce, kib, aad),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=201, help="batches per figure")
    parser.add_argument(
        "--quick", action="store_true", help="a few batches per figure (a smoke test)"
    )
    args = parser.parse_args()
    if args.quick:
        args.samples = 5

    data = os.urandom(32)
    floor = microseconds_per_op(lambda: hashlib.sha256(data).digest(), args.samples)
    backends = available_backends("liboqs column omitted")
    names = list(backends)
    per_backend = {name: pqc_operations(backend) for name, backend in backends.items()}

    header = f"{'operation':34}" + "".join(f"{name + ' µs/op':>20}" for name in names)
    if "liboqs" in backends:
        header += f"{'liboqs/crypto':>15}"
    header += f"{'best/floor':>12}"
    print(f"floor: SHA-256 of 32 B = {floor:.2f} µs/op; median of {args.samples} batches\n")
    print(header)
    print("-" * len(header))
    for operation in per_backend["cryptography"]:
        figures = {
            name: microseconds_per_op(per_backend[name][operation], args.samples) for name in names
        }
        row = f"{operation:34}" + "".join(f"{figures[name]:>20.1f}" for name in names)
        if "liboqs" in figures:
            row += f"{figures['liboqs'] / figures['cryptography']:>15.2f}"
        row += f"{min(figures.values()) / floor:>12.0f}"
        print(row)

    print(f"\n{'classical (pyca/cryptography, all backends)':44}{'µs/op':>10}{'x floor':>10}")
    print("-" * 64)
    for operation, function in classical_operations().items():
        figure = microseconds_per_op(function, args.samples)
        print(f"{operation:44}{figure:>10.2f}{figure / floor:>10.1f}")


if __name__ == "__main__":
    main()
