"""What key agreement uses of the key store (``AgreementStore``), and the two spellings of a
QKD key ID it moves between: 16 bytes on the wire, canonical UUID text in the store."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from typing import Protocol

from qkdd.keystore import NewHybridKey, NewKeyBlock, StoredQkdKey
from qkdd.peer.horizon import HorizonStore
from qkdd.qkd_buffer import QkdRun


class AgreementStore(HorizonStore, Protocol):
    """What the agreement uses of the key store."""

    store_id: bytes

    def check_peer_store(self, peer_site: str, peer_store_id: bytes) -> int: ...
    def pending_batches(self, peer_site: str) -> list[int]: ...
    def next_batch_id(self, peer_site: str) -> int: ...
    def add_batch(
        self,
        peer_site: str,
        batch_id: int,
        keys: Sequence[NewKeyBlock],
        consumed_qkd_ids: Iterable[str],
        auth_keys: Sequence[StoredQkdKey] = (),
        pads: Sequence[NewHybridKey] = (),
    ) -> None: ...
    def commit_batch(self, peer_site: str, batch_id: int) -> bool: ...
    def abort_batch(self, peer_site: str, batch_id: int) -> None: ...
    def batch_state(self, peer_site: str, batch_id: int) -> str | None: ...
    def forget_decided_batches(
        self, peer_site: str, *, before: int | None = None, keep: Iterable[int] = ()
    ) -> int: ...
    def forget_committed_batches(self, peer_site: str) -> None: ...
    def ready_count(self, master_sae_id: str, slave_sae_id: str) -> int: ...
    def pad_ready_count(self, sender_sae: str, recipient_sae: str) -> int: ...
    def oldest_qkd_run(self, peer_site: str, min_bytes: int, max_keys: int) -> QkdRun | None: ...
    def qkd_run(self, peer_site: str, first_key_id: bytes, count: int) -> QkdRun | None: ...
    def get_qkd_keys(self, peer_site: str, key_ids: Sequence[str]) -> dict[str, bytes]: ...
    def is_qkd_key_consumed(self, peer_site: str, key_id: str) -> bool: ...
    def quarantine_qkd_keys_before(
        self, peer_site: str, key_ids: Iterable[str], keep: Collection[str] = ()
    ) -> int: ...


def id_text(raw: bytes) -> str:
    """A 16-byte QKD key ID as the store names it (canonical UUID text)."""
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def id_bytes(text: str) -> bytes:
    return bytes.fromhex(text.replace("-", ""))
