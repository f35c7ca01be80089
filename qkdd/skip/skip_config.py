"""The ``[skip]`` section of the site config: the SKIP key provider's listener (off unless
the section is there), which client certificate is which local system, and which
remoteSystemID is which SAE at a peer site.

    [skip]
    listen = "0.0.0.0:8443"
    certificate = "/etc/qkdd/skip.crt"        # the listener's certificate and key
    private_key = "/etc/qkdd/skip.key"
    client_ca = "/etc/qkdd/routers-ca.crt"    # CA certificates that issue router certificates
    entropy = true                            # serve GET /entropy (optional, default true)

    [skip.clients]         # client certificate -> local system ID (an SAE of [[consumers]])
    "router-a.example" = "sae-a"              # by subject CN or DNS subjectAltName
    "sha256:5f0c...e1" = "sae-a"              # or by the certificate's SHA-256 fingerprint

    [skip.remote_systems]  # remoteSystemID -> SAE ID at a peer site
    "sae-b" = "sae-b"

Every bad value raises `ConfigError` naming the file, the key and what is expected;
`file_problems` loads the TLS files as the listener will (for ``qkdd check-config``).
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from qkdd.config import ConfigError
from qkdd.config_checks import listener_tls_problems

if TYPE_CHECKING:
    from qkdd.config import ConfigReader, ConsumerConfig, PeerConfig, SiteConfig

__all__ = ["SkipConfig", "file_problems", "fingerprint_name", "parse_skip"]

FINGERPRINT_PREFIX = "sha256:"
_KEYS = {
    "listen",
    "certificate",
    "private_key",
    "client_ca",
    "clients",
    "remote_systems",
    "entropy",
}
_SYSTEM_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
_SYSTEM_ID_EXPECTED = "a remoteSystemID of 1-64 letters, digits, '.', '_', ':', '-'"
_FINGERPRINT_EXPECTED = (
    f'"{FINGERPRINT_PREFIX}" and the 64 hexadecimal digits of the certificate\'s SHA-256 '
    "fingerprint (colons allowed), as `openssl x509 -noout -fingerprint -sha256` prints it"
)


@dataclass(frozen=True)
class SkipConfig:
    """The SKIP listener: TLS 1.3 with required client certificates, as [api.tls]."""

    listen: tuple[str, int]
    certificate: Path
    private_key: Path
    client_ca: Path
    # Certificate name (CN or DNS subjectAltName), or "sha256:" and a fingerprint in lower-case
    # hexadecimal without colons -> local system ID (a local SAE ID).
    clients: tuple[tuple[str, str], ...]
    # remoteSystemID -> SAE ID at a peer site.
    remote_systems: tuple[tuple[str, str], ...]
    entropy: bool = True

    @property
    def systems_by_name(self) -> dict[str, str]:
        return {n: s for n, s in self.clients if not n.startswith(FINGERPRINT_PREFIX)}

    @property
    def systems_by_fingerprint(self) -> dict[str, str]:
        """{SHA-256 fingerprint in lower-case hexadecimal: local system ID}."""
        return {
            n.removeprefix(FINGERPRINT_PREFIX): s
            for n, s in self.clients
            if n.startswith(FINGERPRINT_PREFIX)
        }


def fingerprint_name(text: str) -> str | None:
    """``"sha256:" + 64 lower-case hex digits`` for a fingerprint written with or without
    colons, in either case; None if ``text`` is not one."""
    if not text.lower().startswith(FINGERPRINT_PREFIX):
        return None
    digits = text[len(FINGERPRINT_PREFIX) :].replace(":", "").lower()
    if not re.fullmatch(r"[0-9a-f]{64}", digits):
        return None
    return FINGERPRINT_PREFIX + digits


def parse_skip(
    reader: ConfigReader, consumers: tuple[ConsumerConfig, ...], peers: tuple[PeerConfig, ...]
) -> SkipConfig:
    """The ``[skip]`` table read by ``reader``."""
    psk = sorted(name for name in reader.table if name.lower().startswith("psk"))
    if psk:
        raise reader.error(
            psk[0],
            "client certificates (client_ca and [skip.clients]): TLS-PSK client "
            "authentication is not supported (Python's ssl module has TLS-PSK only from "
            f"Python 3.13, and this is {sys.version_info.major}.{sys.version_info.minor})",
        )
    reader.reject_unknown(_KEYS)
    local = {c.sae_id for c in consumers}
    remote = {sae: peer.site_id for peer in peers for sae in peer.remote_sae_ids}
    clients = _table(reader, "clients", "a table of certificate name = local system ID")
    mapped_clients = []
    for name, system in clients.items():
        key = f"{reader.key('clients')}.{name}"
        if name.lower().startswith(FINGERPRINT_PREFIX):
            normal = fingerprint_name(name)
            if normal is None:
                raise ConfigError(reader.file, key, _FINGERPRINT_EXPECTED, name)
            name = normal
        elif not name or "*" in name:
            raise ConfigError(
                reader.file,
                key,
                "a certificate name (subject CN or DNS subjectAltName) without '*' "
                "(wildcard names never match)",
                name,
            )
        if system not in local:
            raise ConfigError(
                reader.file,
                key,
                "a local system ID: the sae_id of a [[consumers]] entry "
                f"({', '.join(sorted(local)) or 'none'})",
                system,
            )
        mapped_clients.append((name, system))
    systems = _table(reader, "remote_systems", "a table of remoteSystemID = remote SAE ID")
    for system_id, sae in systems.items():
        key = f"{reader.key('remote_systems')}.{system_id}"
        if not _SYSTEM_ID.fullmatch(system_id):
            raise ConfigError(reader.file, key, _SYSTEM_ID_EXPECTED, system_id)
        if sae not in remote:
            raise ConfigError(
                reader.file,
                key,
                "the SAE ID of a remote system: one of the remote_sae_ids of [[peers]] "
                f"({', '.join(sorted(remote)) or 'none'})",
                sae,
            )
    return SkipConfig(
        listen=reader.address("listen"),
        certificate=reader.path("certificate"),
        private_key=reader.path("private_key"),
        client_ca=reader.path("client_ca"),
        clients=tuple(sorted(mapped_clients)),
        remote_systems=tuple(sorted(systems.items())),
        entropy=reader.get("entropy", bool, "true or false", True),
    )


def _table(reader: ConfigReader, name: str, expected: str) -> dict[str, str]:
    table = reader.get(name, dict, expected)
    if not table:
        raise reader.error(name, f"{expected}, with at least one entry")
    for key, value in table.items():
        if not isinstance(value, str):
            raise ConfigError(reader.file, f"{reader.key(name)}.{key}", expected, value)
    return table


def file_problems(config: SiteConfig) -> list[ConfigError]:
    """The [skip] TLS files loaded as the listener will load them, as for [api.tls]."""
    skip = config.skip
    if skip is None:
        return []
    return listener_tls_problems(
        config.file,
        "skip",
        (skip.certificate, skip.private_key, skip.client_ca),
        "the routers' client certificates",
    )
