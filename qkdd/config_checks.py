"""Checks of a loaded site config beyond its syntax: files the daemon will open at start
(secret files, socket directories, the [api.tls] certificate, key and client CA) and
settings that work but probably not as meant. ``qkdd.config.check_files`` and
``config_warnings`` are the entry points.
"""

from __future__ import annotations

import ipaddress
import os
import ssl
from collections.abc import Callable
from pathlib import Path

from qkdd.config import ConfigError, ConsumerConfig, PeerConfig, RelayedDeviceConfig, SiteConfig
from qkdd.wireguard.wireguard_binding import WireGuardBinding


def _unique(file: Path, key: str, values: list[str]) -> None:
    seen: set[str] = set()
    for value in values:
        if value in seen:
            raise ConfigError(file, key, "unique values", value)
        seen.add(value)


def cross_checks(
    file: Path,
    site_id: str,
    consumers: tuple[ConsumerConfig, ...],
    peers: tuple[PeerConfig, ...],
    wireguard: tuple[WireGuardBinding, ...],
    remotes: tuple[PeerConfig, ...] = (),
) -> None:
    """Rules across sections (unique IDs, each SAE at one site, talks_to naming remote SAEs,
    [[remote]] sites apart from the peers and reached via one), checked once every section
    parsed. ``peers`` are the [[peers]] entries, ``remotes`` the [[remote]] ones."""
    _unique(file, "wireguard[].name", [w.name for w in wireguard])
    _unique(file, "consumers[].sae_id", [c.sae_id for c in consumers])
    _unique(file, "peers[].site_id", [p.site_id for p in peers])
    if any(p.site_id == site_id for p in peers):
        raise ConfigError(file, "peers[].site_id", "a site other than this one", site_id)
    remote_checks(file, site_id, peers, remotes)
    one_site_per_sae(file, consumers, peers, remotes)
    remote = {sae for peer in peers + remotes for sae in peer.remote_sae_ids}
    for i, consumer in enumerate(consumers):
        for j, sae in enumerate(consumer.talks_to or ()):
            if sae not in remote:
                raise ConfigError(
                    file,
                    f"consumers[{i}].talks_to[{j}]",
                    "an SAE ID listed in remote_sae_ids of a [[peers]] or [[remote]] entry "
                    f"({', '.join(sorted(remote)) or 'none'})",
                    sae,
                )


def remote_checks(
    file: Path, site_id: str, peers: tuple[PeerConfig, ...], remotes: tuple[PeerConfig, ...]
) -> None:
    """Each [[remote]] site is another site than this one, not a [[peers]] site (that has a
    link of its own) and listed once; its ``via`` names a [[peers]] site."""
    direct = [p.site_id for p in peers]
    seen: set[str] = set()
    for i, remote in enumerate(remotes):
        key = f"remote[{i}].site_id"
        if remote.site_id == site_id:
            raise ConfigError(file, key, "a site other than this one", remote.site_id)
        if remote.site_id in direct:
            raise ConfigError(
                file,
                key,
                "a site without a [[peers]] entry (a peer's keys come over its own QKD link, "
                "never relayed)",
                remote.site_id,
            )
        if remote.site_id in seen:
            raise ConfigError(file, key, "a site listed once in [[remote]]", remote.site_id)
        seen.add(remote.site_id)
        via = remote.device.via if isinstance(remote.device, RelayedDeviceConfig) else None
        if via is not None and via not in direct:
            raise ConfigError(
                file,
                f"remote[{i}].via",
                f"the site_id of a [[peers]] entry, the first hop ({', '.join(direct) or 'none'})",
                via,
            )


def one_site_per_sae(
    file: Path,
    consumers: tuple[ConsumerConfig, ...],
    peers: tuple[PeerConfig, ...],
    remotes: tuple[PeerConfig, ...] = (),
) -> None:
    """Every SAE is at one site. Keys are made only for an SAE here and an SAE at a peer
    or remote site, over the QKD link with that site (or relayed): a pair of SAEs at one
    site has no link to agree keys over, and an SAE at two sites would have two."""
    local = {c.sae_id for c in consumers}
    site_of: dict[str, str] = {}
    tables = [("peers", i, p) for i, p in enumerate(peers)]
    tables += [("remote", i, p) for i, p in enumerate(remotes)]
    for table, i, peer in tables:
        for j, sae in enumerate(peer.remote_sae_ids):
            key = f"{table}[{i}].remote_sae_ids[{j}]"
            if sae in local:
                raise ConfigError(
                    file,
                    key,
                    "an SAE at that peer site, not one of this site's [[consumers]] (keys "
                    "are made only between an SAE here and an SAE at a peer site)",
                    sae,
                )
            if sae in site_of:
                raise ConfigError(
                    file,
                    key,
                    "an SAE listed once, under one [[peers]] or [[remote]] entry (it is "
                    f"already at site {site_of[sae]})",
                    sae,
                )
            site_of[sae] = peer.site_id


