"""Tunnel bindings wired to the key store and the peer links, whatever the tunnel: one
rotator per binding, fed with hybrid keys of its SAE pair, and the install call
(:class:`InstallCall`: WG_INSTALL, IPSEC_INSTALL) that carries each rotation to the peer.

At the link master a rotation takes one ready key of (local_sae -> remote_sae) and makes
the install call naming it; at the link slave the call's handler takes the same key by ID
(pair remote_sae -> local_sae) and installs it, answering only once the tunnel holds it, so
the master installs its copy only after the peer has. Each key is erased from both stores
when it is taken, like any key handed out.

A key is installed only once its taking is durable (``durable``, the store's barrier): at
the slave the handler awaits it before installing; at the master the install call awaited
it before it went out (every send to the peer does), and the install follows the answer.

The master takes a key only while the peer session is up, and the call naming it goes out
in the same step (``KeyRotator`` does not await between the two): a rotation tried while
the peer is down takes no key. A call that went out consumed its key whatever the answer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from qkdd.constants import ANNOUNCE_TIMEOUT
from qkdd.durability import Durable, already_durable
from qkdd.keystore import KeyStore
from qkdd.peer.calls import CallRefused
from qkdd.peering import CallHandler, PeerLink, PeerUnavailable
from qkdd.rotation.key_rotator import (
    Announce,
    KeyRotator,
    PeerCheck,
    PeerUnreachableError,
    TakeFreshKey,
)
from qkdd.rotation.tunnel_binding import RotatedBinding, RotationError

__all__ = ["InstallCall", "install_handler", "make_binding_rotators"]

R = TypeVar("R", bound=KeyRotator[Any, Any])


class InstallRequest(Protocol):
    """The body of an install call: the binding's name and the key ID."""

    @property
    def binding(self) -> str: ...
    @property
    def key_id(self) -> str: ...
    def encode(self) -> bytes: ...


@dataclass(frozen=True)
class InstallCall:
    """How one kind of tunnel asks the peer site to install a key."""

    kind: int  # a CallKind
    request: Callable[[str, str], InstallRequest]  # (binding name, key ID) -> body
    decode: Callable[[bytes], InstallRequest]
    tunnel: str  # "WireGuard": "no WireGuard binding … here"
    key_name: str  # "PSK": "installing the PSK failed: …"


def make_binding_rotators(
    bindings: Iterable[RotatedBinding],
    links: Mapping[str, PeerLink],
    store: KeyStore,
    call: InstallCall,
    rotator: Callable[..., R],
    durable: Durable = already_durable,
) -> dict[str, R]:
    """A rotator per binding (by name), made by ``rotator``; registers the handler of
    ``call`` on links where this site is the slave. ``durable`` is the store's durability
    barrier."""
    rotators: dict[str, R] = {}
    served: dict[str, dict[str, R]] = {}
    for binding in bindings:
        link = links[binding.peer_site]
        if link.params.is_master:
            rotators[binding.name] = rotator(
                binding,
                take_fresh_key=_taker(store, binding),
                announce=_announcer(link, call, binding),
                peer_unavailable=_session_check(link),
            )
        else:
            rotators[binding.name] = rotator(binding)
            served.setdefault(binding.peer_site, {})[binding.name] = rotators[binding.name]
    for site, by_name in served.items():
        links[site].call_handlers[call.kind] = install_handler(call, site, store, by_name, durable)
    return rotators


def _taker(store: KeyStore, binding: RotatedBinding) -> TakeFreshKey:
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


def _announcer(link: PeerLink, call: InstallCall, binding: RotatedBinding) -> Announce:
    async def announce(key_id: str) -> None:
        body = call.request(binding.name, key_id).encode()
        try:
            await link.call(call.kind, body, timeout=ANNOUNCE_TIMEOUT)
        except PeerUnavailable as exc:
            # One kind with "no session" above, so an outage is logged once.
            raise PeerUnreachableError(str(exc)) from None

    return announce


def install_handler(
    call: InstallCall,
    site: str,
    store: KeyStore,
    rotators: Mapping[str, KeyRotator[Any, Any]],
    durable: Durable,
) -> CallHandler:
    """The handler of ``call`` from ``site``: takes the named key by ID and has the
    binding's rotator install it; refuses the call if either fails."""

    async def handle(body: bytes) -> bytes:
        request = call.decode(body)
        rotator = rotators.get(request.binding)
        if rotator is None:
            raise CallRefused(f"no {call.tunnel} binding {request.binding!r} with site {site} here")
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
        except RotationError as exc:
            raise CallRefused(f"installing the {call.key_name} failed: {exc}") from None
        return b""

    return handle
