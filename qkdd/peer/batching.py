"""What both sides of a link do with one batch, and the limits of batch agreement:
derive the batch's keys from its QKD run and ML-KEM exchange and store them pending,
consuming the run (``store_batch``: master and slave run exactly this). The master's
batch making is ``qkdd.peer.batch_maker``, the slave's acceptance ``qkdd.peer.batch_taker``,
the session around both ``qkdd.peer.agreement``.
"""

from __future__ import annotations

from typing import Final

from qkdd import labels
from qkdd.hybrid import BatchBinding, BatchDeriver
from qkdd.key_ids import key_id
from qkdd.keystore import NewHybridKey, NewKeyBlock, StoredQkdKey
from qkdd.peer.agreement_messages import BatchPurpose, KeyBatch
from qkdd.peer.agreement_store import AgreementStore
from qkdd.store.qkd_ids import QkdRun

# Batches in flight at once (each uses one of the slave's ML-KEM offers): enough that the
# link is never idle for a round trip while the next batch is made.
WINDOW: Final = 4
# Keys in one batch at most (by default): one ML-KEM exchange, one derivation, one durable
# write per side and three messages cover this many keys.
BATCH_KEYS: Final = 4096
# How long the slave waits for QKD keys the master already has: the two devices deliver
# the same stream, but not at the same instant.
QKD_KEY_WAIT_SECONDS: Final = 5.0
# How long a side waits for the reply to a batch message before it gives up on the
# session: 3x the time the slave may legitimately wait for its device's QKD keys.
BATCH_REPLY_TIMEOUT: Final = 3 * QKD_KEY_WAIT_SECONDS
# Sizes an authentication key (a PSK for the next handshakes) may have; the link master's
# config chooses (``auth_key_bits``, 256 by default).
AUTH_KEY_BITS_RANGE: Final = (128, 4096)
# A one-time pad is this many bits of raw QKD material.
PAD_BITS_MAX: Final = 8192
# The most pads a peer's PAD_DEMAND may ask for per pair.
MAX_PAD_DEMAND: Final = 65536

_PURPOSE_LABELS: Final = {
    BatchPurpose.APPLICATION_KEYS: labels.LABEL_HYBRID_KEY,
    BatchPurpose.AUTHENTICATION_KEYS: labels.LABEL_AUTH_KEY,
    BatchPurpose.PADS: labels.LABEL_PAD,
}


def batch_binding(batch: KeyBatch) -> BatchBinding:
    """What the batch's key derivation is bound to (``qkdd.hybrid``)."""
    return BatchBinding(
        batch_id=batch.batch_id,
        purpose_label=_PURPOSE_LABELS[batch.purpose],
        master_sae_id=batch.master_sae_id,
        slave_sae_id=batch.slave_sae_id,
        size_bits=batch.size_bits,
        count=batch.count,
        qkd_first_key_id=batch.qkd_first_key_id,
        qkd_key_count=batch.qkd_key_count,
        qkd_ids_digest=batch.qkd_ids_digest,
    )


def store_batch(
    store: AgreementStore,
    peer: str,
    batch: KeyBatch,
    deriver: BatchDeriver,
    run: QkdRun,
) -> bytes:
    """Derive the batch's keys from its QKD run and store them pending, consuming the
    run; both sides run exactly this. Returns the batch's key-ID prefix."""
    binding = batch_binding(batch)
    used = run.material[: batch.count * batch.size_bits // 8]
    if batch.purpose == BatchPurpose.PADS:
        # Raw QKD material, not derived: a one-time pad must be information-theoretic.
        prefix = deriver.key_id_prefix(binding)
        size = batch.size_bits // 8
        pads = [
            NewHybridKey(
                key_id(prefix, i),
                batch.master_sae_id,
                batch.slave_sae_id,
                batch.size_bits,
                used[i * size : (i + 1) * size],
            )
            for i in range(batch.count)
        ]
        store.add_batch(peer, batch.batch_id, [], run, pads=pads)
        return prefix
    derived = deriver.derive(binding, used)
    if batch.purpose == BatchPurpose.AUTHENTICATION_KEYS:
        auth = [StoredQkdKey(derived.key_id(0), derived.key(0))]
        store.add_batch(peer, batch.batch_id, [], run, auth_keys=auth)
        return derived.id_prefix
    block = NewKeyBlock(
        derived.id_prefix,
        batch.master_sae_id,
        batch.slave_sae_id,
        batch.size_bits,
        batch.count,
        derived.material,
    )
    store.add_batch(peer, batch.batch_id, [block], run)
    return derived.id_prefix
