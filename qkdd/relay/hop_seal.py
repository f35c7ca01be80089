"""One hop of relayed QKD material, sealed information-theoretically, and the byte format of
its two messages: RELAY_KEYS (the sealed material) and RELAY_ACK (the next site has it).
Sans-IO: bytes and key material in, bytes out; the caller takes the hop's QKD keys from its
store (each once) and hands them in, and this module never touches a store.

Sealing one hop, from ``path[i]`` to ``path[i+1]`` (docs/protocol.md §10)::

    pad     = the first len(material) bytes of the pad keys' material, in order
    mac     = the first 64 bytes of the MAC keys' material, in order
    k_frame = mac[0:32], k_ack = mac[32:64]
    ciphertext = material XOR pad
    tag     = Poly1305(k_frame, lp(LABEL_RELAY_KEYS) || header || ciphertext)
    ack tag = Poly1305(k_ack, lp(LABEL_RELAY_ACK) || version || transfer_id || u8(i) || tag)

Every pad and MAC key is a QKD key of that hop used for this frame only, so the ciphertext
says nothing about the material (one-time pad) and a forgery of either tag succeeds with
probability at most 8 * ceil(L/16) / 2^106 for an L-byte MAC input, whatever the attacker's
computing power (RFC 8439 §2.5; D. J. Bernstein, "The Poly1305-AES message-authentication
code", FSE 2005, §3: the per-attempt bound holds when ``r`` and ``s`` are uniform and
used once, which fresh QKD material is). The header binds the transfer ID, the whole path,
the hop, the QKD key IDs of pad and MAC and the key count and size, so a frame cannot be
moved to another hop, transfer or set of keys.

A tag that does not verify raises ``HopTagInvalid``; every malformed body raises
``RelayFrameError`` (its base); a caller's inputs that make no valid frame raise
``RelayUsageError``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

from qkdd import labels
from qkdd.config_reader import ID_PATTERN
from qkdd.crypto import (
    ONE_TIME_MAC_KEY_SIZE,
    ONE_TIME_MAC_TAG_SIZE,
    AuthenticationFailed,
    one_time_mac,
    one_time_mac_verify,
    xor_bytes,
)
from qkdd.hybrid import lp
from qkdd.peer.peer_errors import (
    LocalProtocolError,
    PeerAuthenticationError,
    RemoteProtocolError,
)
from qkdd.peer.wire import Reader, Writer

# The byte format of both bodies; a body of another version is refused.
RELAY_FORMAT_VERSION: Final = 1
TRANSFER_ID_SIZE: Final = 16
QKD_KEY_ID_SIZE: Final = 16
# The MAC keys of a hop: one Poly1305 key for the frame, one for its ACK.
MAC_MATERIAL_SIZE: Final = 2 * ONE_TIME_MAC_KEY_SIZE
# A path of at most this many sites (source, relays, destination).
MAX_PATH_SITES: Final = 16
# At most 256 KiB of material per transfer: with its key IDs (16384 pad keys of 16 bytes at
# most) a RELAY_KEYS body stays well under the peer session's frame cap (about 1 MiB).
MAX_MATERIAL_SIZE: Final = 256 * 1024
MAX_PAD_KEYS: Final = 16384
MAX_MAC_KEYS: Final = 64
# Relayed keys are 8 to 8192 bits, whole bytes (the largest key size of the peer protocol).
MAX_KEY_BITS: Final = 8192
ACK_SIZE: Final = 1 + TRANSFER_ID_SIZE + 1 + ONE_TIME_MAC_TAG_SIZE


class RelayFrameError(RemoteProtocolError):
    """A RELAY_KEYS or RELAY_ACK body that is malformed or does not fit this hop."""


class HopTagInvalid(RelayFrameError, PeerAuthenticationError):
    """A RELAY_KEYS or RELAY_ACK tag did not verify under the hop's one-time MAC key."""


class RelayUsageError(LocalProtocolError):
    """The caller asked for something that makes no valid frame or transfer."""


@dataclass(frozen=True)
class HopKey:
    """One QKD key of a hop, as the caller's store handed it out (once)."""

    key_id: bytes
    material: bytes = field(repr=False)


@dataclass(frozen=True)
class HopKeys:
    """The QKD keys one hop consumes for one frame: the pad, then the MAC keys."""

    pad: tuple[HopKey, ...]
    mac: tuple[HopKey, ...]


