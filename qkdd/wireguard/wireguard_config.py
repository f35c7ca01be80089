"""The ``[[wireguard]]`` tables of the site config: one :class:`WireGuardBinding` each,
checked against the site's consumers and peers. ``qkdd.config.parse_config`` calls
:func:`parse_wireguard` for each table; every bad value raises ``ConfigError`` naming the
file, the key and what is expected.

    [[wireguard]]
    name = "tunnel-a-b"           # the same at both sites
    interface = "wg0"             # the local WireGuard interface
    peer_public_key = "base64..." # the peer's public key, as `wg pubkey` prints it
    peer_site = "site-b"
    local_sae = "wg-a"
    remote_sae = "wg-b"
    # interval = 120, max_key_age = 600, startup_timeout = 15, wg_command = "wg"
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

from qkdd.rotation.tunnel_binding import parse_binding
from qkdd.wireguard.wireguard_binding import WireGuardBinding

if TYPE_CHECKING:
    from qkdd.config import ConsumerConfig, PeerConfig
    from qkdd.config_reader import ConfigReader

__all__ = ["WIREGUARD_KEYS", "parse_wireguard"]

WIREGUARD_KEYS: Final = frozenset(
    {
        "name",
        "interface",
        "peer_public_key",
        "peer_site",
        "local_sae",
        "remote_sae",
        "interval",
        "max_key_age",
        "startup_timeout",
        "wg_command",
    }
)
# Checked in this order: the first missing one is reported.
_REQUIRED: Final = ("interface", "local_sae", "name", "peer_public_key", "peer_site", "remote_sae")


def parse_wireguard(
    reader: ConfigReader, consumers: Sequence[ConsumerConfig], peers: Sequence[PeerConfig]
) -> WireGuardBinding:
    """The binding in one ``[[wireguard]]`` table; ConfigError naming the key otherwise."""
    return parse_binding(reader, consumers, peers, WireGuardBinding, WIREGUARD_KEYS, _REQUIRED)
