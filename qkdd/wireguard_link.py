"""WireGuard bindings wired to the key store and the peer links: one ``PskRotator`` per
``[[wireguard]]`` entry, its rotations carried to the peer by the WG_INSTALL call.

How keys are taken, when a PSK is installed and why it is durable first is
``qkdd.rotation.link``; this module names the call and the words of its refusals.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from qkdd.config import SiteConfig
from qkdd.durability import Durable, already_durable
from qkdd.keystore import KeyStore
from qkdd.peer.calls import CallKind, WgInstall
from qkdd.peering import PeerLink
from qkdd.rotation.link import InstallCall, make_binding_rotators
from qkdd.wireguard import PskRotator

WG_INSTALL_CALL: Final = InstallCall(
    CallKind.WG_INSTALL, WgInstall, WgInstall.decode, tunnel="WireGuard", key_name="PSK"
)


def make_rotators(
    config: SiteConfig,
    links: Mapping[str, PeerLink],
    store: KeyStore,
    durable: Durable = already_durable,
) -> dict[str, PskRotator]:
    """A rotator per binding (by name); registers the WG_INSTALL handler on links where
    this site is the slave. ``durable`` is the store's durability barrier."""
    return make_binding_rotators(
        config.wireguard, links, store, WG_INSTALL_CALL, PskRotator, durable
    )