@dataclass(frozen=True)
class HopHeader:
    """Everything a RELAY_KEYS frame binds besides its ciphertext."""

    transfer_id: bytes
    path: tuple[str, ...]
    hop_index: int
    key_count: int
    key_bits: int
    pad_key_ids: tuple[bytes, ...]
    mac_key_ids: tuple[bytes, ...]

    @property
    def sender(self) -> str:
        return self.path[self.hop_index]

    @property
    def receiver(self) -> str:
        return self.path[self.hop_index + 1]

    @property
    def material_size(self) -> int:
        return self.key_count * self.key_bits // 8

    def hop_problem(self, sender: str, receiver: str) -> str | None:
        """Why a frame with this header cannot have come from ``sender`` to ``receiver``,
        or None."""
        if (self.sender, self.receiver) == (sender, receiver):
            return None
        hop = f"{self.sender} -> {self.receiver}"
        return f"RELAY_KEYS for hop {hop} came on {sender} -> {receiver}"

    def problem(self) -> str | None:
        """What makes this header invalid, or None."""
        if len(self.transfer_id) != TRANSFER_ID_SIZE:
            return f"a transfer ID is {TRANSFER_ID_SIZE} bytes"
        if not 2 <= len(self.path) <= MAX_PATH_SITES:
            return f"a path has 2 to {MAX_PATH_SITES} sites, not {len(self.path)}"
        bad = next((site for site in self.path if not ID_PATTERN.fullmatch(site)), None)
        if bad is not None:
            return f"{bad!r} is not a site ID"
        if len(set(self.path)) != len(self.path):
            return "a site appears twice in the path"
        if not 0 <= self.hop_index < len(self.path) - 1:
            return f"hop {self.hop_index} is not a hop of a {len(self.path)}-site path"
        if not (8 <= self.key_bits <= MAX_KEY_BITS and self.key_bits % 8 == 0):
            return f"a relayed key is 8 to {MAX_KEY_BITS} bits, whole bytes, not {self.key_bits}"
        if self.key_count < 1 or self.material_size > MAX_MATERIAL_SIZE:
            return f"a transfer carries 1 byte to {MAX_MATERIAL_SIZE} bytes of material"
        if not 1 <= len(self.pad_key_ids) <= MAX_PAD_KEYS:
            return f"a hop uses 1 to {MAX_PAD_KEYS} pad keys"
        if not 1 <= len(self.mac_key_ids) <= MAX_MAC_KEYS:
            return f"a hop uses 1 to {MAX_MAC_KEYS} MAC keys"
        ids = self.pad_key_ids + self.mac_key_ids
        if any(len(key_id) != QKD_KEY_ID_SIZE for key_id in ids):
            return f"a QKD key ID is {QKD_KEY_ID_SIZE} bytes"
        if len(set(ids)) != len(ids):
            return "a QKD key is listed twice"
        return None

    def encode(self) -> bytes:
        problem = self.problem()
        if problem is not None:
            raise RelayUsageError(problem)
        w = Writer().u8(RELAY_FORMAT_VERSION).fixed(self.transfer_id, TRANSFER_ID_SIZE)
        w.u8(len(self.path))
        for site in self.path:
            w.text(site)
        w.u8(self.hop_index).u32(self.key_count).u16(self.key_bits)
        w.u16(len(self.pad_key_ids))
        for key_id in self.pad_key_ids:
            w.fixed(key_id, QKD_KEY_ID_SIZE)
        w.u8(len(self.mac_key_ids))
        for key_id in self.mac_key_ids:
            w.fixed(key_id, QKD_KEY_ID_SIZE)
        return w.build()


@dataclass(frozen=True)
class RelayKeysFrame:
    """A RELAY_KEYS body: the header, the material XOR the pad, the one-time tag."""

    header: HopHeader
    ciphertext: bytes = field(repr=False)
    tag: bytes

    def encode(self) -> bytes:
        return self.header.encode() + self.ciphertext + self.tag


@dataclass(frozen=True)
class RelayAck:
    """A RELAY_ACK body: the receiver of hop ``hop_index`` verified and kept the material."""

    transfer_id: bytes
    hop_index: int
    tag: bytes

    def encode(self) -> bytes:
        return (
            Writer()
            .u8(RELAY_FORMAT_VERSION)
            .fixed(self.transfer_id, TRANSFER_ID_SIZE)
            .u8(self.hop_index)
            .fixed(self.tag, ONE_TIME_MAC_TAG_SIZE)
            .build()
        )


