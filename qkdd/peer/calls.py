"""Peer calls: requests one site's daemon makes of the other's over their session, and the
bookkeeping that pairs each reply with its call. Sans-IO: bodies encode to bytes and decode
from bytes; `CallTable` numbers calls and matches replies without touching a socket.

A call is answered once, by CALL_REPLY, after the callee has made its effect durable; the
caller treats a session that ends before the reply as "outcome unknown". Every kind is
built so that such a caller can simply give up: nothing it hands an application depends
on an unanswered call.

    KEY_ASSIGN  master KME -> slave KME: keys of a size other than the site key size, or for
                more than one slave SAE, made from ready keys the two sites already share
    MESSAGE     sender's site -> recipient's site: an application message sealed under a
                hybrid key both sites hold (``qkdd.messaging``)
    WG_INSTALL  link master -> link slave: install hybrid key X as a WireGuard PSK
    IPSEC_INSTALL  link master -> link slave: install hybrid key X as an IPsec PPK
    RELAY_CONFIRM  destination -> source of relayed QKD material, end to end: it holds it
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import ClassVar, Final, Self

from qkdd.peer.agreement_messages import CallOutcome, CallReply, PeerCall
from qkdd.peer.peer_errors import RemoteProtocolError
from qkdd.peer.wire import Reader, Writer

MAX_ASSIGNMENTS: Final = 1024
MAX_CONSTITUENTS: Final = 64
MAX_SLAVES: Final = 16
# A message of at most 1 MiB, plus its tag.
MAX_MESSAGE_CIPHERTEXT: Final = 1024 * 1024 + 1024


class CallKind:
    KEY_ASSIGN: Final = 1
    MESSAGE: Final = 2
    WG_INSTALL: Final = 3
    IPSEC_INSTALL: Final = 4
    # End to end, destination -> source of a relayed transfer: it holds the material
    # (body: the 16-byte transfer ID and the 32-byte check of the material,
    # qkdd.hybrid.relayed_material_check; empty reply). docs/protocol.md §12.3.
    RELAY_CONFIRM: Final = 5


def _uuid_bytes(value: str) -> bytes:
    return uuid.UUID(value).bytes


def _read_uuid(r: Reader) -> str:
    return str(uuid.UUID(bytes=r.fixed(16)))


@dataclass(frozen=True)
class KeyAssignment:
    """One key handed to a master SAE: ``size_bits`` taken from the concatenated material of
    ``constituent_ids`` (ready keys of the pair master -> first slave), for every slave."""

    key_id: str
    size_bits: int
    master_sae: str
    slave_saes: tuple[str, ...]
    constituent_ids: tuple[str, ...]


@dataclass(frozen=True)
class KeyAssign:
    assignments: tuple[KeyAssignment, ...]

    def encode(self) -> bytes:
        w = Writer().u16(len(self.assignments))
        for a in self.assignments:
            w.fixed(_uuid_bytes(a.key_id), 16).u16(a.size_bits).text(a.master_sae)
            w.u8(len(a.slave_saes))
            for slave in a.slave_saes:
                w.text(slave)
            w.u8(len(a.constituent_ids))
            for cid in a.constituent_ids:
                w.fixed(_uuid_bytes(cid), 16)
        return w.build()

    @classmethod
    def decode(cls, body: bytes) -> KeyAssign:
        r = Reader(body, "KEY_ASSIGN")
        count = r.u16()
        if not 1 <= count <= MAX_ASSIGNMENTS:
            raise RemoteProtocolError(f"KEY_ASSIGN: {count} keys, allowed 1-{MAX_ASSIGNMENTS}")
        out = []
        for _ in range(count):
            key_id, size_bits, master = _read_uuid(r), r.u16(), r.text()
            if size_bits == 0 or size_bits % 8:
                raise RemoteProtocolError("KEY_ASSIGN: key size is not a positive multiple of 8")
            slaves = tuple(r.text() for _ in range(r.u8()))
            constituents = tuple(_read_uuid(r) for _ in range(r.u8()))
            if not 1 <= len(slaves) <= MAX_SLAVES:
                raise RemoteProtocolError("KEY_ASSIGN: bad slave SAE count")
            if not 1 <= len(constituents) <= MAX_CONSTITUENTS:
                raise RemoteProtocolError("KEY_ASSIGN: bad constituent count")
            out.append(KeyAssignment(key_id, size_bits, master, slaves, constituents))
        r.end()
        return cls(tuple(out))


class Protection:
    HYBRID: Final = 1  # AEAD under a fresh hybrid key used once
    OTP: Final = 2  # one-time pad of QKD material with a one-time MAC


# A one-time-pad message of 1 MiB uses 1025 pads of 1 KiB.
MAX_KEYS_PER_MESSAGE: Final = 2048


@dataclass(frozen=True)
class SealedMessage:
    """An application message on its way to the recipient's site, with the IDs of the keys
    that protect it: one hybrid key, or the one-time pads, in order."""

    message_id: str
    sender_sae: str
    recipient_sae: str
    protection: int
    key_ids: tuple[str, ...]
    ciphertext: bytes = field(repr=False)

    def encode(self) -> bytes:
        w = (
            Writer()
            .fixed(_uuid_bytes(self.message_id), 16)
            .text(self.sender_sae)
            .text(self.recipient_sae)
            .u8(self.protection)
            .u16(len(self.key_ids))
        )
        for key_id in self.key_ids:
            w.fixed(_uuid_bytes(key_id), 16)
        return w.blob(self.ciphertext).build()

    @classmethod
    def decode(cls, body: bytes) -> SealedMessage:
        r = Reader(body, "MESSAGE")
        message_id, sender, recipient, protection = _read_uuid(r), r.text(), r.text(), r.u8()
        count = r.u16()
        if protection == Protection.HYBRID and count != 1:
            raise RemoteProtocolError("MESSAGE: a hybrid message names exactly one key")
        if protection == Protection.OTP and not 1 <= count <= MAX_KEYS_PER_MESSAGE:
            raise RemoteProtocolError(f"MESSAGE: {count} pads, allowed 1-{MAX_KEYS_PER_MESSAGE}")
        if protection not in (Protection.HYBRID, Protection.OTP):
            raise RemoteProtocolError(f"MESSAGE: unknown protection {protection}")
        key_ids = tuple(_read_uuid(r) for _ in range(count))
        message = cls(
            message_id, sender, recipient, protection, key_ids, r.blob(MAX_MESSAGE_CIPHERTEXT)
        )
        r.end()
        return message


@dataclass(frozen=True)
class BindingInstall:
    """A tunnel binding's key install: the binding's name and the ID of the key to install
    (WG_INSTALL and IPSEC_INSTALL share this body)."""

    binding: str
    key_id: str
    CALL: ClassVar[str] = "BINDING_INSTALL"  # the call's name in errors

    def encode(self) -> bytes:
        return Writer().text(self.binding).fixed(_uuid_bytes(self.key_id), 16).build()

    @classmethod
    def decode(cls, body: bytes) -> Self:
        r = Reader(body, cls.CALL)
        install = cls(r.text(), _read_uuid(r))
        r.end()
        return install


class WgInstall(BindingInstall):
    CALL = "WG_INSTALL"


class IpsecInstall(BindingInstall):
    CALL = "IPSEC_INSTALL"


class CallRefused(Exception):
    """The callee declined the call; the message is its reason, sent back to the caller."""


class CallTable:
    """Numbers outgoing calls and matches replies to them. A reply to a call never made (or
    already answered) is a protocol error: the peer is confused or malicious."""

    def __init__(self) -> None:
        self._next_id = 1
        self._open: set[int] = set()

    def call(self, kind: int, body: bytes) -> PeerCall:
        call = PeerCall(self._next_id, kind, body)
        self._next_id += 1
        self._open.add(call.call_id)
        return call

    def on_reply(self, reply: CallReply) -> CallReply:
        """Check that the reply answers an open call, and close the call."""
        if reply.call_id not in self._open:
            raise RemoteProtocolError(f"CALL_REPLY for unknown call {reply.call_id}")
        self._open.discard(reply.call_id)
        return reply

    @property
    def open_calls(self) -> frozenset[int]:
        return frozenset(self._open)


def reply_body(reply: CallReply) -> bytes:
    """The reply's body; CallRefused carrying the callee's reason for a refusal."""
    if reply.outcome == CallOutcome.REFUSED:
        raise CallRefused(reply.body.decode(errors="replace"))
    return reply.body


def refusal(call: PeerCall, reason: str) -> CallReply:
    return CallReply(call.call_id, CallOutcome.REFUSED, reason.encode()[:4096])


def done(call: PeerCall, body: bytes = b"") -> CallReply:
    return CallReply(call.call_id, CallOutcome.DONE, body)
