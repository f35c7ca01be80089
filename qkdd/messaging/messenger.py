"""Secure messages between applications at different sites: `Messenger` seals and sends them
and opens and stores those that arrive.

An application hands its local daemon a message for an SAE at a peer site, protected one of
two ways:

- ``hybrid`` (the default): the daemon takes one ready hybrid key of the pair sender ->
  recipient (both sites hold it: it came out of the same key agreement), derives a one-time
  AEAD key from it bound to the message ID and both SAEs, and seals the message.
- ``otp``: the daemon takes one-time pads of the pair (raw QKD material both sites hold,
  ``qkdd.peer.agreement``), enough for a 32-byte one-time MAC key and the message; the ciphertext is
  the message XOR the pad, authenticated with Poly1305 under the MAC key. Nothing in this
  depends on a computational assumption: it is as secure as the QKD material.

It sends the result to the recipient's site in a MESSAGE peer call. That site takes the
same key (or pads) by ID, opens the message and stores it in the recipient's inbox, erasing
what it used, in one transaction (``qkdd.messaging.inbox``); only then does it answer, and only then
does the sender's call return the message ID. Keys and pads are used once and never leave
either daemon.

Exactly once: a sender that hears nothing (its site or the link failed) sends again with
the same message ID; the recipient's site stores a message ID once per sender SAE. Order:
per sender -> recipient pair, the order the recipient's site stored them, which is the
order of the sends as long as each send waits for the previous one to return.
"""

from __future__ import annotations

import functools
import logging
import sqlite3
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import trio

from qkdd import labels
from qkdd.constants import DELIVERY_TIMEOUT, MAX_MESSAGE_SIZE
from qkdd.crypto import (
    AEAD_KEY_SIZE,
    AEAD_NONCE_SIZE,
    MESSAGE_AEAD_ALGORITHM,
    ONE_TIME_MAC_KEY_SIZE,
    ONE_TIME_MAC_TAG_SIZE,
    Aead,
    AuthenticationFailed,
    hkdf,
    one_time_mac,
    one_time_mac_verify,
    xor_bytes,
)
from qkdd.errors import MessagingError
from qkdd.hybrid import lp
from qkdd.keystore import HybridKey, KeyStore
from qkdd.messaging.inbox import Inbox, InboxError, ReceivedMessage
from qkdd.peer.calls import CallKind, CallRefused, Protection, SealedMessage
from qkdd.store_pool import HasConfig, PeerCaller

log = logging.getLogger("qkdd.messages")

PROTECTION_NAMES: Final = {Protection.HYBRID: "hybrid", Protection.OTP: "otp"}
PROTECTIONS: Final = {name: code for code, name in PROTECTION_NAMES.items()}
# A one-time key: one message, so a fixed nonce never repeats under it.
_NONCE: Final = bytes(AEAD_NONCE_SIZE)


class BadMessage(MessagingError):
    """The request cannot be sent as asked (unknown recipient, too large...); HTTP 400."""


class NotDelivered(MessagingError):
    """The message was not stored at the recipient's site (it may be retried with the same
    message ID); HTTP 503."""


def _binding(message_id: str, sender_sae: str, recipient_sae: str, key_id: str) -> bytes:
    return (
        lp(message_id.encode())
        + lp(sender_sae.encode())
        + lp(recipient_sae.encode())
        + lp(key_id.encode())
    )


def _one_time_aead(key: HybridKey, binding: bytes) -> Aead:
    return Aead(
        hkdf(b"", key.material, lp(labels.LABEL_MESSAGE_KEY) + binding, AEAD_KEY_SIZE),
        MESSAGE_AEAD_ALGORITHM,
    )


def pad_bytes_needed(body_size: int) -> int:
    """One-time pad a message of ``body_size`` bytes uses: the MAC key, then the body."""
    return ONE_TIME_MAC_KEY_SIZE + body_size


def _pad_binding(
    message_id: str, sender_sae: str, recipient_sae: str, pads: list[HybridKey]
) -> bytes:
    ids = ",".join(p.key_id for p in pads).encode()
    return (
        lp(labels.AAD_MESSAGE)
        + lp(message_id.encode())
        + lp(sender_sae.encode())
        + lp(recipient_sae.encode())
        + lp(ids)
    )


def otp_seal(
    pads: list[HybridKey], message_id: str, sender_sae: str, recipient_sae: str, body: bytes
) -> bytes:
    """body XOR pad, then a one-time MAC over the message's identity and the ciphertext."""
    stream = b"".join(p.material for p in pads)
    if len(stream) < pad_bytes_needed(len(body)):
        raise ValueError("the pads do not cover the message")
    mac_key, pad = stream[:ONE_TIME_MAC_KEY_SIZE], stream[ONE_TIME_MAC_KEY_SIZE:]
    ciphertext = xor_bytes(body, pad[: len(body)])
    binding = _pad_binding(message_id, sender_sae, recipient_sae, pads)
    return ciphertext + one_time_mac(mac_key, binding + ciphertext)


