"""Key-agreement messages carried inside an established session (sans-IO encode/decode).

Each message is ``type (1) | body``. Flow between the link master (picks QKD key IDs) and
the link slave:

    both              STORE_ID    the sender's key-store identity (first message of a session)
    slave  -> master  RESYNC      batch IDs the slave holds but has not seen committed
    slave  -> master  KEM_OFFER   a fresh ML-KEM-768 encapsulation key (used once)
    slave  -> master  POOL_DEMAND how many keys the slave's local master SAEs want
    slave  -> master  PAD_DEMAND  how many one-time pads the slave's local senders want
    both              QKD_HORIZON the sender's oldest QKD keys and its newest (buffers line up;
                                  also the heartbeat of a quiet session)
    both              QKD_SKIP    QKD keys of the receiver's horizon that can never be agreed
    master -> slave   KEY_BATCH   purpose, ML-KEM ciphertext, SAE pair, key size and count,
                                  the run of QKD keys it uses (first ID, count, digest)
    slave  -> master  BATCH_ACK   stored (or rejected, with the reason)
    master -> slave   BATCH_DECISION  commit (keys become deliverable) or abort
    either -> other   PEER_CALL   a request the other site's daemon must act on and answer
                                  (kinds and bodies: ``qkdd.peer.calls``)
    other  -> either  CALL_REPLY  its outcome: done (with a body) or refused (with a reason)
    either -> other   RELAY_KEYS, RELAY_ACK, LINK_STATE, ROUTED: the QKD network's messages
                                  (``qkdd.peer.network_messages``), not the agreement's
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Final

from qkdd.crypto import KEM_CIPHERTEXT_SIZE, KEM_PUBLIC_KEY_SIZE
from qkdd.peer.network_messages import NETWORK_MESSAGES, NetworkMessage
from qkdd.peer.peer_errors import RemoteProtocolError
from qkdd.peer.wire import Reader, Writer

# A batch holds at most this many keys and consumes at most this many QKD keys (16 MiB
# of QKD material at most at 256 bits each; the frame cap below bounds a listed run).
MAX_KEYS_PER_BATCH: Final = 65536
MAX_QKD_KEYS_PER_BATCH: Final = 65536
# The largest key (an authentication key or a one-time pad) in bits.
MAX_KEY_BITS: Final = 8192
MAX_DEMAND_ENTRIES: Final = 256
MAX_RESYNC_BATCHES: Final = 1024
MAX_REASON_LENGTH: Final = 512
STORE_ID_SIZE: Final = 16
# A horizon lists at most this many of the sender's oldest QKD keys (64 KiB of IDs): the
# default QKD buffer fits in one. The sender starts at HORIZON_KEYS_FIRST and doubles while
# the peer keeps skipping everything it listed (a long run the peer never got).
MAX_HORIZON_KEYS: Final = 4096
HORIZON_KEYS_FIRST: Final = 64
# A call body carries at most one application message (capped at 1 MiB) and its framing:
# up to MAX_KEYS_PER_MESSAGE (2048) key IDs of 16 bytes, SAE IDs and lengths.
MAX_CALL_BODY: Final = 1024 * 1024 + 64 * 1024


class BatchPurpose:
    APPLICATION_KEYS: Final = 0  # hybrid keys for applications (SAE pairs)
    AUTHENTICATION_KEYS: Final = 1  # PSKs that authenticate the next handshakes
    PADS: Final = 2  # raw QKD material for one-time-pad messages (no ML-KEM input)


class MessageType:
    KEM_OFFER: Final = 0x01
    KEY_BATCH: Final = 0x02
    BATCH_ACK: Final = 0x03
    BATCH_DECISION: Final = 0x04
    POOL_DEMAND: Final = 0x05
    RESYNC: Final = 0x06
    STORE_ID: Final = 0x07
    QKD_HORIZON: Final = 0x08
    PEER_CALL: Final = 0x09
    CALL_REPLY: Final = 0x0A
    PAD_DEMAND: Final = 0x0B
    QKD_SKIP: Final = 0x0C


class CallOutcome:
    DONE: Final = 0
    REFUSED: Final = 1  # the body is the reason, UTF-8


@dataclass(frozen=True)
class KemOffer:
    offer_id: int
    public_key: bytes

    def encode(self) -> bytes:
        return (
            Writer()
            .u8(MessageType.KEM_OFFER)
            .u32(self.offer_id)
            .fixed(self.public_key, KEM_PUBLIC_KEY_SIZE)
            .build()
        )

    @classmethod
    def read(cls, r: Reader) -> KemOffer:
        return cls(r.u32(), r.fixed(KEM_PUBLIC_KEY_SIZE))


@dataclass(frozen=True)
class KeyBatch:
    """``count`` keys of one SAE pair and one size, made from a run of QKD keys.

    The run is named by its first QKD key ID, its length and SHA-256 over its 16-byte key
    IDs in order (``qkdd.hybrid.qkd_ids_digest``): both buffers hold the device's stream in
    the same order, so the slave finds the same run without a list of IDs. On a link whose
    slave must ask its device for keys by ID (an ETSI 014 KME), the IDs are listed too
    (``qkd_key_ids``). Key IDs are not carried: both sides derive them (``qkdd.hybrid``)."""

    batch_id: int
    offer_id: int
    purpose: int
    kem_ciphertext: bytes
    master_sae_id: str
    slave_sae_id: str
    size_bits: int
    count: int
    qkd_first_key_id: bytes
    qkd_key_count: int
    qkd_ids_digest: bytes
    qkd_key_ids: tuple[bytes, ...] = ()

    def encode(self) -> bytes:
        w = (
            Writer()
            .u8(MessageType.KEY_BATCH)
            .u64(self.batch_id)
            .u32(self.offer_id)
            .u8(self.purpose)
            .fixed(self.kem_ciphertext, KEM_CIPHERTEXT_SIZE)
            .text(self.master_sae_id)
            .text(self.slave_sae_id)
            .u32(self.size_bits)
            .u32(self.count)
            .fixed(self.qkd_first_key_id, 16)
            .u32(self.qkd_key_count)
            .fixed(self.qkd_ids_digest, 32)
            .u32(len(self.qkd_key_ids))
        )
        return w.build() + b"".join(self.qkd_key_ids)

    @classmethod
    def read(cls, r: Reader) -> KeyBatch:
        batch_id, offer_id, purpose = r.u64(), r.u32(), r.u8()
        if purpose not in (
            BatchPurpose.APPLICATION_KEYS,
            BatchPurpose.AUTHENTICATION_KEYS,
            BatchPurpose.PADS,
        ):
            raise RemoteProtocolError(f"KEY_BATCH: unknown purpose {purpose}")
        ciphertext = r.fixed(KEM_CIPHERTEXT_SIZE)
        master, slave = r.text(), r.text()
        size_bits, count = r.u32(), r.u32()
        if not 8 <= size_bits <= MAX_KEY_BITS or size_bits % 8:
            raise RemoteProtocolError(
                f"KEY_BATCH: key size {size_bits} is not a multiple of 8 in 8-{MAX_KEY_BITS}"
            )
        if not 1 <= count <= MAX_KEYS_PER_BATCH:
            raise RemoteProtocolError(f"KEY_BATCH: {count} keys, allowed 1-{MAX_KEYS_PER_BATCH}")
        first, qkd_count, digest = r.fixed(16), r.u32(), r.fixed(32)
        if not 1 <= qkd_count <= MAX_QKD_KEYS_PER_BATCH:
            raise RemoteProtocolError(
                f"KEY_BATCH: {qkd_count} QKD keys, allowed 1-{MAX_QKD_KEYS_PER_BATCH}"
            )
        listed = r.u32()
        if listed not in (0, qkd_count):
            raise RemoteProtocolError("KEY_BATCH: the QKD key list does not match its count")
        ids = tuple(r.fixed(16) for _ in range(listed))
        if ids and ids[0] != first:
            raise RemoteProtocolError("KEY_BATCH: the QKD key list does not start at its first key")
        return cls(
            batch_id,
            offer_id,
            purpose,
            ciphertext,
            master,
            slave,
            size_bits,
            count,
            first,
            qkd_count,
            digest,
            ids,
        )


@dataclass(frozen=True)
class BatchAck:
    batch_id: int
    accepted: bool
    reason: str = ""

    def encode(self) -> bytes:
        reason = self.reason.encode()[:MAX_REASON_LENGTH]
        return (
            Writer()
            .u8(MessageType.BATCH_ACK)
            .u64(self.batch_id)
            .u8(1 if self.accepted else 0)
            .blob(reason)
            .build()
        )

    @classmethod
    def read(cls, r: Reader) -> BatchAck:
        batch_id, accepted = r.u64(), r.u8()
        if accepted not in (0, 1):
            raise RemoteProtocolError("BATCH_ACK: bad flag")
        reason = r.blob(MAX_REASON_LENGTH).decode(errors="replace")
        return cls(batch_id, bool(accepted), reason)


@dataclass(frozen=True)
class BatchDecision:
    batch_id: int
    commit: bool

    def encode(self) -> bytes:
        return (
            Writer()
            .u8(MessageType.BATCH_DECISION)
            .u64(self.batch_id)
            .u8(1 if self.commit else 0)
            .build()
        )

    @classmethod
    def read(cls, r: Reader) -> BatchDecision:
        batch_id, commit = r.u64(), r.u8()
        if commit not in (0, 1):
            raise RemoteProtocolError("BATCH_DECISION: bad flag")
        return cls(batch_id, bool(commit))


@dataclass(frozen=True)
class PoolDemand:
    wanted: tuple[tuple[str, str, int], ...]  # (master SAE, slave SAE, keys wanted)

    def encode(self) -> bytes:
        w = Writer().u8(MessageType.POOL_DEMAND).u16(len(self.wanted))
        for master, slave, count in self.wanted:
            w.text(master).text(slave).u32(count)
        return w.build()

    @classmethod
    def read(cls, r: Reader) -> PoolDemand:
        count = r.u16()
        if count > MAX_DEMAND_ENTRIES:
            raise RemoteProtocolError("POOL_DEMAND: too many entries")
        return cls(tuple((r.text(), r.text(), r.u32()) for _ in range(count)))


@dataclass(frozen=True)
class PadDemand:
    """Like POOL_DEMAND, for one-time pads: (sender SAE, recipient SAE, pads wanted)."""

    wanted: tuple[tuple[str, str, int], ...]

    def encode(self) -> bytes:
        w = Writer().u8(MessageType.PAD_DEMAND).u16(len(self.wanted))
        for sender, recipient, count in self.wanted:
            w.text(sender).text(recipient).u32(count)
        return w.build()

    @classmethod
    def read(cls, r: Reader) -> PadDemand:
        count = r.u16()
        if count > MAX_DEMAND_ENTRIES:
            raise RemoteProtocolError("PAD_DEMAND: too many entries")
        return cls(tuple((r.text(), r.text(), r.u32()) for _ in range(count)))


@dataclass(frozen=True)
class Resync:
    pending_batch_ids: tuple[int, ...]

    def encode(self) -> bytes:
        w = Writer().u8(MessageType.RESYNC).u16(len(self.pending_batch_ids))
        for batch_id in self.pending_batch_ids:
            w.u64(batch_id)
        return w.build()

    @classmethod
    def read(cls, r: Reader) -> Resync:
        count = r.u16()
        if count > MAX_RESYNC_BATCHES:
            raise RemoteProtocolError("RESYNC: too many batches")
        return cls(tuple(r.u64() for _ in range(count)))


@dataclass(frozen=True)
class StoreId:
    """The sender's key-store identity; a change means the sender lost its state."""

    store_id: bytes

    def encode(self) -> bytes:
        return Writer().u8(MessageType.STORE_ID).fixed(self.store_id, STORE_ID_SIZE).build()

    @classmethod
    def read(cls, r: Reader) -> StoreId:
        return cls(r.fixed(STORE_ID_SIZE))


