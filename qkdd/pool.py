"""The daemon's key pool as the ETSI GS QKD 014 layer sees it: ready hybrid keys in the
key store, per SAE pair, handed out once and erased. Implements ``etsi014.pool.KeyPool``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from qkdd.config import SiteConfig
from qkdd.etsi014.pool import DeliveredKey, KeysUnavailable, PoolStatus, UnknownKeys
from qkdd.keystore import KeyStore


class _HasConfig(Protocol):
    config: SiteConfig


class StoreKeyPool:
    def __init__(
        self,
        live: _HasConfig,
        store: KeyStore,
        why_unavailable: Callable[[str], str | None],
    ) -> None:
        """``live.config`` is the config in force (it changes on reload);
        ``why_unavailable(peer_site_id)`` says why no keys are being made (or None)."""
        self._live = live
        config = live.config
        self._store = store
        self._why_unavailable = why_unavailable
        self._site_of_sae: dict[str, str] = {sae: config.site_id for sae in config.local_sae_ids}
        for peer in config.peers:
            for sae in peer.remote_sae_ids:
                self._site_of_sae.setdefault(sae, peer.site_id)

    def knows_sae(self, sae_id: str) -> bool:
        return sae_id in self._site_of_sae

    def _peer_of_pair(self, master_sae_id: str, slave_sae_id: str) -> str | None:
        for sae in (master_sae_id, slave_sae_id):
            site = self._site_of_sae.get(sae)
            if site is not None and site != self._live.config.site_id:
                return site
        return None

    def status(self, master_sae_id: str, slave_sae_id: str) -> PoolStatus:
        peer_site = self._peer_of_pair(master_sae_id, slave_sae_id)
        peer = self._live.config.peer(peer_site) if peer_site else None
        size = self._live.config.key_size
        return PoolStatus(
            source_kme_id=self._live.config.site_id,
            target_kme_id=peer_site or self._live.config.site_id,
            key_size=size,
            stored_key_count=self._store.ready_count(master_sae_id, slave_sae_id),
            max_key_count=peer.pool_size if peer else 0,
            max_key_per_request=self._live.config.max_keys_per_request,
            # Keys are derived at one size per site for now; status says so.
            max_key_size=size,
            min_key_size=size,
        )

    def take_for_master(
        self, master_sae_id: str, slave_sae_id: str, number: int, size_bits: int
    ) -> list[DeliveredKey]:
        keys = self._store.take_ready(master_sae_id, slave_sae_id, number)
        if not keys:
            peer_site = self._peer_of_pair(master_sae_id, slave_sae_id)
            ready = self._store.ready_count(master_sae_id, slave_sae_id)
            reason = self._why_unavailable(peer_site) if peer_site else None
            raise KeysUnavailable(
                f"{ready} keys ready for {master_sae_id} -> {slave_sae_id}, {number} requested"
                + (f"; {reason}" if reason else "; the pool is refilling, retry shortly")
            )
        return [DeliveredKey(k.key_id, k.material) for k in keys]

    def take_for_slave(
        self, master_sae_id: str, slave_sae_id: str, key_ids: Sequence[str]
    ) -> list[DeliveredKey]:
        keys = self._store.take_by_ids(master_sae_id, slave_sae_id, key_ids)
        if keys is None:
            raise UnknownKeys(
                f"not all of the requested key IDs are held for {master_sae_id} -> {slave_sae_id} "
                "(unknown, already delivered, or not yet agreed with the peer site)"
            )
        return [DeliveredKey(k.key_id, k.material) for k in keys]
