"""The ``[[ipsec]]`` tables of the site config: one :class:`IpsecBinding` each, checked
against the site's consumers and peers. ``qkdd.config.parse_config`` calls
:func:`parse_ipsec` for each table; every bad value raises ``ConfigError`` naming the
file, the key and what is expected.

    [[ipsec]]
    name = "tunnel-a-b"           # the same at both sites
    connection = "site-b"         # the connection's name in swanctl.conf
    ppk_id = "qkdd-tunnel-a-b"    # its ppk_id (default: name); ppk_required = yes there
    peer_site = "site-b"
    local_sae = "ipsec-a"
    remote_sae = "ipsec-b"
    # vici_socket = "/var/run/charon.vici"
    # interval = 300, max_key_age = 900, startup_timeout = 15
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from qkdd.config_reader import ConfigError
from qkdd.ipsec.ipsec_binding import IpsecBinding
from qkdd.rotation.tunnel_binding import parse_binding

if TYPE_CHECKING:
    from qkdd.config import ConsumerConfig, PeerConfig
    from qkdd.config_reader import ConfigReader

__all__ = ["IPSEC_KEYS", "parse_ipsec", "unique_names"]

IPSEC_KEYS = frozenset(
    {
        "name",
        "connection",
        "ppk_id",
        "peer_site",
        "local_sae",
        "remote_sae",
        "vici_socket",
        "interval",
        "max_key_age",
        "startup_timeout",
    }
)
_REQUIRED = ("name", "connection", "peer_site", "local_sae", "remote_sae")


def parse_ipsec(
    reader: ConfigReader,
    consumers: Sequence[ConsumerConfig],
    peers: Sequence[PeerConfig],
) -> IpsecBinding:
    """The binding in one ``[[ipsec]]`` table."""
    return parse_binding(reader, consumers, peers, IpsecBinding, IPSEC_KEYS, _REQUIRED)


def unique_names(file: Path, bindings: Sequence[IpsecBinding]) -> None:
    """Binding names, and the charon connections they drive, each appear once: two
    bindings on one connection would replace each other's PPK."""
    for key, values in (
        ("ipsec[].name", [b.name for b in bindings]),
        ("ipsec[].connection", [f"{b.vici_socket} {b.connection}" for b in bindings]),
    ):
        seen: set[str] = set()
        for value in values:
            if value in seen:
                raise ConfigError(file, key, "unique values", value.rpartition(" ")[2])
            seen.add(value)