@dataclass(frozen=True)
class QkdHorizon:
    """The sender's oldest buffered QKD keys, oldest first, and its newest one.

    Keys the receiver holds that come before the first of these it also holds are orphans
    (the sender never had them, or moved past them). The newest key lets the receiver
    prove that listed keys it lacks will never come: its own device already delivered a
    key that the sender's device delivered after them. An empty list (the sender's buffer
    is empty) carries no newest key; it still tells the peer the session is alive."""

    oldest_key_ids: tuple[str, ...]
    newest_key_id: str | None = None

    def encode(self) -> bytes:
        w = Writer().u8(MessageType.QKD_HORIZON).u16(len(self.oldest_key_ids))
        for key_id in self.oldest_key_ids:
            w.fixed(uuid.UUID(key_id).bytes, 16)
        if self.newest_key_id is None:
            w.u8(0)
        else:
            w.u8(1).fixed(uuid.UUID(self.newest_key_id).bytes, 16)
        return w.build()

    @classmethod
    def read(cls, r: Reader) -> QkdHorizon:
        count = r.u16()
        if count > MAX_HORIZON_KEYS:
            raise RemoteProtocolError(f"QKD_HORIZON: {count} keys, allowed 0-{MAX_HORIZON_KEYS}")
        oldest = tuple(str(uuid.UUID(bytes=r.fixed(16))) for _ in range(count))
        has_newest = r.u8()
        if has_newest not in (0, 1) or (has_newest and not count):
            raise RemoteProtocolError("QKD_HORIZON: bad newest-key flag")
        newest = str(uuid.UUID(bytes=r.fixed(16))) if has_newest else None
        return cls(oldest, newest)