@dataclass(frozen=True)
class SealedHop:
    """What the sending site of a hop gets: the frame, and the key its ACK must verify under
    (held until the ACK comes or the transfer is abandoned)."""

    frame: RelayKeysFrame
    ack_key: bytes = field(repr=False)


@dataclass(frozen=True)
class OpenedHop:
    """What the receiving site of a hop gets: the material, and the key to ACK it with."""

    material: bytes = field(repr=False)
    ack_key: bytes = field(repr=False)


# -- Decoding ----------------------------------------------------------------------------


def decode_relay_keys(body: bytes) -> RelayKeysFrame:
    """A RELAY_KEYS body; ``RelayFrameError`` for anything malformed."""
    try:
        r = Reader(body, "RELAY_KEYS")
        _check_version(r.u8(), "RELAY_KEYS")
        transfer_id = r.fixed(TRANSFER_ID_SIZE)
        path = tuple(r.text() for _ in range(r.u8()))
        hop_index, key_count, key_bits = r.u8(), r.u32(), r.u16()
        pad_key_ids = tuple(r.fixed(QKD_KEY_ID_SIZE) for _ in range(r.u16()))
        mac_key_ids = tuple(r.fixed(QKD_KEY_ID_SIZE) for _ in range(r.u8()))
        header = HopHeader(
            transfer_id, path, hop_index, key_count, key_bits, pad_key_ids, mac_key_ids
        )
        problem = header.problem()
        if problem is not None:
            raise RelayFrameError(f"RELAY_KEYS: {problem}")
        # Every field has one encoding (counts are the tuples' lengths, IDs are ASCII), so
        # ``header.encode()``, the MAC input, is the bytes that came.
        ciphertext = r.fixed(header.material_size)
        tag = r.fixed(ONE_TIME_MAC_TAG_SIZE)
        r.end()
    except RelayFrameError:
        raise
    except RemoteProtocolError as e:
        raise RelayFrameError(str(e)) from None
    return RelayKeysFrame(header, ciphertext, tag)


def decode_relay_ack(body: bytes) -> RelayAck:
    """A RELAY_ACK body; ``RelayFrameError`` for anything malformed."""
    if len(body) != ACK_SIZE:
        raise RelayFrameError(f"RELAY_ACK: {len(body)} bytes, not {ACK_SIZE}")
    r = Reader(body, "RELAY_ACK")
    _check_version(r.u8(), "RELAY_ACK")
    transfer_id, hop_index = r.fixed(TRANSFER_ID_SIZE), r.u8()
    if hop_index >= MAX_PATH_SITES - 1:
        raise RelayFrameError(f"RELAY_ACK: hop {hop_index} is beyond the longest path")
    return RelayAck(transfer_id, hop_index, r.fixed(ONE_TIME_MAC_TAG_SIZE))


def _check_version(version: int, what: str) -> None:
    if version != RELAY_FORMAT_VERSION:
        raise RelayFrameError(f"{what}: format version {version}, not {RELAY_FORMAT_VERSION}")


# -- Sealing and opening -----------------------------------------------------------------


