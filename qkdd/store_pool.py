"""The daemon's key pool as the ETSI GS QKD 014 layer sees it: ready hybrid keys in the
key store, per SAE pair, handed out once and erased. Implements
``qkdd.etsi014.key_pool.KeyPool``.

Keys of the site key size go out straight from the store. A key of another size, or one for
additional slave SAEs, is *assigned*: made from whole ready keys of the pair (enough of them
to cover its size, concatenated and cut), after the slave's site has confirmed, by a
KEY_ASSIGN peer call, that it made the same key and holds it for every slave. So such keys
need the peer site to be reachable; if the call fails, the ready keys it took are lost (never
handed out anywhere), and the caller gets 503 with the reason.

What a request's checks read from the config (limits, quotas, the pairs served) is worked
out once per config in force, not per request; only an SAE with a quota has what it takes
counted (``QuotaBook``).
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Final, Protocol

from qkdd.config import SiteConfig
from qkdd.constants import ASSIGN_TIMEOUT
from qkdd.etsi014.key_pool import (
    InvalidKeyRequest,
    KeyLimits,
    KeysUnavailable,
    PoolKey,
    PoolStatus,
    UnknownKeys,
    pool_keys,
)
from qkdd.keystore import Assignment, KeyStore, StoreError, compose_key
from qkdd.peer.calls import (
    MAX_ASSIGNMENTS,
    MAX_CONSTITUENTS,
    CallKind,
    CallRefused,
    KeyAssign,
    KeyAssignment,
)
from qkdd.quota import QuotaBook, QuotaExceeded, QuotaState

MIN_ASSIGNED_KEY_BITS: Final = 64
MAX_ASSIGNED_KEY_BITS: Final = 8192

# Makes a peer call: (peer site ID, call kind, body, timeout) -> reply body. Raises on any
# failure, with a message fit for the caller.
PeerCaller = Callable[[str, int, bytes, float], Awaitable[bytes]]


async def _no_peer_calls(site: str, kind: int, body: bytes, timeout: float) -> bytes:
    raise KeysUnavailable("peer calls are not available")


class HasConfig(Protocol):
    config: SiteConfig


class _ConfigFacts:
    """What the hand-out path reads from one config, worked out once for it."""

    def __init__(self, config: SiteConfig) -> None:
        self.config = config
        self.local_sae_ids = config.local_sae_ids
        self.talking_pairs = config.talking_pairs()
        self.pool_sizes = {peer.site_id: peer.pool_size for peer in config.peers}
        self.limits: dict[tuple[str, str], KeyLimits] = {}
        self.quotas: dict[str, int | None] = {}

    def quota_of(self, sae_id: str) -> int | None:
        if sae_id not in self.quotas:
            self.quotas[sae_id] = self.config.quota_of(sae_id)
        return self.quotas[sae_id]


class StoreKeyPool:
    def __init__(
        self,
        live: HasConfig,
        store: KeyStore,
        why_unavailable: Callable[[str], str | None],
        call_peer: PeerCaller = _no_peer_calls,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``live.config`` is the config in force (it changes on reload);
        ``why_unavailable(peer_site_id)`` says why no keys are being made (or None)."""
        self._live = live
        config = live.config
        self._store = store
        self._why_unavailable = why_unavailable
        self._call_peer = call_peer
        self._clock = clock
        self._quotas = QuotaBook()
        self._facts_of_config = _ConfigFacts(config)
        self._site_of_sae: dict[str, str] = {sae: config.site_id for sae in config.local_sae_ids}
        for peer in config.peers:
            for sae in peer.remote_sae_ids:
                self._site_of_sae.setdefault(sae, peer.site_id)

    def knows_sae(self, sae_id: str) -> bool:
        return sae_id in self._site_of_sae

    def _facts(self) -> _ConfigFacts:
        """The facts of the config in force (worked out again after a reload)."""
        facts = self._facts_of_config
        if facts.config is not self._live.config:
            facts = self._facts_of_config = _ConfigFacts(self._live.config)
        return facts

    def _peer_site(self, master_sae_id: str, slave_sae_id: str) -> str:
        """The peer site whose link makes the pair's keys: the other SAE's site. A pair of
        SAEs both at this site is refused (InvalidKeyRequest): no link agrees keys for it."""
        here = self._live.config.site_id
        master_site = self._site_of_sae.get(master_sae_id)
        slave_site = self._site_of_sae.get(slave_sae_id)
        if master_site == here and slave_site == here:
            raise InvalidKeyRequest(
                f"SAEs {master_sae_id} and {slave_sae_id} are both at site {here}: keys are "
                "made only for an SAE here and an SAE at a peer site, over the QKD link with "
                "that site"
            )
        other = slave_site if master_site == here else master_site if slave_site == here else None
        if other is None:
            raise InvalidKeyRequest(
                f"keys for {master_sae_id} -> {slave_sae_id} are not made by this KME"
            )
        return other

    def limits(self, master_sae_id: str, slave_sae_id: str) -> KeyLimits:
        """What a request may ask for. For enc_keys (the master SAE is here) never more keys
        per request than the pair's pool holds or the master's quota allows: such a request
        could never be met. dec_keys collects keys by ID, however many wait uncollected."""
        facts = self._facts()
        known = facts.limits.get((master_sae_id, slave_sae_id))
        if known is None:
            known = self._limits(facts, master_sae_id, slave_sae_id)
            facts.limits[(master_sae_id, slave_sae_id)] = known
        return known

    def _limits(self, facts: _ConfigFacts, master_sae_id: str, slave_sae_id: str) -> KeyLimits:
        config = facts.config
        peer_site = self._peer_site(master_sae_id, slave_sae_id)
        size = config.key_size
        per_request, reason = config.max_keys_per_request, ""
        if master_sae_id in facts.local_sae_ids:
            pool_size = self._pool_size(peer_site)
            if pool_size < per_request:
                per_request = pool_size
                reason = (
                    f"site {config.site_id} keeps at most {pool_size} keys ready for "
                    f"{master_sae_id} -> {slave_sae_id}: the pool_size of peer {peer_site}"
                )
            quota = facts.quota_of(master_sae_id)
            if quota is not None and quota < per_request:
                per_request = quota
                reason = (
                    f"SAE {master_sae_id} may take at most {quota} keys per hour: its keys_per_hour"
                )
        return KeyLimits(
            key_size=size,
            max_key_per_request=per_request,
            min_key_size=min(size, MIN_ASSIGNED_KEY_BITS),
            max_key_size=max(size, MAX_ASSIGNED_KEY_BITS),
            max_key_per_request_reason=reason,
        )

    def _pool_size(self, peer_site: str) -> int:
        return self._facts().pool_sizes.get(peer_site, 0)

    def status(self, master_sae_id: str, slave_sae_id: str) -> PoolStatus:
        peer_site = self._peer_site(master_sae_id, slave_sae_id)
        limits = self.limits(master_sae_id, slave_sae_id)
        return PoolStatus(
            source_kme_id=self._live.config.site_id,
            target_kme_id=peer_site,
            key_size=limits.key_size,
            stored_key_count=self._store.ready_count(master_sae_id, slave_sae_id),
            max_key_count=self._pool_size(peer_site),
            max_key_per_request=limits.max_key_per_request,
            max_key_size=limits.max_key_size,
            min_key_size=limits.min_key_size,
            extension=self._quota_extension(master_sae_id),
        )

    # -- quotas -----------------------------------------------------------------------------

    def quota_state(self, sae_id: str) -> QuotaState:
        return self._quotas.state(sae_id, self._live.config.quota_of(sae_id), self._clock())

    def _quota_extension(self, sae_id: str) -> dict[str, object] | None:
        state = self.quota_state(sae_id)
        if state.limit is None:
            return None
        return {
            "qkdd_quota_keys_per_hour": state.limit,
            "qkdd_quota_used": state.used,
            "qkdd_quota_remaining": state.remaining,
        }

    def _check_quota(self, sae_id: str, number: int) -> None:
        limit = self._facts().quota_of(sae_id)
        if limit is None:
            return
        if number > limit:
            # Never possible, however long the caller waits: not a 503 to retry.
            raise InvalidKeyRequest(f"SAE {sae_id} may take at most {limit} keys per hour")
        try:
            self._quotas.check(sae_id, limit, number, self._clock())
        except QuotaExceeded as exc:
            raise KeysUnavailable(str(exc)) from None

    def _charge(self, sae_id: str, number: int) -> None:
        """Count keys against the SAE's quota. Only an SAE with a quota is charged (what
        others take is not remembered): a quota set by a reload counts from then on."""
        if self._facts().quota_of(sae_id) is not None:
            self._quotas.charge(sae_id, number, self._clock())

    def _check_pool_holds(
        self, master_sae_id: str, slave_sae_id: str, peer_site: str, ready_keys: int, what: str
    ) -> None:
        """InvalidKeyRequest when a request needs more ready keys than the pair's pool ever
        holds, or the pair's pool is not filled at all (no consumer talks to the slave SAE):
        it could never be met."""
        if (master_sae_id, slave_sae_id) not in self._facts().talking_pairs:
            raise InvalidKeyRequest(
                f"site {self._live.config.site_id} keeps no keys for {master_sae_id} -> "
                f"{slave_sae_id}: {slave_sae_id} is not in the talks_to of consumer "
                f"{master_sae_id}"
            )
        pool_size = self._pool_size(peer_site)
        if ready_keys > pool_size:
            raise InvalidKeyRequest(
                f"{what} need {ready_keys} ready keys of {self._live.config.key_size} bits, and "
                f"site {self._live.config.site_id} keeps at most {pool_size} ready for "
                f"{master_sae_id} -> {slave_sae_id} (the pool_size of peer {peer_site})"
            )

    def take_for_master(
        self, master_sae_id: str, slave_sae_id: str, number: int, size_bits: int
    ) -> list[PoolKey]:
        peer_site = self._peer_site(master_sae_id, slave_sae_id)
        self._check_pool_holds(master_sae_id, slave_sae_id, peer_site, number, f"{number} keys")
        self._check_quota(master_sae_id, number)
        ids, materials = self._store.hand_out(master_sae_id, slave_sae_id, number)
        if not ids:
            ready = self._store.ready_count(master_sae_id, slave_sae_id)
            reason = self._why_unavailable(peer_site)
            raise KeysUnavailable(
                f"{ready} keys ready for {master_sae_id} -> {slave_sae_id}, {number} requested"
                + (f"; {reason}" if reason else "; the pool is refilling, retry shortly")
            )
        self._charge(master_sae_id, number)
        return pool_keys(ids, materials)

    def take_for_slave(
        self, master_sae_id: str, slave_sae_id: str, key_ids: Sequence[str]
    ) -> list[PoolKey]:
        self._peer_site(master_sae_id, slave_sae_id)
        keys = self._store.take_by_ids(master_sae_id, slave_sae_id, key_ids)
        if keys is None:
            raise UnknownKeys(
                f"not all of the requested key IDs are held for {master_sae_id} -> {slave_sae_id} "
                "(unknown, already delivered, or not yet agreed with the peer site)"
            )
        return [PoolKey(k.key_id, k.material) for k in keys]

    # -- assigned keys --------------------------------------------------------------------

    async def take_assigned(
        self,
        master_sae_id: str,
        slave_sae_id: str,
        number: int,
        size_bits: int,
        additional_slave_sae_ids: Sequence[str],
    ) -> list[PoolKey]:
        config = self._live.config
        slaves = (slave_sae_id, *additional_slave_sae_ids)
        peer_site = self._peer_site(master_sae_id, slave_sae_id)
        if master_sae_id not in config.local_sae_ids:
            raise InvalidKeyRequest(
                f"keys for {master_sae_id} -> {slave_sae_id} are not made by this KME"
            )
        elsewhere = [s for s in slaves if self._site_of_sae.get(s) != peer_site]
        if elsewhere:
            raise InvalidKeyRequest(
                f"additional slave SAEs must be at the slave's site {peer_site}; "
                f"{', '.join(elsewhere)} are not"
            )
        per_key = math.ceil(size_bits / config.key_size)
        if per_key > MAX_CONSTITUENTS or number > MAX_ASSIGNMENTS:
            raise InvalidKeyRequest(f"{number} keys of {size_bits} bits is too much at once")
        self._check_pool_holds(
            master_sae_id,
            slave_sae_id,
            peer_site,
            number * per_key,
            f"{number} keys of {size_bits} bits",
        )
        self._check_quota(master_sae_id, number)
        reason = self._why_unavailable(peer_site)
        if reason is not None:
            raise KeysUnavailable(
                f"keys of {size_bits} bits or for several slaves need site {peer_site}: {reason}"
            )
        taken = self._store.take_ready(master_sae_id, slave_sae_id, number * per_key)
        if not taken:
            ready = self._store.ready_count(master_sae_id, slave_sae_id)
            raise KeysUnavailable(
                f"{number} keys of {size_bits} bits need {number * per_key} ready keys of "
                f"{config.key_size} bits for {master_sae_id} -> {slave_sae_id}; {ready} are "
                "ready, retry shortly"
            )
        keys, assignments = [], []
        for i in range(number):
            parts = taken[i * per_key : (i + 1) * per_key]
            key_id = str(uuid.uuid4())
            keys.append(PoolKey(key_id, compose_key([p.material for p in parts], size_bits)))
            assignments.append(
                KeyAssignment(
                    key_id, size_bits, master_sae_id, slaves, tuple(p.key_id for p in parts)
                )
            )
        try:
            await self._call_peer(
                peer_site,
                CallKind.KEY_ASSIGN,
                KeyAssign(tuple(assignments)).encode(),
                ASSIGN_TIMEOUT,
            )
        except Exception as exc:
            raise KeysUnavailable(
                f"site {peer_site} did not confirm the keys ({exc}); "
                f"{len(taken)} ready keys were discarded, retry"
            ) from None
        self._charge(master_sae_id, number)
        return keys

    def accept_assignment(self, peer_site: str, body: bytes) -> bytes:
        """Answer the peer's KEY_ASSIGN call: make and hold the keys it assigned."""
        config = self._live.config
        peer = config.peer(peer_site)
        assign = KeyAssign.decode(body)
        for a in assign.assignments:
            if peer is None or a.master_sae not in peer.remote_sae_ids:
                raise CallRefused(f"SAE {a.master_sae} is not a master SAE at site {peer_site}")
            strangers = [s for s in a.slave_saes if s not in config.local_sae_ids]
            if strangers:
                raise CallRefused(f"SAEs {', '.join(strangers)} are not served here")
        try:
            self._store.assign_keys(
                [
                    Assignment(a.key_id, a.size_bits, a.master_sae, a.slave_saes, a.constituent_ids)
                    for a in assign.assignments
                ]
            )
        except StoreError as exc:
            raise CallRefused(str(exc)) from None
        return b""