@dataclass(frozen=True)
class QkdSkip:
    """QKD key IDs from the receiver's last horizon that can never be agreed: the sender
    never got them although its device delivered a later key, or it used them already.
    The sender has marked them used; the receiver does the same (never unmarks)."""

    key_ids: tuple[str, ...]

    def encode(self) -> bytes:
        w = Writer().u8(MessageType.QKD_SKIP).u16(len(self.key_ids))
        for key_id in self.key_ids:
            w.fixed(uuid.UUID(key_id).bytes, 16)
        return w.build()

    @classmethod
    def read(cls, r: Reader) -> QkdSkip:
        count = r.u16()
        if not 1 <= count <= MAX_HORIZON_KEYS:
            raise RemoteProtocolError(f"QKD_SKIP: {count} keys, allowed 1-{MAX_HORIZON_KEYS}")
        return cls(tuple(str(uuid.UUID(bytes=r.fixed(16))) for _ in range(count)))


@dataclass(frozen=True)
class PeerCall:
    """A request to the other site's daemon; answered by exactly one CALL_REPLY."""

    call_id: int
    kind: int
    body: bytes

    def encode(self) -> bytes:
        return (
            Writer().u8(MessageType.PEER_CALL).u64(self.call_id).u8(self.kind).blob(self.body)
        ).build()

    @classmethod
    def read(cls, r: Reader) -> PeerCall:
        return cls(r.u64(), r.u8(), r.blob(MAX_CALL_BODY))


