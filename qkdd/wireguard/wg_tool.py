"""Running wg(8): the only code in qkdd that changes a WireGuard interface.

Two operations on one peer of one interface:

- :meth:`WgInstaller.install` sets the peer's pre-shared key (PSK). WireGuard takes it up
  at its next handshake; the current session runs on under the old key until then (up to
  REJECT_AFTER_TIME, 180 s), which is right for a rotation.
- :meth:`WgInstaller.install_ending_session` sets the PSK *and* ends the current session
  at once, for failing closed. Setting a PSK alone leaves the session's keys in place
  (wireguard-go's ``preshared_key`` handler and the kernel's only replace the static key),
  and wg(8) has no command to expire a session; removing the peer does (its keypairs go
  with it). So the peer is removed and added back in one ``wg set`` (applied in order in
  one configuration request), with the endpoint, allowed IPs and keepalive that
  ``wg show IFACE dump`` reported just before, and the new PSK.

The PSK goes to ``wg`` on stdin (``preshared-key /dev/stdin``), never on its command line,
where ``ps`` would show it. What ``wg show`` prints (it includes the interface's private
key) is parsed for the one peer and never logged.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Final, Protocol

import trio

from qkdd.constants import MAX_STDERR_CHARS, WG_TIMEOUT
from qkdd.rotation.tunnel_binding import KeyMaterialError
from qkdd.wireguard.wireguard_binding import PSK_SIZE, WireGuardError

# `wg show IFACE dump`, one line per peer: public-key, preshared-key, endpoint,
# allowed-ips, latest-handshake, transfer-rx, transfer-tx, persistent-keepalive (wg(8)).
DUMP_PEER_FIELDS: Final = 8
_NONE: Final = "(none)"  # how dump prints an unset endpoint or an empty allowed-ips list


class WgNotFoundError(WireGuardError):
    """The ``wg`` tool could not be started (not installed, not on PATH, not executable)."""


class WgCommandError(WireGuardError):
    """``wg`` ran and failed, or did not finish in time; carries its exit code and stderr."""

    def __init__(self, message: str, returncode: int | None, stderr: str) -> None:
        super().__init__(message)
        self.returncode = returncode
        self.stderr = stderr


class PskInstaller(Protocol):
    """Sets one peer's PSK on one interface; raises WireGuardError on failure
    (KeyMaterialError for a PSK of the wrong size)."""

    async def install(self, interface: str, peer_public_key: str, psk: bytes) -> None:
        """Set the PSK; the peer's current session runs on until its next handshake."""

    async def install_ending_session(
        self, interface: str, peer_public_key: str, psk: bytes
    ) -> None:
        """Set the PSK and end the peer's current session, keeping its other settings."""


@dataclass(frozen=True)
class PeerSettings:
    """What ``wg set`` needs to add a peer back as it was (the PSK aside)."""

    endpoint: str | None
    allowed_ips: str | None
    persistent_keepalive: str | None

    def arguments(self) -> list[str]:
        args = []
        if self.endpoint is not None:
            args += ["endpoint", self.endpoint]
        if self.persistent_keepalive is not None:
            args += ["persistent-keepalive", self.persistent_keepalive]
        if self.allowed_ips is not None:
            args += ["allowed-ips", self.allowed_ips]
        return args


def peer_settings_from_dump(dump: str, peer_public_key: str) -> PeerSettings | None:
    """The settings of ``peer_public_key`` in ``wg show IFACE dump`` output; None if the
    interface has no such peer."""
    for line in dump.splitlines()[1:]:  # the first line is the interface's own
        fields = line.split("\t")
        if len(fields) != DUMP_PEER_FIELDS or fields[0] != peer_public_key:
            continue
        endpoint, allowed_ips, keepalive = fields[2], fields[3], fields[7]
        return PeerSettings(
            endpoint=None if endpoint == _NONE else endpoint,
            allowed_ips=None if allowed_ips == _NONE else allowed_ips,
            persistent_keepalive=None if keepalive == "off" else keepalive,
        )
    return None


class WgInstaller:
    """Installs PSKs with ``wg set INTERFACE peer KEY preshared-key /dev/stdin``."""

    def __init__(self, command: str = "wg", *, timeout: float = WG_TIMEOUT) -> None:
        self.command = command
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"WgInstaller(command={self.command!r})"

    def command_line(self, interface: str, peer_public_key: str) -> list[str]:
        # wg reads a PSK from a file by path: "/dev/stdin" lets it read the pipe, so the
        # key is never an argument.
        key_file = "/dev/stdin"
        return [self.command, "set", interface, "peer", peer_public_key, "preshared-key", key_file]

    async def install(self, interface: str, peer_public_key: str, psk: bytes) -> None:
        await self._set(self.command_line(interface, peer_public_key), psk)

    async def install_ending_session(
        self, interface: str, peer_public_key: str, psk: bytes
    ) -> None:
        dump = await self._run([self.command, "show", interface, "dump"], b"")
        settings = peer_settings_from_dump(dump.decode(errors="replace"), peer_public_key)
        argv = self.command_line(interface, peer_public_key)
        if settings is not None:  # else there is no peer, so no session to end
            argv[3:3] = ["peer", peer_public_key, "remove"]
            argv += settings.arguments()
        await self._set(argv, psk)

    async def _set(self, argv: list[str], psk: bytes) -> None:
        if len(psk) != PSK_SIZE:
            raise KeyMaterialError(f"a WireGuard PSK is {PSK_SIZE} bytes, got {len(psk)}")
        await self._run(argv, base64.b64encode(psk) + b"\n")

    async def _run(self, argv: list[str], stdin: bytes) -> bytes:
        """Run ``wg`` and return its stdout; the arguments never hold a secret, so errors
        show them whole."""
        shown = " ".join(argv)
        try:
            with trio.fail_after(self.timeout):
                result = await trio.run_process(
                    argv, stdin=stdin, capture_stdout=True, capture_stderr=True, check=False
                )
        except FileNotFoundError:
            raise WgNotFoundError(
                f"cannot run {self.command!r}: not found. Install wireguard-tools, or set "
                "wg_command in the [[wireguard]] binding to the path of `wg`"
            ) from None
        except PermissionError:
            raise WgNotFoundError(
                f"cannot run {self.command!r}: permission denied (is it executable?)"
            ) from None
        except trio.TooSlowError:
            raise WgCommandError(
                f"`{shown}` did not finish within {self.timeout:g} s",
                None,
                "",
            ) from None
        if result.returncode != 0:
            stderr = result.stderr.decode(errors="replace")
            # wg echoes a key it cannot parse ("Key is not the correct length or format:
            # `…'"); whatever it says, the PSK must not reach a log through it.
            key = stdin.strip().decode()
            if key:
                stderr = stderr.replace(key, "<psk hidden>")
            stderr = stderr.strip()[:MAX_STDERR_CHARS]
            raise WgCommandError(
                f"`{shown}` exited with status {result.returncode}: {stderr or '(no output)'}",
                result.returncode,
                stderr,
            )
        return bytes(result.stdout)