def otp_open(
    pads: list[HybridKey], message_id: str, sender_sae: str, recipient_sae: str, sealed: bytes
) -> bytes:
    """The body; AuthenticationFailed if the tag does not verify or the pads fall short."""
    ciphertext, tag = sealed[:-ONE_TIME_MAC_TAG_SIZE], sealed[-ONE_TIME_MAC_TAG_SIZE:]
    stream = b"".join(p.material for p in pads)
    if len(sealed) < ONE_TIME_MAC_TAG_SIZE or len(stream) < pad_bytes_needed(len(ciphertext)):
        raise AuthenticationFailed("the one-time pads do not cover the message")
    mac_key, pad = stream[:ONE_TIME_MAC_KEY_SIZE], stream[ONE_TIME_MAC_KEY_SIZE:]
    binding = _pad_binding(message_id, sender_sae, recipient_sae, pads)
    one_time_mac_verify(mac_key, binding + ciphertext, tag)
    return xor_bytes(ciphertext, pad[: len(ciphertext)])


def seal_message(
    key: HybridKey, message_id: str, sender_sae: str, recipient_sae: str, body: bytes
) -> bytes:
    binding = _binding(message_id, sender_sae, recipient_sae, key.key_id)
    return _one_time_aead(key, binding).seal(_NONCE, body, lp(labels.AAD_MESSAGE) + binding)


def open_message(
    key: HybridKey, message_id: str, sender_sae: str, recipient_sae: str, ciphertext: bytes
) -> bytes:
    binding = _binding(message_id, sender_sae, recipient_sae, key.key_id)
    return _one_time_aead(key, binding).open(_NONCE, ciphertext, lp(labels.AAD_MESSAGE) + binding)


@dataclass(frozen=True)
class SendReceipt:
    message_id: str
    recipient_sae: str
    protection: str
    keys_used: int  # hybrid keys (1) or one-time pads


