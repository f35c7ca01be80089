"""WireGuard bindings wired to the key store and the peer links: one ``PskRotator`` per
``[[wireguard]]`` entry, its rotations carried to the peer by the WG_INSTALL call.

At the link slave the call's handler takes the named key by ID and sets its PSK with
``wg``, answering only once the interface holds it, so the master sets its copy only after
the peer has. How keys are taken, and why a PSK is installed only once the key's erasure
is durable, is ``qkdd.rotation.tunnel_wiring``; this module names the call and the words of its
refusals.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from qkdd.durability import Durable, already_durable
from qkdd.keystore import KeyStore
from qkdd.peer.calls import CallKind, WgInstall
from qkdd.peering import PeerLink
from qkdd.rotation.tunnel_wiring import InstallCall, make_binding_rotators
from qkdd.wireguard.psk_rotator import PskRotator
from qkdd.wireguard.wireguard_binding import WireGuardBinding

WG_INSTALL_CALL: Final = InstallCall(
    CallKind.WG_INSTALL, WgInstall, WgInstall.decode, tunnel="WireGuard", key_name="PSK"
)


def make_wireguard_rotators(
    bindings: tuple[WireGuardBinding, ...],
    links: Mapping[str, PeerLink],
    store: KeyStore,
    durable: Durable = already_durable,
) -> dict[str, PskRotator]:
    """A rotator per binding (by name); registers the WG_INSTALL handler on links where
    this site is the slave. ``durable`` is the store's durability barrier."""
    return make_binding_rotators(bindings, links, store, WG_INSTALL_CALL, PskRotator, durable)
