"""Every KDF label and signature context qkdd uses, in one registry.

Each label is used for exactly one purpose; a test checks that no two are equal and
that none is a prefix of another, so no derivation can be confused with another.
"""

from __future__ import annotations

from typing import Final

PROTOCOL_NAME: Final = b"qkdd peer protocol v1"

# Signature contexts (FIPS 204 ctx strings): one per handshake role, so a responder's
# signature can never be replayed as an initiator's.
SIG_CONTEXT_INITIATOR: Final = b"qkdd/v1 bootstrap initiator signature"
SIG_CONTEXT_RESPONDER: Final = b"qkdd/v1 bootstrap responder signature"

# PSK handshake (mode 2): per-role MAC keys from the authentication key, so a reflected
# MAC never verifies.
LABEL_PSK_EXTRACT: Final = b"qkdd/v1 psk extract"
LABEL_PSK_RESPONDER_MAC: Final = b"qkdd/v1 psk responder mac key"
LABEL_PSK_INITIATOR_MAC: Final = b"qkdd/v1 psk initiator mac key"

# Handshake key schedule.
LABEL_HANDSHAKE_SECRET: Final = b"qkdd/v1 handshake secret"
LABEL_SESSION_INITIATOR_TO_RESPONDER: Final = b"qkdd/v1 session key initiator->responder"
LABEL_SESSION_RESPONDER_TO_INITIATOR: Final = b"qkdd/v1 session key responder->initiator"
LABEL_INITIATOR_CONFIRM: Final = b"qkdd/v1 initiator key confirmation"
LABEL_SESSION_ID: Final = b"qkdd/v1 session id"
LABEL_KEY_UPDATE: Final = b"qkdd/v1 session key update"

# Hybrid key derivation (qkdd.hybrid): the batch secret from the ML-KEM secret, then
# from it, per batch, the key-ID prefix and the keystream, each under its own label.
LABEL_HYBRID_SALT: Final = b"qkdd/v1 hybrid salt"
LABEL_HYBRID_KEM_INPUT: Final = b"qkdd/v1 hybrid input ml-kem"
LABEL_BATCH_KEY_IDS: Final = b"qkdd/v2 batch key ids"
LABEL_BATCH_KEYSTREAM: Final = b"qkdd/v2 batch keystream"
# Purpose labels of a batch: application keys, authentication keys (the PSKs of later
# handshakes) and one-time pads. Each is bound into the batch's key IDs and keystream, so
# no key can serve two purposes.
LABEL_HYBRID_KEY: Final = b"qkdd/v1 hybrid output key"
LABEL_AUTH_KEY: Final = b"qkdd/v1 authentication key"
LABEL_PAD: Final = b"qkdd/v2 one-time pad"

# Keys at rest (qkdd.keystore): the store's AEAD key from the key-encryption key, and the
# associated data that binds each sealed row to its identity.
LABEL_STORE_SEAL_KEY: Final = b"qkdd/v1 key store seal key"
AAD_QKD_KEY_ROW: Final = b"qkdd/v1 sealed qkd key row"
AAD_HYBRID_KEY_ROW: Final = b"qkdd/v1 sealed hybrid key row"
AAD_AUTH_KEY_ROW: Final = b"qkdd/v1 sealed authentication key row"
AAD_ASSIGNED_KEY_ROW: Final = b"qkdd/v1 sealed assigned key row"
AAD_MESSAGE_ROW: Final = b"qkdd/v1 sealed message row"
AAD_PAD_ROW: Final = b"qkdd/v1 sealed one-time pad row"
# A chunk of a key block (qkdd.store.key_blocks): many keys of one batch sealed together.
AAD_KEY_CHUNK_ROW: Final = b"qkdd/v1 sealed key chunk row"
# A frame of the QKD buffer (qkdd.store.qkd_frames): the keys of one device delivery.
AAD_QKD_FRAME_ROW: Final = b"qkdd/v1 sealed qkd frame row"
# The store's key-check value: this fixed plaintext, sealed when the store is created with
# associated data naming the store, tells a wrong key-encryption key before any write.
KEK_CHECK_PLAINTEXT: Final = b"qkdd/v1 key-encryption key check value"
AAD_KEK_CHECK_ROW: Final = b"qkdd/v1 sealed key-check row"

