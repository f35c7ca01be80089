"""WireGuard PSKs kept fresh from hybrid keys: :class:`PskRotator`, the rotation loop of
``qkdd.rotation.key_rotator`` (the theory of operation is there) for one ``[[wireguard]]``
binding at one site.

What is WireGuard's: the PSK is installed with ``wg set`` and taken up by WireGuard at its
next handshake, so it counts once installed. Both sites derive the PSK with
:func:`~qkdd.wireguard.wireguard_binding.derive_psk`; the PSK never crosses the wire.
:class:`~qkdd.wireguard.wg_tool.WgInstaller` is the only code that runs ``wg``, and the
PSK goes to ``wg`` on stdin, never on its command line. The decisions are
``qkdd.rotation.policy.RotationPolicy``.

Fail closed: the PSK is set to 32 random bytes that nobody else holds and the peer's
current WireGuard session is ended with it, so no handshake completes and traffic stops at
once, instead of flowing under a key older than the operator allowed (``max_key_age``), or
under no PSK at all when the service starts.
"""

from __future__ import annotations

import logging
import secrets

from qkdd.rotation.key_rotator import KeyRotator
from qkdd.wireguard.wg_tool import PskInstaller, WgInstaller
from qkdd.wireguard.wireguard_binding import PSK_SIZE, WireGuardBinding, WireGuardError, derive_psk

__all__ = ["PskRotator"]


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
