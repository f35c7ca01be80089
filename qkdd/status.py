"""The operator's view of a site: ``site_status`` builds a JSON-able snapshot (links, QKD
devices, PSK chains, key pools, recent errors) from the live link objects and the key store,
and ``RecentErrors`` keeps the last WARNING/ERROR events of the ``qkdd`` loggers for it.

Everything here is read at the moment of the call; nothing is cached. No key material is
read: the store is asked for counts and flags only, and log events carry only their message
(the daemon never logs key material).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from qkdd.constants import MAX_MESSAGE_CHARS, RECENT_ERRORS

if TYPE_CHECKING:
    from qkdd_drivers.base import DeviceStatus

    from qkdd.link_params import LinkParameters


class DeviceView(Protocol):
    @property
    def status(self) -> DeviceStatus: ...


class LinkView(Protocol):
    """What the status and the metrics read of a link to a peer (``peering.PeerLink``)."""

    @property
    def params(self) -> LinkParameters: ...
    @property
    def device(self) -> DeviceView: ...
    @property
    def session_up(self) -> bool: ...
    @property
    def last_error(self) -> str: ...
    @property
    def sessions_established(self) -> int: ...

    def why_unavailable(self) -> str | None: ...


class StoreView(Protocol):
    """The key store's counts and flags (``keystore.KeyStore``); never its material."""

    def ready_count(self, master_sae_id: str, slave_sae_id: str) -> int: ...
    def qkd_key_count(self, peer_site: str) -> int: ...
    def chain_established(self, peer_site: str) -> bool: ...
    def bootstrap_allowed(self, peer_site: str) -> bool: ...
    def hybrid_keys_made(self, peer_site: str) -> int: ...
    def pad_ready_bytes(self, sender_sae: str, recipient_sae: str) -> int: ...
    def quarantined_row_count(self) -> int: ...


@dataclass(frozen=True)
class PoolLevel:
    """Ready keys held here for one SAE pair of a link."""

    master_sae_id: str
    slave_sae_id: str
    ready: int
    # How the local application takes them: "enc_keys" when its master SAE is here (the
    # pool the link keeps full), "dec_keys" when the master is at the peer site.
    taken_with: str


def pool_levels(link: LinkView, store: StoreView) -> list[PoolLevel]:
    """Every SAE pair of the link a local consumer talks to, local masters first, with its
    ready key count."""
    params = link.params
    pairs = [(m, s, "enc_keys") for m, s in params.local_master_pairs()]
    pairs += [
        (m, s, "dec_keys")
        for m in sorted(params.remote_sae_ids)
        for s in sorted(params.local_sae_ids)
        if params.pool_pairs is None or (s, m) in params.pool_pairs
    ]
    return [PoolLevel(m, s, store.ready_count(m, s), how) for m, s, how in pairs]


class RecentErrors(logging.Handler):
    """A bounded ring of the last WARNING and ERROR log events, for the status view."""

    def __init__(self, capacity: int = RECENT_ERRORS, level: int = logging.WARNING) -> None:
        super().__init__(level)
        self._events: deque[dict[str, Any]] = deque(maxlen=capacity)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string must not lose the event
            message = str(record.msg)
        if len(message) > MAX_MESSAGE_CHARS:
            message = message[: MAX_MESSAGE_CHARS - 3] + "..."
        # Only the message: a traceback could show local variables' reprs.
        self._events.append(
            {
                "time": record.created,
                "level": record.levelname,
                "logger": record.name,
                "message": message,
            }
        )

    def events(self) -> list[dict[str, Any]]:
        """The events held, oldest first."""
        return list(self._events)

    @contextlib.contextmanager
    def installed(self, logger_name: str = "qkdd") -> Iterator[RecentErrors]:
        """Collect events of ``logger_name`` and its children while in the block."""
        logger = logging.getLogger(logger_name)
        logger.addHandler(self)
        try:
            yield self
        finally:
            logger.removeHandler(self)


def _device(status: DeviceStatus) -> dict[str, Any]:
    return {
        "state": status.state,
        "detail": status.detail,
        "keys_received": status.keys_received,
        "qber": status.qber,
        "secret_key_rate_bps": status.secret_key_rate,
        "keys_buffered": status.keys_buffered,
    }


def _peer(link: LinkView, store: StoreView) -> dict[str, Any]:
    params = link.params
    peer = params.peer_site_id
    return {
        "role": "master" if params.is_master else "slave",
        "session": "up" if link.session_up else "down",
        # Why the last session ended or could not start; recent_errors has the history.
        "last_error": None if link.session_up else link.last_error,
        "sessions_established": link.sessions_established,
        "keys_unavailable_because": link.why_unavailable(),
        "psk_chain_established": store.chain_established(peer),
        # Whether this site would take part in an ML-DSA bootstrap: before the first PSK,
        # or while an operator's `qkdd allow-bootstrap` stands (a PSK that works is used).
        "bootstrap_allowed": store.bootstrap_allowed(peer),
        "device": _device(link.device.status),
        "qkd_keys_buffered": store.qkd_key_count(peer),
        "pool_size": params.pool_size,
        "pools": [
            {
                "master_SAE_ID": level.master_sae_id,
                "slave_SAE_ID": level.slave_sae_id,
                "ready": level.ready,
                "taken_with": level.taken_with,
            }
            for level in pool_levels(link, store)
        ],
        # One-time pad ready for this site's senders to the peer's SAEs, in bytes.
        "otp_pad_bytes_ready": sum(
            store.pad_ready_bytes(sender, recipient)
            for sender, recipient in params.local_master_pairs()
        ),
    }


def site_status(
    *,
    site_id: str,
    backend: str,
    links: Mapping[str, LinkView],
    store: StoreView,
    recent_errors: Sequence[Mapping[str, Any]] = (),
    wireguard: Sequence[Mapping[str, Any]] = (),
    now: float | None = None,
) -> dict[str, Any]:
    """A snapshot of the site for operators (``GET /qkdd/v1/status``, ``qkdctl status``);
    ``wireguard`` holds each WireGuard binding's status row."""
    return {
        "site_id": site_id,
        "backend": backend,
        "time": time.time() if now is None else now,
        "peers": {peer: _peer(link, store) for peer, link in links.items()},
        # Sealed rows that did not open (damaged on disk), set aside: see row_quarantined.
        "store_rows_quarantined": store.quarantined_row_count(),
        "wireguard": [dict(row) for row in wireguard],
        "recent_errors": [dict(event) for event in recent_errors],
    }
