"""Whether the key pipeline (device -> store -> peer agreement -> pool) is making progress,
or is idle for a reason the daemon already knows and reports. The watchdog pings systemd
only while this says so, so a pipeline wedged in a way nothing else notices gets the
service restarted, while a link that is simply down (and says so in STATUS=) does not.

Sans-IO: time is passed in; the links and the store are only read.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from qkdd.constants import STALL_GRACE_SECONDS


class _Params(Protocol):
    @property
    def pool_size(self) -> int: ...

    def local_master_pairs(self) -> list[tuple[str, str]]: ...


class _Link(Protocol):
    @property
    def params(self) -> _Params: ...
    @property
    def session_up(self) -> bool: ...


class _Store(Protocol):
    def health_check(self) -> None: ...
    def hybrid_keys_made(self, peer_site: str) -> int: ...
    def ready_count(self, master_sae_id: str, slave_sae_id: str) -> int: ...
    def qkd_key_count(self, peer_site: str) -> int: ...


class ProgressWatch:
    def __init__(
        self, links: Mapping[str, _Link], store: _Store, grace: float = STALL_GRACE_SECONDS
    ) -> None:
        self._links = links
        self._store = store
        self._grace = grace
        self._made: dict[str, int] = {}
        self._since: dict[str, float] = {}

    def problem(self, now: float) -> str | None:
        """None while every link progresses or idles for a known reason; else what is stuck.
        Raises StoreError if the store does not answer."""
        self._store.health_check()
        for site, link in self._links.items():
            made = self._store.hybrid_keys_made(site)
            wants = any(
                self._store.ready_count(*pair) < link.params.pool_size
                for pair in link.params.local_master_pairs()
            )
            able = link.session_up and self._store.qkd_key_count(site) > 0
            if made != self._made.get(site) or not (wants and able):
                # Progress, or idle for a reason STATUS= already gives (pools full, no
                # session, no QKD keys): start the clock again.
                self._made[site] = made
                self._since[site] = now
                continue
            if now - self._since[site] > self._grace:
                return (
                    f"link to {site}: no key made for {now - self._since[site]:.0f} s although "
                    "a pool wants keys, the session is up and QKD keys are buffered"
                )
        return None
