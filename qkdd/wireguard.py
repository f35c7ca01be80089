"""WireGuard pre-shared keys kept fresh from hybrid keys.

This module owns what is WireGuard's in keeping, for each configured binding (a WireGuard
interface and one peer on it), that peer's pre-shared key (PSK) set to a key both sites
derived from the same hybrid key, and failing closed when no fresh key can be had:

- :class:`WireGuardBinding`, the ``[[wireguard]]`` settings, checked, and
  :func:`parse_wireguard` for its config table;
- :func:`derive_psk`, the PSK of one rotation;
- :class:`PskRotator`, the rotation loop of ``qkdd.rotation.rotator`` (the theory of
  operation is there) with a PSK: installed with ``wg set``, taken up by WireGuard at its
  next handshake, and failing closed by a random PSK.

The decisions are ``qkdd.rotation.policy.RotationPolicy``;
:class:`~qkdd.wg_tool.WgInstaller` (``qkdd/wg_tool.py``) is the only code that runs
``wg``, and the PSK goes to ``wg`` on stdin, never on its command line. Wiring into the
daemon (the store, the peer channel) is ``qkdd.wireguard_link``.

Fail closed: the PSK is set to 32 random bytes that nobody else holds and the peer's
current WireGuard session is ended with it, so no handshake completes and traffic stops at
once, instead of flowing under a key older than the operator allowed (``max_key_age``), or
under no PSK at all when the service starts.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from qkdd import labels
from qkdd.config_reader import ConfigReader
from qkdd.rotation.binding import (
    BindingValueError,
    check_identifiers,
    check_timers,
    derive_binding_key,
    parse_binding,
)
from qkdd.rotation.rotator import KeyRotator
from qkdd.wg_tool import PSK_SIZE, PskInstaller, WgInstaller
from qkdd.wg_tool import WgCommandError as WgCommandError  # re-exported: the errors of
from qkdd.wg_tool import WgNotFoundError as WgNotFoundError  # WireGuard PSKs, in one place
from qkdd.wg_tool import WireGuardError as WireGuardError

if TYPE_CHECKING:
    from qkdd.config import ConsumerConfig, PeerConfig

PUBLIC_KEY_SIZE: Final = 32  # a Curve25519 public key
# WireGuard itself starts a new handshake every 120 s (REKEY_AFTER_TIME); a new PSK takes
# effect at the next handshake, so rotating more often buys nothing.
DEFAULT_INTERVAL: Final = 120.0
DEFAULT_MAX_KEY_AGE: Final = 600.0
DEFAULT_STARTUP_TIMEOUT: Final = 15.0

# Linux interface names: at most 15 bytes (IFNAMSIZ - 1), no '/', ':' or whitespace; a
# leading '-' is refused too so the name can never be read as an option by `wg`.
_INTERFACE_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.=+-]{0,14}$")

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


# --------------------------------------------------------------------------------------
# Configuration


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
    interval: float = DEFAULT_INTERVAL
    max_key_age: float = DEFAULT_MAX_KEY_AGE
    startup_timeout: float = DEFAULT_STARTUP_TIMEOUT
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


def parse_wireguard(
    reader: ConfigReader, consumers: Sequence[ConsumerConfig], peers: Sequence[PeerConfig]
) -> WireGuardBinding:
    """The binding in one ``[[wireguard]]`` table; ConfigError naming the key otherwise."""
    return parse_binding(reader, consumers, peers, WireGuardBinding, WIREGUARD_KEYS, _REQUIRED)


# --------------------------------------------------------------------------------------
# Key derivation


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


# --------------------------------------------------------------------------------------
# The rotator


class PskRotator(KeyRotator[WireGuardBinding, PskInstaller]):
    """Keeps one binding's PSK fresh at this site (see :class:`KeyRotator` for the
    arguments and entry points). ``installer`` runs ``wg`` (the binding's ``wg_command``
    unless given)."""

    log = logging.getLogger("qkdd.wireguard")
    event_prefix = "wireguard"
    installed_event = "wireguard_psk_installed"
    fail_closed_result = "random key (fail closed)"

    @classmethod
    def _installer_for(cls, binding: WireGuardBinding) -> PskInstaller:
        return WgInstaller(binding.wg_command)

    def _derive(self, material: bytes, key_id: str) -> bytes:
        return derive_psk(material, self.binding.name, key_id)

    async def _install(self, key: bytes) -> None:
        # WireGuard takes the PSK up at its next handshake: nothing to wait for.
        await self._installer.install(self.binding.interface, self.binding.peer_public_key, key)

    async def _close(self) -> None:
        # A new PSK alone would leave WireGuard's current session running (up to 180 s):
        # end it too, so traffic stops now.
        await self._installer.install_ending_session(
            self.binding.interface, self.binding.peer_public_key, secrets.token_bytes(PSK_SIZE)
        )

    def _start_failed(self, reason: str | None) -> WireGuardError:
        return WireGuardError(
            f"binding {self.binding.name}: could not install any pre-shared key on "
            f"{self.binding.interface}: {reason}"
        )

    def _tunnel_fields(self) -> dict[str, str]:
        return {"interface": self.binding.interface}
