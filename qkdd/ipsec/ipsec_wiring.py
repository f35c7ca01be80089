"""IPsec bindings wired to the key store and the peer links: one ``PpkRotator`` per
``[[ipsec]]`` entry, its rotations carried to the peer by the IPSEC_INSTALL call.

At the link slave the call's handler takes the named key by ID and loads its PPK into
charon, answering only once charon holds it, so the master loads its copy and asks for a
new IKE SA only after the peer has. How keys are taken, and why a PPK is loaded only once
the key's erasure is durable, is ``qkdd.rotation.tunnel_wiring``; this module names the call and
the words of its refusals.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from qkdd.durability import Durable, already_durable
from qkdd.ipsec.ipsec_binding import IpsecBinding
from qkdd.ipsec.ppk_rotator import PpkRotator
from qkdd.keystore import KeyStore
from qkdd.peer.calls import CallKind, IpsecInstall
from qkdd.peering import PeerLink
from qkdd.rotation.tunnel_wiring import InstallCall, make_binding_rotators

IPSEC_INSTALL_CALL: Final = InstallCall(
    CallKind.IPSEC_INSTALL, IpsecInstall, IpsecInstall.decode, tunnel="IPsec", key_name="PPK"
)


def make_ipsec_rotators(
    bindings: tuple[IpsecBinding, ...],
    links: Mapping[str, PeerLink],
    store: KeyStore,
    durable: Durable = already_durable,
) -> dict[str, PpkRotator]:
    """A rotator per binding (by name); registers the IPSEC_INSTALL handler on links where
    this site is the slave. ``durable`` is the store's durability barrier."""
    return make_binding_rotators(bindings, links, store, IPSEC_INSTALL_CALL, PpkRotator, durable)
