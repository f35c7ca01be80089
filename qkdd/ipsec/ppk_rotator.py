"""IPsec PPKs kept fresh from hybrid keys: :class:`PpkRotator`, the rotation loop of
``qkdd.rotation.key_rotator`` (the theory of operation is there) for one ``[[ipsec]]`` binding
at one site.

What is IPsec's: the link master installs the PPK the peer already loaded, then asks its
charon for a new IKE SA, since charon mixes a PPK in only when an IKE SA is authenticated;
the rotation counts once that IKE SA is up with a PPK (bounded by ``reauth_timeout`` and
never past the moment the current PPK must go). Both sites derive the PPK with
:func:`~qkdd.ipsec.ipsec_binding.derive_ppk`; the PPK never crosses the wire.
:class:`~qkdd.ipsec.charon.CharonPpk` is the only code that talks to charon. The
decisions are ``qkdd.rotation.policy.RotationPolicy``, where failing closed means "PPK
unloaded and IKE SAs ended".

Fail closed: with no fresh PPK for ``max_key_age`` (or none within ``startup_timeout`` at
start), each site on its own unloads the binding's PPK from charon and ends the
connection's IKE SAs. The connection requires a PPK (``ppk_required = yes``, checked at
every install), so no IKE SA can be authenticated until a rotation succeeds again, and
traffic stops at once instead of flowing under an IKE SA whose PPK is older than allowed.
"""

from __future__ import annotations

import logging

import trio

from qkdd.constants import REAUTH_WAIT
from qkdd.ipsec.charon import CharonPpk, PpkInstaller
from qkdd.ipsec.ipsec_binding import IpsecBinding, IpsecError, derive_ppk
from qkdd.rotation.key_rotator import KeyRotator

__all__ = ["PpkRotator"]


class PpkRotator(KeyRotator[IpsecBinding, PpkInstaller]):
    """Keeps one binding's PPK fresh at this site (see :class:`KeyRotator` for the
    arguments and entry points). ``installer`` talks to charon (over the binding's
    ``vici_socket`` unless given)."""

    log = logging.getLogger("qkdd.ipsec")
    event_prefix = "ipsec"
    installed_event = "ipsec_ppk_installed"
    fail_closed_result = "no PPK (fail closed)"
    taken_up_field = "ike_sa"

    # How long a rotation waits for the new IKE SA, at most; never past the moment the
    # current PPK must go.
    reauth_timeout: float = REAUTH_WAIT

    @classmethod
    def _installer_for(cls, binding: IpsecBinding) -> PpkInstaller:
        return CharonPpk(binding.vici_socket)

    def _derive(self, material: bytes, key_id: str) -> bytes:
        return derive_ppk(material, self.binding.name, key_id)

    async def _install(self, key: bytes) -> None:
        await self._installer.install(self.binding, key)

    async def _take_up(self) -> str:
        # A PPK counts once an IKE SA uses it: until then the running IKE SA (if any) is on
        # the previous one.
        wait = max(0.0, self._deadline(self.reauth_timeout) - trio.current_time())
        return await self._installer.reauthenticate(self.binding, wait=wait)

    async def _close(self) -> str:
        return await self._installer.tear_down(self.binding)

    def _start_failed(self, reason: str | None) -> IpsecError:
        return IpsecError(
            f"binding {self.binding.name}: could neither install a PPK for "
            f"connection {self.binding.connection!r} nor tear it down: {reason}"
        )

    def _tunnel_fields(self) -> dict[str, str]:
        return {"connection": self.binding.connection}

    def _key_fields(self) -> dict[str, str]:
        return {"ppk_id": self.binding.ppk_id}
