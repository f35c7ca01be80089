"""A site's secret files: its ML-DSA-65 identity (stored as the FIPS 204 32-byte seed) and
its key-encryption key (32 random bytes sealing keys at rest).

Both files hold exactly the raw bytes (mode 0600), the form systemd's LoadCredential=
passes on unchanged. The public key is shared as base64, the form a peer's config pins
(``public_key = "..."`` or a ``public_key_file``).
"""

from __future__ import annotations

import base64
import hashlib
import os
import stat
from collections.abc import Sequence
from pathlib import Path

from qkdd.config import SecretSource
from qkdd.crypto import SIGNATURE_SEED_SIZE, PqcBackend, SigningKey, new_signature_seed
from qkdd.errors import IdentityError as IdentityError
from qkdd.sealing import KEK_SIZE
from qkdd.systemd import credential_path, find_credential


def _write_secret(path: Path, data: bytes, *, overwrite: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise IdentityError(
            f"{path} already exists; refusing to overwrite a secret key file "
            "(pass --force if you really mean to replace it)"
        ) from None
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(path, 0o600)


def _read_private(path: Path, what: str, create_with: str) -> bytes:
    try:
        info = path.stat()
        data = path.read_bytes()
    except FileNotFoundError:
        raise IdentityError(
            f"{what} {path} does not exist (create it with `{create_with}`)"
        ) from None
    except PermissionError:
        raise IdentityError(f"{what} {path} is not readable by this user") from None
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise IdentityError(
            f"{what} {path} is readable by others (mode "
            f"{stat.S_IMODE(info.st_mode):04o}); run `chmod 600 {path}`"
        )
    return data


def write_identity(path: Path, backend: PqcBackend, *, overwrite: bool = False) -> SigningKey:
    seed = new_signature_seed()
    key = backend.signing_key_from_seed(seed)
    _write_secret(path, seed, overwrite=overwrite)
    return key


def _resolve(source: SecretSource, credential_directories: Sequence[str] | None) -> Path:
    """The file behind ``source``. A credential is looked up in $CREDENTIALS_DIRECTORY
    (the daemon, as systemd hands it over) or, for a command an operator runs outside the
    service, in ``credential_directories`` (``systemd.operator_credential_directories``)."""
    name = source.credential
    if name is None:
        assert source.path is not None
        return source.path
    if credential_directories is None:
        found = credential_path(name)
        if found is None:
            raise IdentityError(
                f"systemd credential {name!r} is not available "
                "(add LoadCredential= to the unit, or give a file path)"
            )
        return Path(found)
    found = find_credential(name, credential_directories)
    if found is None:
        looked = ", ".join(credential_directories) or "no directory"
        raise IdentityError(
            f"systemd credential {name!r} was not found: looked for a file named {name!r} in "
            f"{looked} (where the unit's LoadCredential={name} loads it from); put it there "
            "(root, mode 0600), or give a file path in the config"
        )
    return Path(found)


def load_identity(
    source: SecretSource,
    backend: PqcBackend,
    *,
    credential_directories: Sequence[str] | None = None,
) -> SigningKey:
    path = _resolve(source, credential_directories)
    seed = _read_private(path, "identity key", "qkdd keygen --out FILE")
    if len(seed) != SIGNATURE_SEED_SIZE:
        raise IdentityError(
            f"identity key {path} must hold a {SIGNATURE_SEED_SIZE}-byte ML-DSA-65 "
            f"seed, it holds {len(seed)} bytes"
        )
    return backend.signing_key_from_seed(seed)


def write_key_encryption_key(path: Path, *, overwrite: bool = False) -> None:
    _write_secret(path, os.urandom(KEK_SIZE), overwrite=overwrite)


def read_key_encryption_key(
    source: SecretSource, *, credential_directories: Sequence[str] | None = None
) -> bytes:
    """The 32-byte key-encryption key. ``credential_directories``: see ``_resolve``."""
    path = _resolve(source, credential_directories)
    data = _read_private(path, "key-encryption key", "qkdd keygen --kek FILE")
    if len(data) != KEK_SIZE:
        raise IdentityError(
            f"key-encryption key {path} must hold {KEK_SIZE} bytes, it holds {len(data)}"
        )
    return data


def public_key_text(key: SigningKey) -> str:
    return base64.b64encode(key.public_bytes).decode()


def fingerprint(public_key: bytes) -> str:
    """A short, human-comparable fingerprint of a public key (SHA-256, first 16 hex)."""
    digest = hashlib.sha256(public_key).hexdigest()[:16]
    return ":".join(digest[i : i + 4] for i in range(0, 16, 4))