# Application messages (qkdd.messaging): the one-time AEAD key from a hybrid key, and the
# associated data that binds a ciphertext to its message ID, sender and recipient.
LABEL_MESSAGE_KEY: Final = b"qkdd/v1 message key"
AAD_MESSAGE: Final = b"qkdd/v1 message aad"

# WireGuard pre-shared keys (qkdd.wireguard): a PSK derived from a hybrid key under its own
# label, bound to the binding name and key ID, so it never equals the key itself.
LABEL_WIREGUARD_PSK: Final = b"qkdd/v1 wireguard preshared key"

# IPsec post-quantum preshared keys (qkdd.ipsec, RFC 8784 PPKs): the same construction
# under a label of their own.
LABEL_IPSEC_PPK: Final = b"qkdd/v1 ipsec postquantum preshared key"

# Relayed QKD material (qkdd.relay.hop_seal): the first field of the one-time MAC input of
# a RELAY_KEYS frame and of its RELAY_ACK, so neither tag can pass for the other.
LABEL_RELAY_KEYS: Final = b"qkdd/v1 relay keys one-time mac"
LABEL_RELAY_ACK: Final = b"qkdd/v1 relay ack one-time mac"
# The QKD key IDs the end sites give relayed material (qkdd.hybrid.relayed_key_ids): a hash
# of the transfer and its whole path, so every batch that consumes them is bound to it.
LABEL_RELAYED_KEY_IDS: Final = b"qkdd/v1 relayed qkd key ids"
# The digest of relayed material the destination returns in RELAY_CONFIRM, end to end, so
# the source keeps only material that arrived unaltered (qkdd.hybrid.relayed_material_check).
LABEL_RELAYED_MATERIAL_CHECK: Final = b"qkdd/v1 relayed material check"

ALL_LABELS: Final = (
    PROTOCOL_NAME,
    SIG_CONTEXT_INITIATOR,
    SIG_CONTEXT_RESPONDER,
    LABEL_PSK_EXTRACT,
    LABEL_PSK_RESPONDER_MAC,
    LABEL_PSK_INITIATOR_MAC,
    LABEL_HANDSHAKE_SECRET,
    LABEL_SESSION_INITIATOR_TO_RESPONDER,
    LABEL_SESSION_RESPONDER_TO_INITIATOR,
    LABEL_INITIATOR_CONFIRM,
    LABEL_SESSION_ID,
    LABEL_KEY_UPDATE,
    LABEL_HYBRID_SALT,
    LABEL_HYBRID_KEM_INPUT,
    LABEL_BATCH_KEY_IDS,
    LABEL_BATCH_KEYSTREAM,
    LABEL_HYBRID_KEY,
    LABEL_AUTH_KEY,
    LABEL_PAD,
    LABEL_STORE_SEAL_KEY,
    AAD_QKD_KEY_ROW,
    AAD_HYBRID_KEY_ROW,
    AAD_AUTH_KEY_ROW,
    AAD_ASSIGNED_KEY_ROW,
    AAD_MESSAGE_ROW,
    AAD_PAD_ROW,
    AAD_KEY_CHUNK_ROW,
    AAD_QKD_FRAME_ROW,
    KEK_CHECK_PLAINTEXT,
    AAD_KEK_CHECK_ROW,
    LABEL_MESSAGE_KEY,
    AAD_MESSAGE,
    LABEL_WIREGUARD_PSK,
    LABEL_IPSEC_PPK,
    LABEL_RELAY_KEYS,
    LABEL_RELAY_ACK,
    LABEL_RELAYED_KEY_IDS,
    LABEL_RELAYED_MATERIAL_CHECK,
)
