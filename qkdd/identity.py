"""Site identity keys: an ML-DSA-65 key pair stored as its FIPS 204 32-byte seed.

The private key file holds exactly the raw 32-byte seed (mode 0600), which is also the
form systemd's LoadCredential= passes on unchanged. The public key is shared as base64,
the form a peer's config pins (``public_key = "..."``).
"""

from __future__ import annotations

import base64
import hashlib
import os
import stat
from pathlib import Path

from qkdd.crypto import SIGNATURE_SEED_SIZE, PqcBackend, SigningKey, new_signature_seed


class IdentityError(Exception):
    """The identity key file is missing, unreadable, too open, or malformed."""


def write_identity(path: Path, backend: PqcBackend, *, overwrite: bool = False) -> SigningKey:
    seed = new_signature_seed()
    key = backend.signing_key_from_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise IdentityError(
            f"{path} already exists; refusing to overwrite an identity key "
            "(pass --force if you really mean to replace it)"
        ) from None
    with os.fdopen(fd, "wb") as handle:
        handle.write(seed)
    os.chmod(path, 0o600)
    return key


def load_identity(path: Path, backend: PqcBackend) -> SigningKey:
    try:
        info = path.stat()
        seed = path.read_bytes()
    except FileNotFoundError:
        raise IdentityError(
            f"identity key {path} does not exist (create it with `qkdd keygen`)"
        ) from None
    except PermissionError:
        raise IdentityError(f"identity key {path} is not readable by this user") from None
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise IdentityError(
            f"identity key {path} is readable by others (mode "
            f"{stat.S_IMODE(info.st_mode):04o}); run `chmod 600 {path}`"
        )
    if len(seed) != SIGNATURE_SEED_SIZE:
        raise IdentityError(
            f"identity key {path} must hold a {SIGNATURE_SEED_SIZE}-byte ML-DSA-65 "
            f"seed, it holds {len(seed)} bytes"
        )
    return backend.signing_key_from_seed(seed)


def public_key_text(key: SigningKey) -> str:
    return base64.b64encode(key.public_bytes).decode()


def fingerprint(public_key: bytes) -> str:
    """A short, human-comparable fingerprint of a public key (SHA-256, first 16 hex)."""
    digest = hashlib.sha256(public_key).hexdigest()[:16]
    return ":".join(digest[i : i + 4] for i in range(0, 16, 4))
