"""One ``[[wireguard]]`` binding: its settings, checked, and the PSK derived for it from a
hybrid key. No Trio and no I/O here, so the config loader can use it. What every tunnel
binding shares (the checks of names and timers, the derivation, the error root) is
``qkdd.rotation.tunnel_binding``.

A binding names a WireGuard interface and one peer on it whose pre-shared key (PSK) qkdd
keeps fresh, the peer site, and the SAE pair whose hybrid keys feed it.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from typing import Final

from qkdd import labels
from qkdd.constants import (
    WIREGUARD_DEFAULT_INTERVAL,
    WIREGUARD_DEFAULT_MAX_KEY_AGE,
    WIREGUARD_DEFAULT_STARTUP_TIMEOUT,
)
from qkdd.rotation.tunnel_binding import (
    BindingValueError,
    RotationError,
    check_identifiers,
    check_timers,
    derive_binding_key,
)

PSK_SIZE: Final = 32  # WireGuard's pre-shared key: 32 bytes (the Noise IKpsk2 "psk")
PUBLIC_KEY_SIZE: Final = 32  # a Curve25519 public key

# Linux interface names: at most 15 bytes (IFNAMSIZ - 1), no '/', ':' or whitespace; a
# leading '-' is refused too so the name can never be read as an option by `wg`.
_INTERFACE_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.=+-]{0,14}$")


class WireGuardError(RotationError):
    """Base class for every WireGuard error in qkdd."""


@dataclass(frozen=True)
class WireGuardBinding:
    """One ``[[wireguard]]`` entry: a peer on a local interface whose PSK qkdd keeps fresh.

    Checked on construction; a bad value raises ValueError naming the key and what is
    expected. ``name`` must be the same at both sites: it names the binding on the peer
    channel and is bound into every PSK.
    """

    name: str
    interface: str
    peer_public_key: str
    peer_site: str
    local_sae: str
    remote_sae: str
    interval: float = WIREGUARD_DEFAULT_INTERVAL
    max_key_age: float = WIREGUARD_DEFAULT_MAX_KEY_AGE
    startup_timeout: float = WIREGUARD_DEFAULT_STARTUP_TIMEOUT
    wg_command: str = "wg"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise BindingValueError (a ValueError) for the first bad value, with what was
        expected."""
        check_identifiers(self, "wireguard")
        if not isinstance(self.interface, str) or not _INTERFACE_PATTERN.match(self.interface):
            raise BindingValueError(
                "wireguard",
                "interface",
                "a network interface name of at most 15 characters such as 'wg0', "
                f"got {self.interface!r}",
            )
        if not _is_wireguard_key(self.peer_public_key):
            raise BindingValueError(
                "wireguard",
                "peer_public_key",
                "the peer's WireGuard public key, base64 of 32 bytes as `wg pubkey` prints "
                f"it, got {self.peer_public_key!r}",
            )
        check_timers(self, "wireguard")
        if not isinstance(self.wg_command, str) or not self.wg_command.strip():
            raise BindingValueError("wireguard", "wg_command", "the path or name of `wg`")


def _is_wireguard_key(value: object) -> bool:
    if not isinstance(value, str):
        return False
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return False
    # Canonical form only: `wg` prints keys this way, and a non-canonical spelling of the
    # same key would make two configs look different.
    return len(raw) == PUBLIC_KEY_SIZE and base64.b64encode(raw).decode() == value


def derive_psk(material: bytes, binding_name: str, key_id: str) -> bytes:
    """The 32-byte PSK for ``binding_name`` from the hybrid key ``key_id``.

    ``PSK = HKDF-SHA256(salt = "", ikm = material,
    info = lp(LABEL_WIREGUARD_PSK) || lp(binding_name) || lp(key_id), 32)``

    The hybrid key is already uniform and bound to both sites and SAEs; the HKDF step adds
    domain separation (a WireGuard PSK never equals a key an application could also hold)
    and binds the PSK to the binding, so one key can never serve two tunnels alike.
    """
    return derive_binding_key(
        labels.LABEL_WIREGUARD_PSK,
        material,
        binding_name,
        key_id,
        size=PSK_SIZE,
        what="a WireGuard PSK",
    )
