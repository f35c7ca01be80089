"""What a link's key agreement is configured with (``LinkParameters``: sites, SAEs, sizes,
derived roles) and how it fails (``LinkError``, ``SessionDead``).
"""

from __future__ import annotations

from dataclasses import dataclass

from qkdd.errors import PeerError


class LinkError(PeerError):
    """The peer broke the key-agreement rules; the session must be dropped."""


class SessionDead(LinkError):
    """A reply or a heartbeat from the peer is overdue: the session must be dropped (a new
    one settles whatever was in flight)."""


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
    # QKD keys buffered at most before the device is held back (``qkd_buffer_keys``).
    qkd_buffer_keys: int = 4096
    # Local -> remote SAE pairs whose pool this site fills (None: every pair). A batch the
    # peer sends for another allowed pair is still accepted (pair_allowed): each site's own
    # config decides which of its pools are filled.
    pool_pairs: frozenset[tuple[str, str]] | None = None

    @property
    def is_master(self) -> bool:
        return is_link_master(self.local_site_id, self.peer_site_id)

    @property
    def master_site_id(self) -> str:
        return self.local_site_id if self.is_master else self.peer_site_id

    @property
    def slave_site_id(self) -> str:
        return self.peer_site_id if self.is_master else self.local_site_id

    def pair_allowed(self, master_sae: str, slave_sae: str) -> bool:
        return (master_sae in self.local_sae_ids and slave_sae in self.remote_sae_ids) or (
            master_sae in self.remote_sae_ids and slave_sae in self.local_sae_ids
        )

    def local_master_pairs(self) -> list[tuple[str, str]]:
        """SAE pairs whose enc_keys caller is at this site and whose pool is kept filled
        (some consumer talks to the remote SAE)."""
        return sorted(
            (m, s)
            for m in self.local_sae_ids
            for s in self.remote_sae_ids
            if self.pool_pairs is None or (m, s) in self.pool_pairs
        )
