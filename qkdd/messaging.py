"""Secure messages between applications at different sites.

An application hands its local daemon a message for an SAE at a peer site. The daemon takes
one ready hybrid key of the pair sender -> recipient (both sites hold it: it came out of the
same key agreement), derives a one-time AEAD key from it bound to the message ID and both
SAEs, seals the message and sends it to the recipient's site in a MESSAGE peer call. That
site takes the same key by ID, opens the message and stores it in the recipient's inbox,
erasing the key, in one transaction (``qkdd.inbox``); only then does it answer, and only
then does the sender's call return the message ID. The key is used once and never leaves
either daemon.

Exactly once: a sender that hears nothing (its site or the link failed) sends again with
the same message ID; the recipient's site stores a message ID once per sender SAE. Order:
per sender -> recipient pair, the order the recipient's site stored them, which is the
order of the sends as long as each send waits for the previous one to return.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import trio

from qkdd import labels
from qkdd.crypto import (
    AEAD_KEY_SIZE,
    AEAD_NONCE_SIZE,
    MESSAGE_AEAD_ALGORITHM,
    Aead,
    AuthenticationFailed,
    hkdf,
)
from qkdd.hybrid import lp
from qkdd.inbox import Inbox, InboxError, ReceivedMessage
from qkdd.keystore import HybridKey, KeyStore
from qkdd.peer.calls import CallKind, CallRefused, Protection, SealedMessage
from qkdd.pool import HasConfig, PeerCaller

log = logging.getLogger("qkdd.messages")

MAX_MESSAGE_SIZE: Final = 1024 * 1024
# How long a send waits for the recipient's site to say "stored".
DELIVERY_TIMEOUT: Final = 10.0
PROTECTION_NAMES: Final = {Protection.HYBRID: "hybrid"}
# A one-time key: one message, so a fixed nonce never repeats under it.
_NONCE: Final = bytes(AEAD_NONCE_SIZE)


class MessagingError(Exception):
    """Base of the messaging layer's errors."""


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
    key_id: str


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
        self, sender_sae: str, recipient_sae: str, body: bytes, message_id: str | None = None
    ) -> SendReceipt:
        if len(body) > self.max_size:
            raise BadMessage(f"message of {len(body)} bytes is over the cap of {self.max_size}")
        message_id = str(uuid.UUID(message_id)) if message_id else str(uuid.uuid4())
        site = self._site_of_recipient(recipient_sae)
        reason = self._why_unavailable(site)
        if reason is not None:
            raise NotDelivered(f"the recipient's site {site} cannot be reached: {reason}")
        taken = self._store.take_ready(sender_sae, recipient_sae, 1)
        if not taken:
            raise NotDelivered(
                f"no hybrid key is ready for {sender_sae} -> {recipient_sae} (key stock empty); "
                "retry once the link has made more"
            )
        (key,) = taken
        sealed = SealedMessage(
            message_id,
            sender_sae,
            recipient_sae,
            Protection.HYBRID,
            key.key_id,
            seal_message(key, message_id, sender_sae, recipient_sae, body),
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
            "event=message_sent message_id=%s sender=%s recipient=%s bytes=%d key_id=%s",
            message_id,
            sender_sae,
            recipient_sae,
            len(body),
            key.key_id,
        )
        return SendReceipt(message_id, recipient_sae, "hybrid", key.key_id)

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
        if len(message.ciphertext) > self.max_size + 16:
            raise CallRefused(f"message over this site's cap of {self.max_size} bytes")

        def open_body(key: HybridKey) -> bytes:
            try:
                return open_message(
                    key,
                    message.message_id,
                    message.sender_sae,
                    message.recipient_sae,
                    message.ciphertext,
                )
            except AuthenticationFailed:
                raise InboxError(f"message {message.message_id} does not open") from None

        try:
            stored = self.inbox.accept(
                message_id=message.message_id,
                sender_site=peer_site,
                sender_sae=message.sender_sae,
                recipient_sae=message.recipient_sae,
                protection=PROTECTION_NAMES[message.protection],
                key_id=message.key_id,
                open_body=open_body,
            )
        except InboxError as exc:
            raise CallRefused(str(exc)) from None
        log.info(
            "event=message_received message_id=%s sender=%s recipient=%s %s",
            message.message_id,
            message.sender_sae,
            message.recipient_sae,
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