@dataclass(frozen=True)
class CallReply:
    call_id: int
    outcome: int
    body: bytes

    def encode(self) -> bytes:
        return (
            Writer().u8(MessageType.CALL_REPLY).u64(self.call_id).u8(self.outcome).blob(self.body)
        ).build()

    @classmethod
    def read(cls, r: Reader) -> CallReply:
        call_id, outcome = r.u64(), r.u8()
        if outcome not in (CallOutcome.DONE, CallOutcome.REFUSED):
            raise RemoteProtocolError(f"CALL_REPLY: unknown outcome {outcome}")
        return cls(call_id, outcome, r.blob(MAX_CALL_BODY))


LinkMessage = (
    KemOffer
    | KeyBatch
    | BatchAck
    | BatchDecision
    | PoolDemand
    | PadDemand
    | Resync
    | StoreId
    | QkdHorizon
    | QkdSkip
    | PeerCall
    | CallReply
    | NetworkMessage
)

_DECODERS: dict[int, type[LinkMessage]] = {
    MessageType.KEM_OFFER: KemOffer,
    MessageType.KEY_BATCH: KeyBatch,
    MessageType.BATCH_ACK: BatchAck,
    MessageType.BATCH_DECISION: BatchDecision,
    MessageType.POOL_DEMAND: PoolDemand,
    MessageType.RESYNC: Resync,
    MessageType.STORE_ID: StoreId,
    MessageType.QKD_HORIZON: QkdHorizon,
    MessageType.PEER_CALL: PeerCall,
    MessageType.CALL_REPLY: CallReply,
    MessageType.PAD_DEMAND: PadDemand,
    MessageType.QKD_SKIP: QkdSkip,
    # Types 0x0D-0x10: the QKD network's messages (qkdd.peer.network_messages).
    **{network.TYPE: network for network in NETWORK_MESSAGES},
}


def decode_message(payload: bytes) -> LinkMessage:
    if not payload:
        raise RemoteProtocolError("empty link message")
    decoder = _DECODERS.get(payload[0])
    if decoder is None:
        raise RemoteProtocolError(f"unknown link message type 0x{payload[0]:02x}")
    r = Reader(payload[1:], decoder.__name__)
    message = decoder.read(r)  # type: ignore[attr-defined]
    r.end()
    return message
