"""The hybrid derivation: deterministic, and bound to every input it documents."""

from __future__ import annotations

import dataclasses
import uuid

import pytest

from qkdd import labels
from qkdd.hybrid import HybridDeriver, KemExchange, KeyContext

KEY_ID = str(uuid.UUID(int=1))
QKD_IDS = (str(uuid.UUID(int=2)),)
CONTEXT = KeyContext(b"\x01" * 32, "site-a", "site-b")
KEM = KemExchange(b"\x02" * 1184, b"\x03" * 1088, b"\x04" * 32)
ARGS = dict(
    key_id=KEY_ID,
    master_sae_id="sae-a",
    slave_sae_id="sae-b",
    qkd_key_ids=QKD_IDS,
    qkd_material=b"\x05" * 32,
    size_bits=256,
)


def derive(context=CONTEXT, kem=KEM, **changes):
    return HybridDeriver(context, kem).derive(**{**ARGS, **changes})


def test_deterministic_and_sized():
    assert derive() == derive()
    assert len(derive()) == 32
    assert len(derive(size_bits=128)) == 16


@pytest.mark.parametrize(
    "change",
    [
        {"key_id": str(uuid.UUID(int=9))},
        {"master_sae_id": "sae-x"},
        {"slave_sae_id": "sae-x"},
        {"qkd_key_ids": (str(uuid.UUID(int=3)),)},
        {"qkd_material": b"\x06" * 32},
    ],
)
def test_every_per_key_input_changes_the_key(change):
    assert derive(**change) != derive()


@pytest.mark.parametrize(
    "field,value",
    [
        ("session_id", b"\x09" * 32),
        ("master_site_id", "site-x"),
        ("slave_site_id", "site-x"),
    ],
)
def test_every_context_input_changes_the_key(field, value):
    assert derive(context=dataclasses.replace(CONTEXT, **{field: value})) != derive()


@pytest.mark.parametrize("field", ["public_key", "ciphertext", "shared_secret"])
def test_every_kem_input_changes_the_key(field):
    kem = dataclasses.replace(KEM, **{field: b"\xff" * len(getattr(KEM, field))})
    assert derive(kem=kem) != derive()


def test_swapping_sae_roles_changes_the_key():
    assert derive(master_sae_id="sae-b", slave_sae_id="sae-a") != derive()


def test_refuses_less_qkd_material_than_the_key_length():
    with pytest.raises(ValueError, match="QKD material"):
        derive(qkd_material=b"\x05" * 16)
    with pytest.raises(ValueError):
        derive(size_bits=12)


def test_matches_the_documented_formula_with_an_independent_hkdf():
    """Recompute the module docstring's formula with pyca's HKDF, not our own."""
    import hashlib
    import struct

    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    def lp(x: bytes) -> bytes:
        return struct.pack(">I", len(x)) + x

    salt = hashlib.sha256(labels.LABEL_HYBRID_SALT + CONTEXT.session_id).digest()
    ikm = (
        lp(labels.LABEL_HYBRID_QKD_INPUT)
        + lp(ARGS["qkd_material"])
        + lp(labels.LABEL_HYBRID_KEM_INPUT)
        + lp(KEM.shared_secret)
    )
    info = (
        lp(labels.LABEL_HYBRID_KEY)
        + lp(uuid.UUID(KEY_ID).bytes)
        + lp(b"site-a")
        + lp(b"site-b")
        + lp(b"sae-a")
        + lp(b"sae-b")
        + lp(hashlib.sha256(KEM.public_key).digest())
        + lp(hashlib.sha256(KEM.ciphertext).digest())
        + lp(uuid.UUID(QKD_IDS[0]).bytes)
        + struct.pack(">I", 256)
    )
    expected = HKDF(hashes.SHA256(), 32, salt, info).derive(ikm)
    assert derive() == expected


def test_recorded_vector():
    """A change to the derivation must be deliberate: this value changes with it."""
    assert derive().hex() == RECORDED


def test_labels_are_unique_and_prefix_free():
    for a in labels.ALL_LABELS:
        for b in labels.ALL_LABELS:
            if a is not b:
                assert not b.startswith(a), (a, b)


RECORDED = "eb377bf539709caa992b9f76c9dcfb56350fbacd61774749f67e9f4d7555a183"
