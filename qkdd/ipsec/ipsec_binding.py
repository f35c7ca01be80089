"""One ``[[ipsec]]`` binding: its settings, checked, and the PPK derived for it from a
hybrid key. No Trio and no I/O here, so the config loader can use it. What every tunnel
binding shares (the checks of names and timers, the derivation, the error root) is
``qkdd.rotation.tunnel_binding``.

A binding names an IKEv2 connection of the local strongSwan daemon (charon) whose
post-quantum preshared key (PPK, RFC 8784) qkdd keeps fresh: the connection's
``ppk_id`` in swanctl.conf, the peer site, and the SAE pair whose hybrid keys feed it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from qkdd import labels
from qkdd.constants import (
    IPSEC_DEFAULT_INTERVAL,
    IPSEC_DEFAULT_MAX_KEY_AGE,
    IPSEC_DEFAULT_STARTUP_TIMEOUT,
)
from qkdd.rotation.tunnel_binding import (
    BindingValueError,
    RotationError,
    check_identifiers,
    check_timers,
    derive_binding_key,
)

PPK_SIZE: Final = 32  # RFC 8784 asks for at least 256 bits of entropy
DEFAULT_VICI_SOCKET: Final = "/var/run/charon.vici"

# A swanctl.conf connection name is a section name: letters, digits, '-', '_', '.'.
_CONNECTION_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# The PPK ID as charon prints it back: no spaces, quotes, '@' or wildcards, so the
# string in swanctl.conf and the one qkdd loads the PPK under are the same identity.
_PPK_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


class IpsecError(RotationError):
    """Base class of every IPsec binding error in qkdd."""


@dataclass(frozen=True)
class IpsecBinding:
    """One ``[[ipsec]]`` entry. ``name`` must be the same at both sites: it names the
    binding on the peer channel and is bound into every PPK. ``ppk_id`` defaults to
    ``name``; it must equal the connection's ``ppk_id`` in swanctl.conf at both sites."""

    name: str
    connection: str
    peer_site: str
    local_sae: str
    remote_sae: str
    ppk_id: str = ""
    vici_socket: str = DEFAULT_VICI_SOCKET
    interval: float = IPSEC_DEFAULT_INTERVAL
    max_key_age: float = IPSEC_DEFAULT_MAX_KEY_AGE
    startup_timeout: float = IPSEC_DEFAULT_STARTUP_TIMEOUT

    def __post_init__(self) -> None:
        if self.ppk_id == "" and isinstance(self.name, str):
            object.__setattr__(self, "ppk_id", self.name)
        self.validate()

    @property
    def secret_id(self) -> str:
        """The unique ID charon holds this binding's PPK under (``swanctl
        --list-creds``-style tools and ``get-shared`` show it); each install replaces the
        PPK with this ID."""
        return f"qkdd-ppk-{self.name}"

    def validate(self) -> None:
        """Raise BindingValueError (a ValueError) for the first bad value."""
        check_identifiers(self, "ipsec")
        if not isinstance(self.connection, str) or not _CONNECTION_PATTERN.match(self.connection):
            raise BindingValueError(
                "ipsec",
                "connection",
                "the name of the connection in swanctl.conf (letters, digits, '.', '_', "
                f"'-'; at most 64 characters), got {self.connection!r}",
            )
        if not isinstance(self.ppk_id, str) or not _PPK_ID_PATTERN.match(self.ppk_id):
            raise BindingValueError(
                "ipsec",
                "ppk_id",
                "the connection's ppk_id as in swanctl.conf (letters, digits, '.', '_', "
                f"':', '-'; at most 128 characters), got {self.ppk_id!r}",
            )
        if (
            not isinstance(self.vici_socket, str)
            or not self.vici_socket.startswith("/")
            or "\x00" in self.vici_socket
        ):
            raise BindingValueError(
                "ipsec",
                "vici_socket",
                "the absolute path of charon's VICI socket (charon.plugins.vici.socket, "
                f"default {DEFAULT_VICI_SOCKET}), got {self.vici_socket!r}",
            )
        check_timers(self, "ipsec")


def derive_ppk(material: bytes, binding_name: str, key_id: str) -> bytes:
    """The 32-byte PPK for ``binding_name`` from the hybrid key ``key_id``.

    ``PPK = HKDF-SHA256(salt = "", ikm = material,
    info = lp(LABEL_IPSEC_PPK) || lp(binding_name) || lp(key_id), 32)``

    As for WireGuard PSKs: the label keeps the PPK apart from any key an application could
    hold, and the name and key ID bind it to one binding and one rotation.
    """
    return derive_binding_key(
        labels.LABEL_IPSEC_PPK, material, binding_name, key_id, size=PPK_SIZE, what="a PPK"
    )
