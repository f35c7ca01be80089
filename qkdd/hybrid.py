"""The hybrid key derivation: the one place where ML-KEM and QKD key material meet.

Every key qkdd hands to an application is

    salt = SHA-256( LABEL_HYBRID_SALT || session_id )
    ikm  = lp(LABEL_HYBRID_QKD_INPUT) || lp(qkd_material)
        || lp(LABEL_HYBRID_KEM_INPUT) || lp(kem_shared_secret)
    info = lp(LABEL_HYBRID_KEY) || lp(key_id) || lp(master_site_id) || lp(slave_site_id)
        || lp(master_sae_id) || lp(slave_sae_id) || lp(SHA-256(kem_public_key))
        || lp(SHA-256(kem_ciphertext)) || lp(qkd_key_id_1) || ... || lp(qkd_key_id_n)
        || u32(size_bits)
    key  = HKDF-SHA256(salt, ikm, info, size_bits / 8)

where ``lp(x)`` is ``x`` preceded by its length as a 4-byte big-endian integer, so no two
different inputs encode to the same bytes.

Authentication keys (the PSKs of later handshakes) are derived the same way with
LABEL_AUTH_KEY in place of LABEL_HYBRID_KEY and empty SAE IDs. They consume QKD keys of
their own (a QKD key serves one purpose, once), and the label keeps the two kinds apart.

Why each input is there:
- ``qkd_material`` and ``kem_shared_secret`` are the two independent secrets: the key
  stays secret as long as either one does (HKDF-Extract as a dual-PRF combiner, the
  construction hybrid TLS key exchange uses).
- ``kem_public_key`` and ``kem_ciphertext`` bind the exact ML-KEM exchange, so a key
  cannot be steered by substituting another encapsulation with the same secret.
- ``key_id``, both site IDs, both SAE IDs and the QKD key IDs bind the key to its
  identity, its direction (master/slave) and the QKD material it consumed: two keys that
  differ in any of them are independent, even with equal secrets.
- ``session_id`` (a hash of the authenticated handshake transcript) binds the key to the
  authenticated peer session in which it was agreed.
"""

from __future__ import annotations

import hashlib
import struct
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from qkdd import labels
from qkdd.crypto import hkdf_expand, hkdf_extract


def lp(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


@dataclass(frozen=True)
class KemExchange:
    """One ML-KEM encapsulation, shared by every key of a batch."""

    public_key: bytes = field(repr=False)
    ciphertext: bytes = field(repr=False)
    shared_secret: bytes = field(repr=False)


@dataclass(frozen=True)
class KeyContext:
    """Everything public that a hybrid key is bound to."""

    session_id: bytes
    master_site_id: str
    slave_site_id: str


class HybridDeriver:
    """Derives the keys of one batch; the per-batch parts are hashed once."""

    def __init__(self, context: KeyContext, kem: KemExchange) -> None:
        self._salt = hashlib.sha256(labels.LABEL_HYBRID_SALT + context.session_id).digest()
        self._kem_input = lp(labels.LABEL_HYBRID_KEM_INPUT) + lp(kem.shared_secret)
        self._batch_info = lp(context.master_site_id.encode()) + lp(context.slave_site_id.encode())
        self._kem_binding = lp(hashlib.sha256(kem.public_key).digest()) + lp(
            hashlib.sha256(kem.ciphertext).digest()
        )

    def derive(
        self,
        *,
        key_id: str,
        master_sae_id: str,
        slave_sae_id: str,
        qkd_key_ids: Sequence[str],
        qkd_material: bytes,
        size_bits: int,
        label: bytes = labels.LABEL_HYBRID_KEY,
    ) -> bytes:
        """One key; ``label`` is LABEL_HYBRID_KEY for application keys, LABEL_AUTH_KEY for
        authentication keys (with empty SAE IDs)."""
        if size_bits <= 0 or size_bits % 8:
            raise ValueError("size_bits must be a positive multiple of 8")
        if len(qkd_material) * 8 < size_bits:
            # A hybrid key never holds less QKD entropy than its own length.
            raise ValueError("not enough QKD material for the requested key size")
        ikm = lp(labels.LABEL_HYBRID_QKD_INPUT) + lp(qkd_material) + self._kem_input
        info = b"".join(
            [
                lp(label),
                lp(uuid.UUID(key_id).bytes),
                self._batch_info,
                lp(master_sae_id.encode()),
                lp(slave_sae_id.encode()),
                self._kem_binding,
                *(lp(uuid.UUID(qid).bytes) for qid in qkd_key_ids),
                struct.pack(">I", size_bits),
            ]
        )
        return hkdf_expand(hkdf_extract(self._salt, ikm), info, size_bits // 8)
