"""WireGuard bindings wired to the key store and the peer links: one ``PskRotator`` per
``[[wireguard]]`` entry, fed with hybrid keys of its SAE pair.

At the link master a rotation takes one ready key of (local_sae -> remote_sae) and makes a
WG_INSTALL peer call naming it; at the link slave the call's handler takes the same key by
ID (pair remote_sae -> local_sae) and installs it, answering only once ``wg`` succeeded, so
the master installs its copy only after the peer has. Each key is erased from both stores
when it is taken, like any key handed out.

A key is installed only once its taking is durable (``durable``, the store's barrier): at
the slave the handler awaits it before ``wg``; at the master the WG_INSTALL call awaited it
before it went out (every send to the peer does), and the install follows the answer.

The master takes a key only while the peer session is up, and the call naming it goes out
in the same step (``PskRotator`` does not await between the two): a rotation tried while
the peer is down takes no key. A call that went out consumed its key whatever the answer.
"""

from __future__ import annotations

from collections.abc import Mapping

from qkdd.config import SiteConfig
from qkdd.durability import Durable, already_durable
from qkdd.keystore import KeyStore
from qkdd.peer.calls import CallKind, CallRefused, WgInstall
from qkdd.peering import CallHandler, PeerLink, PeerUnavailable
from qkdd.wireguard import (
    ANNOUNCE_TIMEOUT,
    Announce,
    PeerCheck,
    PeerUnreachableError,
    PskRotator,
    TakeFreshKey,
    WireGuardBinding,
    WireGuardError,
)


def make_rotators(
    config: SiteConfig,
    links: Mapping[str, PeerLink],
    store: KeyStore,
    durable: Durable = already_durable,
) -> dict[str, PskRotator]:
    """A rotator per binding (by name); registers the WG_INSTALL handler on links where
    this site is the slave. ``durable`` is the store's durability barrier."""
    rotators: dict[str, PskRotator] = {}
    served: dict[str, dict[str, PskRotator]] = {}
    for binding in config.wireguard:
        link = links[binding.peer_site]
        if link.params.is_master:
            rotators[binding.name] = PskRotator(
                binding,
                take_fresh_key=_taker(store, binding),
                announce=_announcer(link, binding),
                peer_unavailable=_session_check(link),
            )
        else:
            rotators[binding.name] = PskRotator(binding)
            served.setdefault(binding.peer_site, {})[binding.name] = rotators[binding.name]
    for site, by_name in served.items():
        links[site].call_handlers[CallKind.WG_INSTALL] = _install_handler(
            site, store, by_name, durable
        )
    return rotators


def _taker(store: KeyStore, binding: WireGuardBinding) -> TakeFreshKey:
    def take_fresh_key() -> tuple[str, bytes] | None:
        keys = store.take_ready(binding.local_sae, binding.remote_sae, 1)
        return (keys[0].key_id, keys[0].material) if keys else None

    return take_fresh_key


def _session_check(link: PeerLink) -> PeerCheck:
    def peer_unavailable() -> str | None:
        # Only the session matters: keys already in the store serve a rotation even while
        # the QKD device is down.
        if link.session_up:
            return None
        return f"no session with site {link.peer.site_id}: {link.last_error}"

    return peer_unavailable


def _announcer(link: PeerLink, binding: WireGuardBinding) -> Announce:
    async def announce(key_id: str) -> None:
        body = WgInstall(binding.name, key_id).encode()
        try:
            await link.call(CallKind.WG_INSTALL, body, timeout=ANNOUNCE_TIMEOUT)
        except PeerUnavailable as exc:
            # One kind with "no session" above, so an outage is logged once.
            raise PeerUnreachableError(str(exc)) from None

    return announce


def _install_handler(
    site: str, store: KeyStore, rotators: Mapping[str, PskRotator], durable: Durable
) -> CallHandler:
    async def handle(body: bytes) -> bytes:
        request = WgInstall.decode(body)
        rotator = rotators.get(request.binding)
        if rotator is None:
            raise CallRefused(f"no WireGuard binding {request.binding!r} with site {site} here")
        binding = rotator.binding
        keys = store.take_by_ids(binding.remote_sae, binding.local_sae, [request.key_id])
        if not keys:
            raise CallRefused(
                f"key {request.key_id} of {binding.remote_sae} -> {binding.local_sae} is not "
                "held here"
            )
        await durable()  # the key's erasure outlives a power cut before it is in use
        try:
            await rotator.install_announced(request.key_id, keys[0].material)
        except WireGuardError as exc:
            raise CallRefused(f"installing the PSK failed: {exc}") from None
        return b""

    return handle