def hop_keys_needed(material_size: int, qkd_key_size: int) -> tuple[int, int]:
    """How many QKD keys of ``qkd_key_size`` bytes one hop takes for ``material_size``
    bytes: (pad keys, MAC keys). The rest of the last key of each is consumed unused."""
    if material_size < 1 or qkd_key_size < 1:
        raise RelayUsageError("sizes are positive")
    return -(-material_size // qkd_key_size), -(-MAC_MATERIAL_SIZE // qkd_key_size)


def seal_hop(
    transfer_id: bytes,
    path: Sequence[str],
    hop_index: int,
    key_bits: int,
    material: bytes,
    keys: HopKeys,
) -> SealedHop:
    """Seal ``material`` (whole keys of ``key_bits``) for hop ``hop_index`` of ``path``
    under the hop's fresh QKD keys, which must each be needed and used for nothing else."""
    if key_bits < 8 or key_bits % 8 or not material or len(material) % (key_bits // 8):
        raise RelayUsageError(f"the material is not whole keys of {key_bits} bits")
    header = HopHeader(
        transfer_id,
        tuple(path),
        hop_index,
        len(material) // (key_bits // 8),
        key_bits,
        tuple(key.key_id for key in keys.pad),
        tuple(key.key_id for key in keys.mac),
    )
    header_bytes = header.encode()
    pad = _cover(keys.pad, len(material), "pad", RelayUsageError)
    mac = _cover(keys.mac, MAC_MATERIAL_SIZE, "MAC", RelayUsageError)
    ciphertext = xor_bytes(material, pad)
    tag = one_time_mac(mac[:ONE_TIME_MAC_KEY_SIZE], _frame_mac_input(header_bytes, ciphertext))
    return SealedHop(RelayKeysFrame(header, ciphertext, tag), mac[ONE_TIME_MAC_KEY_SIZE:])


def open_hop(frame: RelayKeysFrame, keys: HopKeys, *, sender: str, receiver: str) -> OpenedHop:
    """The material of a frame that came from ``sender`` to ``receiver`` (this site), given
    the QKD keys its header names. ``HopTagInvalid`` if the tag does not verify;
    ``RelayFrameError`` if the frame is for another hop or the keys do not fit it."""
    header = frame.header
    problem = header.hop_problem(sender, receiver)
    if problem is not None:
        raise RelayFrameError(problem)
    if tuple(key.key_id for key in keys.pad) != header.pad_key_ids or (
        tuple(key.key_id for key in keys.mac) != header.mac_key_ids
    ):
        raise RelayFrameError("RELAY_KEYS: the keys given are not the keys the header names")
    pad = _cover(keys.pad, header.material_size, "pad", RelayFrameError)
    mac = _cover(keys.mac, MAC_MATERIAL_SIZE, "MAC", RelayFrameError)
    message = _frame_mac_input(header.encode(), frame.ciphertext)
    try:
        one_time_mac_verify(mac[:ONE_TIME_MAC_KEY_SIZE], message, frame.tag)
    except AuthenticationFailed:
        raise HopTagInvalid("RELAY_KEYS: the one-time tag did not verify") from None
    return OpenedHop(xor_bytes(frame.ciphertext, pad), mac[ONE_TIME_MAC_KEY_SIZE:])


def make_ack(frame: RelayKeysFrame, ack_key: bytes) -> RelayAck:
    """The receiver's ACK of ``frame``, under the ACK key ``open_hop`` gave it."""
    header = frame.header
    tag = one_time_mac(ack_key, _ack_mac_input(header.transfer_id, header.hop_index, frame.tag))
    return RelayAck(header.transfer_id, header.hop_index, tag)


def verify_ack(ack: RelayAck, frame: RelayKeysFrame, ack_key: bytes) -> None:
    """Nothing if ``ack`` acknowledges exactly ``frame``; ``RelayFrameError`` (or
    ``HopTagInvalid``) otherwise."""
    header = frame.header
    if (ack.transfer_id, ack.hop_index) != (header.transfer_id, header.hop_index):
        raise RelayFrameError("RELAY_ACK names another transfer or hop")
    message = _ack_mac_input(header.transfer_id, header.hop_index, frame.tag)
    try:
        one_time_mac_verify(ack_key, message, ack.tag)
    except AuthenticationFailed:
        raise HopTagInvalid("RELAY_ACK: the one-time tag did not verify") from None


def _frame_mac_input(header_bytes: bytes, ciphertext: bytes) -> bytes:
    return lp(labels.LABEL_RELAY_KEYS) + header_bytes + ciphertext


def _ack_mac_input(transfer_id: bytes, hop_index: int, frame_tag: bytes) -> bytes:
    return (
        lp(labels.LABEL_RELAY_ACK)
        + bytes([RELAY_FORMAT_VERSION])
        + transfer_id
        + bytes([hop_index])
        + frame_tag
    )


def _cover(
    keys: Sequence[HopKey], needed: int, what: str, error: type[RelayFrameError | RelayUsageError]
) -> bytes:
    """The first ``needed`` bytes of the keys' material, in order. Every key must add to
    it: a key listed but not needed would be consumed for nothing."""
    total = 0
    for index, key in enumerate(keys):
        if total >= needed:
            raise error(f"{what} key {index} is not needed ({needed} bytes are covered)")
        if not key.material:
            raise error(f"{what} key {index} has no material")
        total += len(key.material)
    if total < needed:
        raise error(f"the {what} keys cover {total} bytes, {needed} are needed")
    return b"".join(key.material for key in keys)[:needed]
