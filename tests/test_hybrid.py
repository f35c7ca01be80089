"""The per-batch hybrid derivation (qkdd.hybrid): recorded vectors, the documented formula
recomputed with independent primitives, binding to every input, and the per-key QKD
property."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import struct
import uuid
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes

from qkdd import labels
from qkdd.crypto import PqcBackend
from qkdd.hybrid import (
    BatchBinding,
    BatchDeriver,
    DerivedBatch,
    KemExchange,
    KeyContext,
    qkd_ids_digest,
)

VECTORS = Path(__file__).parent / "vectors" / "hybrid_batch.json"

COUNT = 8
SIZE_BITS = 256
QKD_IDS = [bytes([0x51, i]) * 8 for i in range(COUNT)]
CONTEXT = KeyContext(b"\x01" * 32, "site-a", "site-b")
KEM = KemExchange(b"\x02" * 1184, b"\x03" * 1088, b"\x04" * 32)
BINDING = BatchBinding(
    batch_id=5,
    purpose_label=labels.LABEL_HYBRID_KEY,
    master_sae_id="sae-a",
    slave_sae_id="sae-b",
    size_bits=SIZE_BITS,
    count=COUNT,
    qkd_first_key_id=QKD_IDS[0],
    qkd_key_count=len(QKD_IDS),
    qkd_ids_digest=qkd_ids_digest(QKD_IDS),
)


def qkd(size: int, tag: bytes = b"") -> bytes:
    """Stand-in QKD material: byte k is the same whatever ``size``, so batches of
    different shapes hold the same QKD bits at the same offsets."""
    return hashlib.shake_256(b"test qkd material" + tag).digest(size)


def derive(
    binding: BatchBinding = BINDING,
    context: KeyContext = CONTEXT,
    kem: KemExchange = KEM,
    material: bytes | None = None,
) -> DerivedBatch:
    if material is None:
        material = qkd(binding.material_size)
    return BatchDeriver(context, kem).derive(binding, material)


# -- Recorded vectors ------------------------------------------------------------------


def load_vectors() -> tuple[dict[str, Any], list[dict[str, Any]]]:
    doc = json.loads(VECTORS.read_text())
    return doc["context"], doc["vectors"]


def vector_inputs(
    ctx: dict[str, Any], inp: dict[str, Any]
) -> tuple[BatchDeriver, BatchBinding, bytes, list[bytes]]:
    deriver = BatchDeriver(
        KeyContext(bytes.fromhex(ctx["session_id"]), ctx["master_site_id"], ctx["slave_site_id"]),
        KemExchange(
            bytes.fromhex(ctx["kem_public_key"]),
            bytes.fromhex(ctx["kem_ciphertext"]),
            bytes.fromhex(ctx["kem_shared_secret"]),
        ),
    )
    run = [bytes.fromhex(q) for q in inp["qkd_key_ids"]]
    binding = BatchBinding(
        batch_id=inp["batch_id"],
        purpose_label=inp["purpose_label"].encode(),
        master_sae_id=inp["master_sae_id"],
        slave_sae_id=inp["slave_sae_id"],
        size_bits=inp["size_bits"],
        count=inp["count"],
        qkd_first_key_id=run[0],
        qkd_key_count=len(run),
        qkd_ids_digest=qkd_ids_digest(run),
    )
    return deriver, binding, bytes.fromhex(inp["qkd_material"]), run


@pytest.mark.parametrize("index", range(len(load_vectors()[1])), ids=lambda i: f"vector{i}")
def test_recorded_vector(index: int) -> None:
    """A change to the derivation must be deliberate: these recorded values change with it."""
    ctx, vectors = load_vectors()
    vector = vectors[index]
    deriver, binding, material, _ = vector_inputs(ctx, vector["binding"])
    expected = vector["expected"]
    batch = deriver.derive(binding, material)
    got = {
        "qkd_ids_digest": binding.qkd_ids_digest.hex(),
        "id_prefix": batch.id_prefix.hex(),
        "first_key_id": batch.key_id(0),
        "last_key_id": batch.key_id(batch.count - 1),
        "first_key": batch.key(0).hex(),
        "last_key": batch.key(batch.count - 1).hex(),
        "material_sha256": hashlib.sha256(batch.material).hexdigest(),
    }
    assert got == expected
    assert deriver.key_id_prefix(binding).hex() == expected["id_prefix"]
    if binding.purpose_label == labels.LABEL_PAD:
        assert batch.material == material


def test_vectors_cover_every_purpose() -> None:
    _, vectors = load_vectors()
    purposes = {v["binding"]["purpose_label"].encode() for v in vectors}
    assert purposes == {labels.LABEL_HYBRID_KEY, labels.LABEL_AUTH_KEY, labels.LABEL_PAD}


# -- The documented formula, recomputed ------------------------------------------------


def _lp(x: bytes) -> bytes:
    return struct.pack(">I", len(x)) + x


def _shake256(data: bytes, length: int) -> bytes:
    # pyca/cryptography (OpenSSL), not hashlib: an independent SHAKE-256.
    h = hashes.Hash(hashes.SHAKE256(digest_size=length))
    h.update(data)
    return h.finalize()


@pytest.mark.parametrize("index", range(len(load_vectors()[1])), ids=lambda i: f"vector{i}")
def test_matches_the_documented_formula(index: int) -> None:
    """The module docstring's formula, written out with hmac, pyca's SHAKE-256 and uuid."""
    ctx, vectors = load_vectors()
    deriver, binding, material, run = vector_inputs(ctx, vectors[index]["binding"])

    salt = hashlib.sha256(labels.LABEL_HYBRID_SALT + bytes.fromhex(ctx["session_id"])).digest()
    ikm = _lp(labels.LABEL_HYBRID_KEM_INPUT) + _lp(bytes.fromhex(ctx["kem_shared_secret"]))
    prk = hmac.new(salt, ikm, "sha256").digest()
    b = (
        _lp(binding.purpose_label)
        + binding.batch_id.to_bytes(8, "big")
        + _lp(ctx["master_site_id"].encode())
        + _lp(ctx["slave_site_id"].encode())
        + _lp(binding.master_sae_id.encode())
        + _lp(binding.slave_sae_id.encode())
        + binding.size_bits.to_bytes(4, "big")
        + binding.count.to_bytes(4, "big")
        + _lp(hashlib.sha256(bytes.fromhex(ctx["kem_public_key"])).digest())
        + _lp(hashlib.sha256(bytes.fromhex(ctx["kem_ciphertext"])).digest())
        + run[0]
        + len(run).to_bytes(4, "big")
        + hashlib.sha256(b"".join(run)).digest()
    )
    raw = _shake256(_lp(labels.LABEL_BATCH_KEY_IDS) + _lp(prk) + b, 12)
    prefix = uuid.UUID(bytes=raw + bytes(4), version=4).bytes[:12]
    if binding.purpose_label == labels.LABEL_PAD:
        keys = material
    else:
        ks = _shake256(_lp(labels.LABEL_BATCH_KEYSTREAM) + _lp(prk) + b + prefix, len(material))
        keys = bytes(x ^ y for x, y in zip(material, ks, strict=True))

    batch = deriver.derive(binding, material)
    assert batch.id_prefix == prefix
    assert batch.material == keys
    assert batch.key_ids() == [
        str(uuid.UUID(bytes=prefix + i.to_bytes(4, "big"))) for i in range(binding.count)
    ]


# -- Binding: every input changes every key and the IDs --------------------------------


def _replace_binding(**changes: Any) -> BatchBinding:
    return dataclasses.replace(BINDING, **changes)


BINDING_CHANGES = {
    "batch_id": _replace_binding(batch_id=6),
    "purpose auth": _replace_binding(purpose_label=labels.LABEL_AUTH_KEY),
    "purpose pad": _replace_binding(purpose_label=labels.LABEL_PAD),
    "master_sae_id": _replace_binding(master_sae_id="sae-x"),
    "slave_sae_id": _replace_binding(slave_sae_id="sae-x"),
    "sae roles swapped": _replace_binding(master_sae_id="sae-b", slave_sae_id="sae-a"),
    # A shape change keeps the QKD bits at their offsets (see qkd()): without size_bits
    # and count in the binding, the XOF's longer output would extend the shorter one.
    "size_bits": _replace_binding(size_bits=SIZE_BITS * 2),
    "count": _replace_binding(count=COUNT + 1),
    "qkd_first_key_id": _replace_binding(qkd_first_key_id=b"\x77" * 16),
    "qkd_key_count": _replace_binding(qkd_key_count=len(QKD_IDS) + 1),
    "qkd_ids_digest": _replace_binding(qkd_ids_digest=qkd_ids_digest(QKD_IDS[::-1])),
}
CONTEXT_CHANGES = {
    "session_id": dataclasses.replace(CONTEXT, session_id=b"\x09" * 32),
    "master_site_id": dataclasses.replace(CONTEXT, master_site_id="site-x"),
    "slave_site_id": dataclasses.replace(CONTEXT, slave_site_id="site-x"),
    "site roles swapped": KeyContext(CONTEXT.session_id, "site-b", "site-a"),
}
KEM_CHANGES = {
    name: dataclasses.replace(KEM, **{name: getattr(KEM, name)[:-1] + b"\xff"})
    for name in ("public_key", "ciphertext", "shared_secret")
}


def assert_every_key_and_the_prefix_differ(base: DerivedBatch, other: DerivedBatch) -> None:
    assert other.id_prefix != base.id_prefix
    assert set(other.key_ids()).isdisjoint(base.key_ids())
    kb = min(base.size_bits, other.size_bits) // 8
    for i in range(min(base.count, other.count)):
        assert other.key(i)[:kb] != base.key(i)[:kb], f"key {i} did not change"


@pytest.mark.parametrize("name", BINDING_CHANGES)
def test_every_binding_field_changes_every_key_and_the_ids(name: str) -> None:
    assert_every_key_and_the_prefix_differ(derive(), derive(BINDING_CHANGES[name]))


@pytest.mark.parametrize("name", CONTEXT_CHANGES)
def test_every_context_input_changes_every_key_and_the_ids(name: str) -> None:
    assert_every_key_and_the_prefix_differ(derive(), derive(context=CONTEXT_CHANGES[name]))


@pytest.mark.parametrize("name", KEM_CHANGES)
def test_every_kem_input_changes_every_key_and_the_ids(name: str) -> None:
    assert_every_key_and_the_prefix_differ(derive(), derive(kem=KEM_CHANGES[name]))


def test_other_qkd_material_changes_every_key_but_not_the_ids() -> None:
    base = derive()
    other = derive(material=qkd(BINDING.material_size, b"other"))
    assert other.id_prefix == base.id_prefix
    assert other.key_ids() == base.key_ids()
    for i in range(COUNT):
        assert other.key(i) != base.key(i)


def test_key_id_prefix_alone_equals_the_derived_one() -> None:
    deriver = BatchDeriver(CONTEXT, KEM)
    for binding in (BINDING, *BINDING_CHANGES.values()):
        prefix = deriver.key_id_prefix(binding)
        assert prefix == deriver.derive(binding, qkd(binding.material_size)).id_prefix


# -- The per-key QKD property ----------------------------------------------------------


@pytest.mark.parametrize("index", [0, 3, COUNT - 1])
@pytest.mark.parametrize("bit", [0, 7, SIZE_BITS - 1])
def test_one_qkd_bit_changes_its_own_key_by_that_bit_only(index: int, bit: int) -> None:
    """Intended: each key is its own QKD bits masked by the keystream, so it stays
    information-theoretically secret whenever they are, and shares no bit with another key."""
    material = bytearray(qkd(BINDING.material_size))
    base = derive(material=bytes(material))
    position = index * SIZE_BITS + bit
    material[position // 8] ^= 0x80 >> (position % 8)
    flipped = derive(material=bytes(material))
    assert flipped.id_prefix == base.id_prefix
    for i in range(COUNT):
        if i != index:
            assert flipped.key(i) == base.key(i)
    delta = int.from_bytes(flipped.key(index), "big") ^ int.from_bytes(base.key(index), "big")
    assert delta == 1 << (SIZE_BITS - 1 - bit)


def test_keys_with_equal_qkd_bits_still_differ() -> None:
    """Each key has its own slice of the keystream: even equal QKD material gives
    distinct keys."""
    batch = derive(material=bytes(BINDING.material_size))
    assert len({batch.key(i) for i in range(COUNT)}) == COUNT


def test_pads_are_the_qkd_material_unchanged() -> None:
    pads = _replace_binding(purpose_label=labels.LABEL_PAD)
    material = qkd(pads.material_size)
    assert derive(pads, material=material).material == material


# -- Lengths, shapes, both sides -------------------------------------------------------


@pytest.mark.parametrize("size", [0, BINDING.material_size - 1, BINDING.material_size + 1])
def test_wrong_qkd_material_length_raises(size: int) -> None:
    with pytest.raises(ValueError, match="QKD material"):
        derive(material=bytes(size))


@pytest.mark.parametrize(
    "change",
    [
        {"purpose_label": labels.LABEL_WIREGUARD_PSK},
        {"batch_id": -1},
        {"batch_id": 1 << 64},
        {"size_bits": 0},
        {"size_bits": 12},
        {"size_bits": 1 << 32},
        {"count": 0},
        {"count": (1 << 32) + 1},
        {"qkd_first_key_id": b"\x00" * 15},
        {"qkd_key_count": 0},
        {"qkd_key_count": 1 << 32},
        {"qkd_ids_digest": b"\x00" * 31},
    ],
    ids=str,
)
def test_binding_refuses_fields_out_of_range(change: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        _replace_binding(**change)


def test_batch_shape_and_ids() -> None:
    batch = derive()
    assert len(batch.material) == COUNT * SIZE_BITS // 8
    ids = batch.key_ids()
    assert len(set(ids)) == COUNT
    for i, text in enumerate(ids):
        parsed = uuid.UUID(text)
        assert str(parsed) == text and parsed.version == 4
        assert parsed.bytes == batch.id_prefix + struct.pack(">I", i)
        assert batch.key_id(i) == text
        assert batch.key(i) == batch.material[i * 32 : (i + 1) * 32]
    for bad in (-1, COUNT):
        with pytest.raises(IndexError):
            batch.key(bad)
        with pytest.raises(IndexError):
            batch.key_id(bad)


def test_both_sides_derive_equal_batches(any_backend: PqcBackend) -> None:
    """Master and slave, each from its own end of a real ML-KEM-768 exchange."""
    decapsulation_key = any_backend.kem_generate()
    public_key = decapsulation_key.public_bytes
    secret, ciphertext = any_backend.kem_encapsulate(public_key)
    master = BatchDeriver(
        KeyContext(bytes(CONTEXT.session_id), "site-a", "site-b"),
        KemExchange(public_key, ciphertext, secret),
    )
    slave = BatchDeriver(
        KeyContext(bytes(CONTEXT.session_id), "site-a", "site-b"),
        KemExchange(
            bytes(public_key), bytes(ciphertext), decapsulation_key.decapsulate(ciphertext)
        ),
    )
    material = qkd(BINDING.material_size)
    sent = master.derive(BINDING, material)
    received = slave.derive(dataclasses.replace(BINDING), bytes(material))
    assert sent == received
    assert sent.key_ids() == received.key_ids()
    assert slave.key_id_prefix(BINDING) == sent.id_prefix


def test_qkd_ids_digest_is_sha256_of_the_ids_in_order() -> None:
    assert qkd_ids_digest(QKD_IDS) == hashlib.sha256(b"".join(QKD_IDS)).digest()
    assert qkd_ids_digest(iter(QKD_IDS)) == qkd_ids_digest(QKD_IDS)
    assert qkd_ids_digest(QKD_IDS[::-1]) != qkd_ids_digest(QKD_IDS)
    with pytest.raises(ValueError):
        qkd_ids_digest([*QKD_IDS, b"\x00" * 17])


def test_no_secret_in_any_repr() -> None:
    kem = KemExchange(b"\xa1" * 1184, b"\xa2" * 1088, b"\xa3" * 32)
    deriver = BatchDeriver(CONTEXT, kem)
    batch = deriver.derive(BINDING, qkd(BINDING.material_size))
    secrets = [kem.shared_secret, batch.material, batch.key(0), batch.key(COUNT - 1)]
    for obj in (kem, batch, deriver, BINDING, CONTEXT):
        text = repr(obj)
        for secret in secrets:
            assert secret.hex() not in text
            assert repr(secret)[2:-1] not in text
            assert secret[:8].hex() not in text


def test_labels_are_unique_and_prefix_free() -> None:
    all_labels = labels.ALL_LABELS
    for i, a in enumerate(all_labels):
        for j, b in enumerate(all_labels):
            if i != j:
                assert not b.startswith(a), (a, b)