def file_problems(config: SiteConfig) -> list[ConfigError]:
    """Problems a daemon would hit at start that parsing alone cannot see."""
    problems: list[ConfigError] = []
    secret_files = (
        (
            "identity.private_key",
            config.identity_key,
            "an existing ML-DSA-65 seed file",
            "qkdd keygen --out FILE",
        ),
        (
            "store.key_encryption_key",
            config.key_encryption_key,
            "an existing 32-byte key file",
            "qkdd keygen --kek FILE",
        ),
    )
    for key, source, expected, create_with in secret_files:
        # A systemd credential only exists while the service runs: nothing to check here.
        if source.path is not None and not source.path.is_file():
            problems.append(
                ConfigError(
                    config.file,
                    key,
                    f"{expected} (create it with `{create_with}`)",
                    str(source.path),
                )
            )
    if not config.api_socket.parent.is_dir():
        problems.append(
            ConfigError(
                config.file, "api.socket", "a path in an existing directory", str(config.api_socket)
            )
        )
    sockets = [("api.socket", config.api_socket)]
    if config.metrics is not None and config.metrics.socket is not None:
        sockets.append(("metrics.socket", config.metrics.socket))
    for key, socket in sockets:
        if key != "api.socket" and not socket.parent.is_dir():
            problems.append(
                ConfigError(config.file, key, "a path in an existing directory", str(socket))
            )
        if len(os.fsencode(socket)) > 107:
            problems.append(
                ConfigError(
                    config.file,
                    key,
                    "a path of at most 107 bytes (a Unix socket limit)",
                    str(socket),
                )
            )
    if config.api_tls is not None:
        problems.extend(tls_file_problems(config))
    return problems


def tls_file_problems(config: SiteConfig) -> list[ConfigError]:
    """The [api.tls] files loaded as the listener will load them."""
    tls = config.api_tls
    assert tls is not None
    return listener_tls_problems(
        config.file, "api.tls", (tls.certificate, tls.private_key, tls.client_ca)
    )


def listener_tls_problems(
    file: Path,
    section: str,
    paths: tuple[Path, Path, Path],
    client_certificates: str = "client certificates",
) -> list[ConfigError]:
    """A TLS listener's files, the `certificate`, `private_key` and `client_ca` of `section`
    (their `paths` in that order), loaded as the listener will load them: a missing or
    unreadable file, a certificate file without a certificate, a key that is not the
    certificate's, a client CA file without a CA certificate (of `client_certificates`)."""
    files = dict(zip(("certificate", "private_key", "client_ca"), paths, strict=True))
    certificate, private_key, client_ca = (str(path) for path in paths)
    problems = []
    readable = set()
    for name, path in files.items():
        try:
            with open(path, "rb"):
                readable.add(name)
        except OSError as exc:
            problems.append(
                ConfigError(
                    file,
                    f"{section}.{name}",
                    "an existing, readable PEM file",
                    f"{path} ({exc.strerror or exc})",
                )
            )

    def loads(name: str, expected: str, load: Callable[[ssl.SSLContext], None]) -> bool:
        """Whether the file `name` is readable and loads (a problem if it does not load)."""
        if name not in readable:
            return False
        problem = _load_problem(load)
        if problem is not None:
            key = f"{section}.{name}"
            problems.append(ConfigError(file, key, expected, f"{files[name]} ({problem})"))
        return problem is None

    if loads(
        "certificate",
        "a PEM file holding the listener's certificate",
        lambda ctx: ctx.load_verify_locations(cafile=certificate),
    ):
        loads(
            "private_key",
            f"an unencrypted PEM private key matching {section}.certificate (the key that "
            "belongs to it)",
            lambda ctx: ctx.load_cert_chain(certificate, private_key, password=_no_password),
        )
    loads(
        "client_ca",
        f"a PEM file of the CA certificates that issue {client_certificates}",
        lambda ctx: ctx.load_verify_locations(cafile=client_ca),
    )
    return problems


def _no_password() -> bytes:
    # An encrypted key would make OpenSSL ask on the terminal; the listener cannot either.
    return b""


def _load_problem(load: Callable[[ssl.SSLContext], None]) -> str | None:
    """Why OpenSSL refuses what ``load`` feeds a fresh server context, or None."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        load(context)
    except ssl.SSLError as exc:
        return exc.reason or str(exc)
    except (OSError, ValueError) as exc:
        return str(exc)
    return None


def warnings_for(config: SiteConfig) -> list[str]:
    """Settings that work but probably not as meant; `qkdd check-config` prints them and
    the daemon logs them at start."""
    warnings = []
    entries = [f"peers[{i}]" for i in range(len(config.direct_peers))]
    entries += [f"remote[{i}]" for i in range(len(config.remote_peers))]
    for entry, peer in zip(entries, config.direct_peers + config.remote_peers, strict=True):
        if peer.pool_size < config.max_keys_per_request:
            warnings.append(
                f"{config.file}: {entry}.pool_size ({peer.pool_size}) is below "
                f"api.max_keys_per_request ({config.max_keys_per_request}): an SAE here can "
                f"take at most {peer.pool_size} keys per enc_keys request for an SAE at site "
                f"{peer.site_id} (the pool never holds more; the ETSI Status object says so "
                "and a request for more is refused with 400); raise pool_size or lower "
                "max_keys_per_request"
            )
    if config.metrics is not None and config.metrics.listen is not None:
        host = config.metrics.listen[0]
        if not _is_loopback(host):
            warnings.append(
                f"{config.file}: metrics.listen {config.metrics.describe()} is not a loopback "
                "address: anyone who can reach it reads the metrics (site and SAE IDs, pool "
                "levels; never keys) without authentication; prefer 127.0.0.1 or a socket"
            )
    return warnings


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False
