"""The hybrid key derivation: the one place where ML-KEM and QKD key material meet.

Keys are agreed in batches: thousands of keys of one SAE pair and one size, which consume
one run of QKD keys and one ML-KEM encapsulation. This module derives a whole batch at
once: its key IDs and its keys.

Construction (``lp(x)`` is ``x`` preceded by its length as a 4-byte big-endian integer;
``u32``/``u64`` are big-endian; ``||`` is concatenation)::

    salt = SHA-256(LABEL_HYBRID_SALT || session_id)
    prk  = HKDF-SHA256-Extract(salt, lp(LABEL_HYBRID_KEM_INPUT) || lp(kem_shared_secret))

    B = lp(purpose_label) || u64(batch_id)
        || lp(master_site_id) || lp(slave_site_id) || lp(master_sae_id) || lp(slave_sae_id)
        || u32(size_bits) || u32(count)
        || lp(SHA-256(kem_public_key)) || lp(SHA-256(kem_ciphertext))
        || qkd_first_key_id (16) || u32(qkd_key_count) || qkd_ids_digest (32)

    id_prefix = uuid_prefix(SHAKE-256(lp(LABEL_BATCH_KEY_IDS) || lp(prk) || B, 12 bytes))
    KS        = SHAKE-256(lp(LABEL_BATCH_KEYSTREAM) || lp(prk) || B || id_prefix,
                          count * size_bits/8 bytes)
    key_i     = QKD_i XOR KS_i            (the i-th size_bits/8-byte slice of each)
    key_id_i  = UUID(id_prefix || u32(i)),  i = 0 .. count-1

``qkd_ids_digest`` is SHA-256 over the run's QKD key IDs (16 bytes each, in order), and
``QKD`` is the first ``count * size_bits/8`` bytes of the run's material (the caller
slices it; the rest of the last QKD key is consumed unused).
Variable-length fields are length-prefixed and the others have fixed sizes, so two
different bindings never encode to the same ``B``; the labels are prefix-free (a test
checks), so no two SHAKE-256 inputs of different kinds coincide.

Purposes: application keys (LABEL_HYBRID_KEY), authentication keys (LABEL_AUTH_KEY, the
PSKs of later handshakes, with empty SAE IDs) and one-time pads (LABEL_PAD). A pad must
stay information-theoretically secure, so for LABEL_PAD only the key IDs are derived:
``derive`` returns the QKD material unchanged (no keystream is computed). Every purpose
consumes QKD keys of its own; the store hands out each QKD key once.

Why this construction:

- One extract per ML-KEM exchange, i.e. per batch (RFC 5869 section 2.2; SP 800-56C
  Rev. 2 section 5, two-step key derivation: randomness extraction with a salt, then
  expansion). The salt carries the session ID (a hash of the authenticated handshake
  transcript), so ``prk`` belongs to one session and one ML-KEM exchange. The expansion
  is SHAKE-256 keyed by putting the fixed-length PRK at the front of its input, the way
  FIPS 203 (section 4.1) keys SHAKE-256 for ML-KEM's own PRF (``SHAKE256(s || b)``) and
  J function; FIPS 202 defines SHAKE-256 as an extendable-output function, so one call
  yields the whole batch's keystream (≈0.06 µs per 32-byte key in a batch of 4096,
  against ≈8 µs for one HKDF per key).
- XOR, not a hash of both secrets: each key keeps its own QKD bits, so it is
  information-theoretically secret whenever its QKD bits are (a one-time pad over the
  keystream), and no two keys share a secret bit. The keystream is computed without the
  QKD material, so the two summands are independent; a key formed as the XOR of
  independently generated keys is one of the combinations SP 800-133 Rev. 2 (section 6.3)
  allows. If the QKD material is known (QKD broken, or a device that hands out chosen
  bits), a key is as strong as its keystream slice: SHAKE-256 under ``prk``, i.e. the
  ML-KEM-768 secret. It is secret while either source is.
- Binding: ``B`` names the key's purpose, batch, both site IDs (hence direction), SAE pair,
  size, count, the exact ML-KEM exchange (hashes of the encapsulation key and ciphertext,
  so another encapsulation with the same secret cannot be substituted) and the QKD run it
  consumes; the keystream input also holds the ID prefix, and key ``i`` is slice ``i``, so
  each key is bound to its key ID. Two batches that differ in any of these get unrelated
  keystreams. ``size_bits`` and ``count`` must be in ``B``: an XOF's shorter output is a
  prefix of its longer one for the same input (FIPS 202, appendix A.2), so without them
  a batch of 8 keys would share its keystream with the first 8 keys of a batch of 9.
  This binding rests on the ML-KEM secret; independence of keys under QKD alone rests on
  each QKD key being used once.

What an attacker learns who knows one key ``key_i`` (say, from a careless application):
with QKD intact, nothing about any other key, unconditionally: ``key_i`` is ``QKD_i`` (bits
no other key uses) masking ``KS_i``. With QKD broken as well, ``key_i`` reveals ``KS_i``;
the other slices are other output of SHAKE-256 under the secret ``prk`` and stay as
strong as ML-KEM. The derivation is linear in the QKD bits, on purpose: flipping one bit
of ``QKD_i`` flips the same bit of ``key_i`` and nothing else. That is the per-key
information-theoretic property; it also means a QKD error would surface as the same bit
error in the two sites' copies of a key (the QKD layer's error verification makes both
sides' material equal, this module does not check it).

Key IDs: ``id_prefix`` is 90 bits of SHAKE-256 output under ``prk`` (the UUID version and
variant bits are fixed, ``qkdd.key_ids``), so nobody outside the two sites can guess a
batch's IDs before they are used, and both sites compute the same IDs without sending
them. All IDs of a batch share the prefix, so one ID reveals its batch-mates' IDs. IDs
are names, not secrets: ETSI GS QKD 014 carries them in clear, and the key service hands
a key only to its own SAE pair.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final

from qkdd import labels
from qkdd.crypto import HASH_SIZE, hash_bytes, hkdf_extract, xof, xor_bytes
from qkdd.key_ids import ID_PREFIX_SIZE, MAX_INDEX, uuid_prefix
from qkdd.key_ids import key_id as _key_id
from qkdd.key_ids import key_ids as _key_ids

QKD_KEY_ID_SIZE: Final = 16
PURPOSE_LABELS: Final = (labels.LABEL_HYBRID_KEY, labels.LABEL_AUTH_KEY, labels.LABEL_PAD)
_U32_LIMIT: Final = 1 << 32
_U64_LIMIT: Final = 1 << 64


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


@dataclass(frozen=True)
class BatchBinding:
    """Everything public that one batch's keys are bound to. Checked when made: a field
    out of its range raises ValueError."""

    batch_id: int
    purpose_label: bytes  # labels.LABEL_HYBRID_KEY, labels.LABEL_AUTH_KEY or labels.LABEL_PAD
    master_sae_id: str  # "" for authentication keys
    slave_sae_id: str
    size_bits: int  # each key's size, positive multiple of 8
    count: int  # keys in the batch, >= 1
    qkd_first_key_id: bytes  # 16 bytes: first QKD key of the run the batch consumes
    qkd_key_count: int  # QKD keys in that run
    qkd_ids_digest: bytes  # 32 bytes: qkd_ids_digest() of the run's QKD key IDs

    def __post_init__(self) -> None:
        if self.purpose_label not in PURPOSE_LABELS:
            raise ValueError(f"unknown batch purpose label {self.purpose_label!r}")
        if not 0 <= self.batch_id < _U64_LIMIT:
            raise ValueError(f"batch ID {self.batch_id} does not fit 64 bits")
        if not (0 < self.size_bits < _U32_LIMIT and self.size_bits % 8 == 0):
            raise ValueError(f"key size {self.size_bits} is not a positive multiple of 8 bits")
        if not 1 <= self.count <= MAX_INDEX + 1:
            raise ValueError(f"a batch holds 1 to 2^32 keys, not {self.count}")
        if len(self.qkd_first_key_id) != QKD_KEY_ID_SIZE:
            raise ValueError(f"a QKD key ID is {QKD_KEY_ID_SIZE} bytes")
        if not 1 <= self.qkd_key_count < _U32_LIMIT:
            raise ValueError(f"a batch consumes 1 to 2^32-1 QKD keys, not {self.qkd_key_count}")
        if len(self.qkd_ids_digest) != HASH_SIZE:
            raise ValueError(f"the QKD key-ID digest is {HASH_SIZE} bytes")

    @property
    def material_size(self) -> int:
        """Bytes of QKD material the batch consumes (and of key material it yields)."""
        return self.count * (self.size_bits // 8)


@dataclass(frozen=True)
class DerivedBatch:
    """One batch's key IDs (one prefix, indices 0..count-1) and keys (one buffer)."""

    id_prefix: bytes
    material: bytes = field(repr=False)  # key i = material[i*kb:(i+1)*kb], kb = size_bits/8
    count: int
    size_bits: int

    def __post_init__(self) -> None:
        if len(self.id_prefix) != ID_PREFIX_SIZE:
            raise ValueError(f"a key-ID prefix is {ID_PREFIX_SIZE} bytes")
        if len(self.material) != self.count * (self.size_bits // 8):
            raise ValueError("batch material does not hold count keys of size_bits each")

    def _check(self, index: int) -> None:
        if not 0 <= index < self.count:
            raise IndexError(f"key index {index} outside the batch of {self.count}")

    def key_id(self, index: int) -> str:
        self._check(index)
        return _key_id(self.id_prefix, index)

    def key_ids(self) -> list[str]:
        return _key_ids(self.id_prefix, 0, self.count)

    def key(self, index: int) -> bytes:
        self._check(index)
        size = self.size_bits // 8
        return self.material[index * size : (index + 1) * size]


def qkd_ids_digest(qkd_key_ids: Iterable[bytes]) -> bytes:
    """SHA-256 over the QKD key IDs of a run (16 bytes each, in order): what a batch's
    binding names its QKD run by, computed the same way at both sites."""
    ids = list(qkd_key_ids)
    if any(len(qkd_id) != QKD_KEY_ID_SIZE for qkd_id in ids):
        raise ValueError(f"a QKD key ID is {QKD_KEY_ID_SIZE} bytes")
    return hash_bytes(b"".join(ids))


class BatchDeriver:
    """Derives batches under one session and one ML-KEM exchange; the extract and every
    per-exchange hash are done once, here."""

    __slots__ = ("_prk", "_sites", "_kem")

    def __init__(self, context: KeyContext, kem: KemExchange) -> None:
        salt = hash_bytes(labels.LABEL_HYBRID_SALT + context.session_id)
        ikm = lp(labels.LABEL_HYBRID_KEM_INPUT) + lp(kem.shared_secret)
        self._prk = lp(hkdf_extract(salt, ikm))
        self._sites = lp(context.master_site_id.encode()) + lp(context.slave_site_id.encode())
        self._kem = lp(hash_bytes(kem.public_key)) + lp(hash_bytes(kem.ciphertext))

    def __repr__(self) -> str:
        return "<BatchDeriver (secret hidden)>"

    def _encode(self, b: BatchBinding) -> bytes:
        return b"".join(
            [
                lp(b.purpose_label),
                struct.pack(">Q", b.batch_id),
                self._sites,
                lp(b.master_sae_id.encode()),
                lp(b.slave_sae_id.encode()),
                struct.pack(">II", b.size_bits, b.count),
                self._kem,
                b.qkd_first_key_id,
                struct.pack(">I", b.qkd_key_count),
                b.qkd_ids_digest,
            ]
        )

    def _prefix(self, encoded: bytes) -> bytes:
        raw = xof(lp(labels.LABEL_BATCH_KEY_IDS) + self._prk + encoded, ID_PREFIX_SIZE)
        return uuid_prefix(raw)

    def key_id_prefix(self, binding: BatchBinding) -> bytes:
        """The batch's key-ID prefix alone (the IDs of a batch whose keys are not needed)."""
        return self._prefix(self._encode(binding))

    def derive(self, binding: BatchBinding, qkd_material: bytes) -> DerivedBatch:
        """The batch's IDs and keys. ``qkd_material`` is exactly the batch's share of its
        QKD run (``count * size_bits/8`` bytes, else ValueError). For LABEL_PAD the keys are
        that material unchanged: a one-time pad is never mixed with a computational
        secret, only its IDs are derived."""
        if len(qkd_material) != binding.material_size:
            raise ValueError(
                f"a batch of {binding.count} keys of {binding.size_bits} bits takes "
                f"{binding.material_size} bytes of QKD material, not {len(qkd_material)}"
            )
        encoded = self._encode(binding)
        prefix = self._prefix(encoded)
        if binding.purpose_label == labels.LABEL_PAD:
            return DerivedBatch(prefix, bytes(qkd_material), binding.count, binding.size_bits)
        stream = xof(
            lp(labels.LABEL_BATCH_KEYSTREAM) + self._prk + encoded + prefix, len(qkd_material)
        )
        return DerivedBatch(
            prefix, xor_bytes(qkd_material, stream), binding.count, binding.size_bits
        )


def relayed_key_ids(transfer_id: bytes, path: Sequence[str], count: int) -> list[str]:
    """The QKD key IDs both end sites give the ``count`` keys of a relayed transfer::

        prefix = uuid_prefix(SHAKE-256(lp(LABEL_RELAYED_KEY_IDS) || lp(transfer_id)
                                       || u8(len(path)) || lp(site) for each site, 12 bytes))
        id_i   = UUID(prefix || u32(i))

    A batch's binding ``B`` holds the digest of the QKD key IDs it consumes, so every key
    derived from relayed material is bound to the path that material took (site IDs in
    order): end sites that saw different paths derive no common batch at all."""
    if not 1 <= count <= MAX_INDEX + 1 or not path:
        raise ValueError("a relayed transfer has 1 or more keys and a path")
    encoded = lp(labels.LABEL_RELAYED_KEY_IDS) + lp(transfer_id) + bytes([len(path)])
    encoded += b"".join(lp(site.encode()) for site in path)
    return _key_ids(uuid_prefix(xof(encoded, ID_PREFIX_SIZE)), 0, count)


def relayed_material_check(transfer_id: bytes, path: Sequence[str], material: bytes) -> bytes:
    """What the destination of a relayed transfer returns in RELAY_CONFIRM::

        SHA-256(lp(LABEL_RELAYED_MATERIAL_CHECK) || lp(transfer_id) || u8(len(path))
                || lp(site) for each site || lp(material))

    The source compares it with its own copy's (in constant time) and keeps the material
    only if they are equal: a relay that altered the material on the way (each hop's MAC
    only covers that hop) cannot make the two ends hold different keys under the same IDs.
    It travels inside the end-to-end session, so only the end sites (and the relays, who
    saw the material anyway) could learn even this hash of it."""
    encoded = lp(labels.LABEL_RELAYED_MATERIAL_CHECK) + lp(transfer_id) + bytes([len(path)])
    encoded += b"".join(lp(site.encode()) for site in path)
    return hash_bytes(encoded + lp(material))