class Messenger:
    """Sends messages for local SAEs and accepts those from peer sites for them.

    ``live.config`` is the config in force; ``why_unavailable(site)`` says why a peer site
    cannot be reached now (or None); ``call_peer`` makes peer calls."""

    def __init__(
        self,
        live: HasConfig,
        store: KeyStore,
        inbox: Inbox,
        why_unavailable: Callable[[str], str | None],
        call_peer: PeerCaller,
        *,
        max_size: int = MAX_MESSAGE_SIZE,
    ) -> None:
        self._live = live
        self._store = store
        self.inbox = inbox
        self._why_unavailable = why_unavailable
        self._call_peer = call_peer
        self.max_size = max_size
        self._arrived: dict[str, trio.Event] = {}

    # -- sending ----------------------------------------------------------------------------

    def _site_of_recipient(self, recipient_sae: str) -> str:
        for peer in self._live.config.peers:
            if recipient_sae in peer.remote_sae_ids:
                return peer.site_id
        raise BadMessage(f"recipient SAE {recipient_sae!r} is not served by any peer site")

    async def send(
        self,
        sender_sae: str,
        recipient_sae: str,
        body: bytes,
        message_id: str | None = None,
        protection: str = "hybrid",
    ) -> SendReceipt:
        if protection not in PROTECTIONS:
            raise BadMessage(f"protection must be one of {', '.join(PROTECTIONS)}")
        if len(body) > self.max_size:
            raise BadMessage(f"message of {len(body)} bytes is over the cap of {self.max_size}")
        message_id = str(uuid.UUID(message_id)) if message_id else str(uuid.uuid4())
        site = self._site_of_recipient(recipient_sae)
        reason = self._why_unavailable(site)
        if reason is not None:
            raise NotDelivered(f"the recipient's site {site} cannot be reached: {reason}")
        if protection == "otp":
            keys = self._take_pads(sender_sae, recipient_sae, site, len(body))
            ciphertext = otp_seal(keys, message_id, sender_sae, recipient_sae, body)
        else:
            keys = self._store.take_ready(sender_sae, recipient_sae, 1)
            if not keys:
                raise NotDelivered(
                    f"no hybrid key is ready for {sender_sae} -> {recipient_sae} (key stock "
                    "empty); retry once the link has made more"
                )
            ciphertext = seal_message(keys[0], message_id, sender_sae, recipient_sae, body)
        sealed = SealedMessage(
            message_id,
            sender_sae,
            recipient_sae,
            PROTECTIONS[protection],
            tuple(k.key_id for k in keys),
            ciphertext,
        )
        try:
            await self._call_peer(site, CallKind.MESSAGE, sealed.encode(), DELIVERY_TIMEOUT)
        except CallRefused as exc:
            raise NotDelivered(f"site {site} did not store the message: {exc}") from None
        except Exception as exc:
            raise NotDelivered(
                f"site {site} did not confirm the message ({exc}); it may or may not have "
                f"been stored: send it again with message_ID {message_id}, it is kept once"
            ) from None
        log.info(
            "event=message_sent message_id=%s sender=%s recipient=%s bytes=%d protection=%s "
            "keys=%d",
            message_id,
            sender_sae,
            recipient_sae,
            len(body),
            protection,
            len(keys),
        )
        return SendReceipt(message_id, recipient_sae, protection, len(keys))

    def _take_pads(
        self, sender_sae: str, recipient_sae: str, site: str, body_size: int
    ) -> list[HybridKey]:
        need = pad_bytes_needed(body_size)
        pads = self._store.take_pads(sender_sae, recipient_sae, need)
        if pads:
            return pads
        peer = self._live.config.peer(site)
        if peer is not None and not peer.otp_pad_bytes:
            raise NotDelivered(
                f"the link with site {site} keeps no one-time pads (its otp_pad_bytes is 0); "
                "send with protection hybrid"
            )
        have = self._store.pad_ready_bytes(sender_sae, recipient_sae)
        raise NotDelivered(
            f"not enough one-time pad for {sender_sae} -> {recipient_sae}: {need} bytes "
            f"needed, {have} ready; retry once the link has made more"
        )

    # -- receiving --------------------------------------------------------------------------

    def accept_call(self, peer_site: str, body: bytes) -> bytes:
        """Answer a peer's MESSAGE call: store the message for its recipient, once."""
        message = SealedMessage.decode(body)
        config = self._live.config
        peer = config.peer(peer_site)
        if peer is None or message.sender_sae not in peer.remote_sae_ids:
            raise CallRefused(f"SAE {message.sender_sae} is not an SAE of site {peer_site}")
        if message.recipient_sae not in config.local_sae_ids:
            raise CallRefused(f"SAE {message.recipient_sae} is not served here")
        if len(message.ciphertext) > self.max_size + ONE_TIME_MAC_TAG_SIZE:
            raise CallRefused(f"message over this site's cap of {self.max_size} bytes")

        def open_body(db: sqlite3.Connection) -> bytes:
            """Take the message's keys (erased if the inbox commits) and open it."""
            sender, recipient, mid = message.sender_sae, message.recipient_sae, message.message_id
            if message.protection == Protection.OTP:
                pads = self._store.take_pads_in(db, message.key_ids, sender, recipient)
                if pads is None:
                    raise InboxError(f"the one-time pads of message {mid} are not all held here")
                opener = functools.partial(otp_open, pads)
            else:
                key = self._store.take_one_in(db, message.key_ids[0], sender, recipient)
                if key is None:
                    raise InboxError(
                        f"key {message.key_ids[0]} of {sender} -> {recipient} is not held here "
                        "(expired, withdrawn or never agreed)"
                    )
                opener = functools.partial(open_message, key)
            try:
                return opener(mid, sender, recipient, message.ciphertext)
            except AuthenticationFailed:
                raise InboxError(f"message {mid} does not open") from None

        try:
            stored = self.inbox.accept(
                message_id=message.message_id,
                sender_site=peer_site,
                sender_sae=message.sender_sae,
                recipient_sae=message.recipient_sae,
                protection=PROTECTION_NAMES[message.protection],
                open_body=open_body,
            )
        except InboxError as exc:
            raise CallRefused(str(exc)) from None
        log.info(
            "event=message_received message_id=%s sender=%s recipient=%s protection=%s %s",
            message.message_id,
            message.sender_sae,
            message.recipient_sae,
            PROTECTION_NAMES[message.protection],
            "stored" if stored else "duplicate",
        )
        if stored:
            self._notify(message.recipient_sae)
        return b""

    def _notify(self, recipient_sae: str) -> None:
        event = self._arrived.pop(recipient_sae, None)
        if event is not None:
            event.set()

    async def next_message(
        self, recipient_sae: str, after_seq: int, timeout: float
    ) -> ReceivedMessage | None:
        """The recipient's oldest unacknowledged message after ``after_seq``, waiting up to
        ``timeout`` seconds for one to arrive; None if none did."""
        with trio.move_on_after(timeout):
            while True:
                message = self.inbox.next_for(recipient_sae, after_seq)
                if message is not None:
                    return message
                event = self._arrived.setdefault(recipient_sae, trio.Event())
                await event.wait()
        return None
