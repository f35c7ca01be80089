"""What a link's key agreement is configured with (``LinkParameters``: sites, SAEs, sizes,
derived roles, the pad pools and the relay pseudo SAEs) and how it fails (``LinkError``,
``SessionDead``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from qkdd.errors import PeerError
from qkdd.peer.wire import MAX_ID_LENGTH

# The pseudo SAE of a site's relay pads (docs/protocol.md §5): "@" is not allowed in a
# configured SAE ID (qkdd.config_reader.ID_PATTERN), so it never names a real SAE.
RELAY_SAE_PREFIX: Final = "relay@"


class LinkError(PeerError):
    """The peer broke the key-agreement rules; the session must be dropped."""


class SessionDead(LinkError):
    """A reply or a heartbeat from the peer is overdue: the session must be dropped (a new
    one settles whatever was in flight)."""


def relay_sae(site_id: str) -> str:
    """The pseudo SAE that sends (at ``site_id``) or receives relay pads over a link."""
    return RELAY_SAE_PREFIX + site_id


def is_link_master(local_site_id: str, peer_site_id: str) -> bool:
    """Whether this site is the link's master: the one whose site ID sorts first."""
    return local_site_id < peer_site_id


@dataclass(frozen=True)
class LinkParameters:
    local_site_id: str
    peer_site_id: str
    local_sae_ids: frozenset[str]
    remote_sae_ids: frozenset[str]
    key_size_bits: int
    pool_size: int
    auth_key_bits: int = 256
    # One-time pads kept ready per local sender -> remote recipient pair (0: none).
    pad_keys: int = 0
    # Relay pads kept ready in this site's sending direction, relay_sae(local) ->
    # relay_sae(peer), for sealing relayed QKD material per hop (0: this site does not
    # relay over the link; pads flow only where both ends relay).
    relay_pads: int = 0
    # QKD keys buffered at most before the device is held back (``qkd_buffer_keys``).
    qkd_buffer_keys: int = 4096
    # Local -> remote SAE pairs whose pool this site fills (None: every pair). A batch the
    # peer sends for another allowed pair is still accepted (pair_allowed): each site's own
    # config decides which of its pools are filled.
    pool_pairs: frozenset[tuple[str, str]] | None = None

    def __post_init__(self) -> None:
        if self.relay_pads > 0:
            # Relay pads name the pseudo SAEs on the wire, where an ID has at most
            # MAX_ID_LENGTH bytes: a site ID too long for the prefix cannot relay.
            for site in (self.local_site_id, self.peer_site_id):
                if len(relay_sae(site).encode()) > MAX_ID_LENGTH:
                    raise ValueError(
                        f"relay pads need site IDs of at most "
                        f"{MAX_ID_LENGTH - len(RELAY_SAE_PREFIX)} characters: {site!r}"
                    )

    @property
    def is_master(self) -> bool:
        return is_link_master(self.local_site_id, self.peer_site_id)

    @property
    def master_site_id(self) -> str:
        return self.local_site_id if self.is_master else self.peer_site_id

    @property
    def slave_site_id(self) -> str:
        return self.peer_site_id if self.is_master else self.local_site_id

    @property
    def relay_pair(self) -> tuple[str, str]:
        """The pseudo SAE pair of the relay pads this site sends with."""
        return relay_sae(self.local_site_id), relay_sae(self.peer_site_id)

    @property
    def peer_relay_pair(self) -> tuple[str, str]:
        """The pseudo SAE pair of the relay pads the peer sends with."""
        return relay_sae(self.peer_site_id), relay_sae(self.local_site_id)

    def pair_allowed(self, master_sae: str, slave_sae: str, *, pads: bool = False) -> bool:
        """Whether a batch for this pair may be stored here: a configured SAE pair either
        way, or (for one-time pads only, and only where this site relays) a relay pair."""
        if (master_sae in self.local_sae_ids and slave_sae in self.remote_sae_ids) or (
            master_sae in self.remote_sae_ids and slave_sae in self.local_sae_ids
        ):
            return True
        pair = (master_sae, slave_sae)
        return pads and self.relay_pads > 0 and pair in (self.relay_pair, self.peer_relay_pair)

    def local_master_pairs(self) -> list[tuple[str, str]]:
        """SAE pairs whose enc_keys caller is at this site and whose pool is kept filled
        (some consumer talks to the remote SAE)."""
        return sorted(
            (m, s)
            for m in self.local_sae_ids
            for s in self.remote_sae_ids
            if self.pool_pairs is None or (m, s) in self.pool_pairs
        )

    def pad_pools(self) -> list[tuple[tuple[str, str], int]]:
        """The one-time pad pools this site keeps filled (the master) or asks for (the
        slave), each as (sender -> recipient pair, pads kept ready): its senders' pools,
        then its relay pads."""
        pools: list[tuple[tuple[str, str], int]] = []
        if self.pad_keys > 0:
            pools += [(pair, self.pad_keys) for pair in self.local_master_pairs()]
        if self.relay_pads > 0:
            pools.append((self.relay_pair, self.relay_pads))
        return pools
