"""Site configuration: one TOML file per site, loaded into frozen dataclasses.

Every bad value raises :class:`ConfigError`, whose message names the file, the key and
what was expected. Relative paths are resolved against the directory of the config file,
so a site's files can be moved as one folder.
"""

from __future__ import annotations

import base64
import binascii
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from qkdd.config_reader import ID_PATTERN, ConfigProblems, ConfigReader
from qkdd.config_reader import ConfigError as ConfigError
from qkdd.config_reader import ConfigErrors as ConfigErrors
from qkdd.constants import MAX_CONFIG_BYTES, QKD_BUFFER_MAX
from qkdd.crypto import SIGNATURE_PUBLIC_KEY_SIZE
from qkdd.crypto.select import BACKEND_CHOICES
from qkdd.ipsec.ipsec_binding import IpsecBinding
from qkdd.ipsec.ipsec_config import parse_ipsec, unique_names
from qkdd.wireguard.wireguard_binding import WireGuardBinding
from qkdd.wireguard.wireguard_config import parse_wireguard

if sys.version_info >= (3, 11):  # noqa: UP036 - tomli stays declared for older Pythons
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

if TYPE_CHECKING:
    from qkdd.skip.skip_config import SkipConfig

T = TypeVar("T")

DEVICE_KINDS = ("serial", "etsi014")


@dataclass(frozen=True)
class SecretSource:
    """Where a secret file comes from: a path, or a systemd credential (LoadCredential=)."""

    path: Path | None
    credential: str | None

    def describe(self) -> str:
        return f"systemd credential {self.credential!r}" if self.credential else str(self.path)


@dataclass(frozen=True)
class TlsConfig:
    """The optional ETSI 014 listener over TLS 1.3 with client certificates."""

    listen: tuple[str, int]
    certificate: Path
    private_key: Path
    client_ca: Path
    clients: tuple[tuple[str, str], ...]  # certificate name -> SAE ID

    @property
    def sae_by_name(self) -> dict[str, str]:
        return dict(self.clients)


@dataclass(frozen=True)
class MetricsConfig:
    """The optional Prometheus listener of its own ([metrics]): GET /metrics only, on a TCP
    address or a Unix socket (exactly one of the two)."""

    listen: tuple[str, int] | None
    socket: Path | None
    socket_mode: int = 0o660

    def describe(self) -> str:
        if self.listen is not None:
            host, port = self.listen
            return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return str(self.socket)


@dataclass(frozen=True)
class SerialDeviceConfig:
    """A QKD device on a serial port, speaking drivers/PROTOCOL.md (or the emulator)."""

    path: Path
    baudrate: int
    kind: str = "serial"

    def describe(self) -> str:
        return str(self.path)


@dataclass(frozen=True)
class Etsi014DeviceConfig:
    """A QKD device (KME) that hands out keys itself over ETSI GS QKD 014 (HTTPS, mutual
    TLS); see drivers/ETSI014_DEVICES.md."""

    url: str
    certificate: Path
    private_key: Path | None
    ca: Path | None
    own_sae_id: str
    peer_sae_id: str
    key_size: int
    kind: str = "etsi014"

    def describe(self) -> str:
        return self.url


@dataclass(frozen=True)
class RelayedDeviceConfig:
    """No QKD device: a [[remote]] site's keys come relayed through trusted sites over
    their links (docs/protocol.md §10, §11), by the static next hop ``via`` when it is set,
    else along the shortest path the link-state database gives."""

    via: str | None = None
    kind: str = "relayed"

    def describe(self) -> str:
        return f"relayed (via {self.via})" if self.via else "relayed (shortest path)"


DeviceConfig = SerialDeviceConfig | Etsi014DeviceConfig | RelayedDeviceConfig

# [relay] pad_bytes: relay pads kept ready per direction of every direct link.
RELAY_PAD_BYTES_DEFAULT = 256 * 1024
RELAY_PAD_BYTES_MIN = 8 * 1024
RELAY_PAD_BYTES_MAX = 64 * 1024 * 1024


@dataclass(frozen=True)
class PeerConfig:
    site_id: str
    address: tuple[str, int]
    public_key: bytes = field(repr=False)
    remote_sae_ids: tuple[str, ...]
    device: DeviceConfig
    pool_size: int
    auth_key_bits: int
    qkd_buffer_keys: int
    # One-time pad (raw QKD material) kept ready per local sender -> remote recipient pair,
    # for one-time-pad messages; 0 keeps none.
    otp_pad_bytes: int = 0

    @property
    def relayed(self) -> bool:
        """A [[remote]] site: no QKD link or TCP address of its own (``address`` is ("", 0))."""
        return isinstance(self.device, RelayedDeviceConfig)


@dataclass(frozen=True)
class ConsumerConfig:
    sae_id: str
    uid: int | None
    # At most this many keys per rolling hour through enc_keys (None: no quota).
    keys_per_hour: int | None = None
    # The remote SAEs it gets keys for (None: every SAE of every peer); key pools are
    # filled only for pairs some consumer talks to.
    talks_to: tuple[str, ...] | None = None


@dataclass(frozen=True)
class SiteConfig:
    file: Path
    site_id: str
    listen: tuple[str, int]
    state_directory: Path
    key_encryption_key: SecretSource
    key_lifetime: int
    identity_key: SecretSource
    api_socket: Path
    api_socket_mode: int
    api_tls: TlsConfig | None
    key_size: int
    max_keys_per_request: int
    pqc_backend: str
    consumers: tuple[ConsumerConfig, ...]
    peers: tuple[PeerConfig, ...]
    # [messages]: the largest message an application may send, and how many messages an
    # SAE's inbox holds unacknowledged before new ones are refused.
    message_max_size: int = 1024 * 1024
    message_max_pending: int = 100_000
    # [[wireguard]]: WireGuard peers whose pre-shared key is kept fresh from hybrid keys.
    wireguard: tuple[WireGuardBinding, ...] = ()
    # [metrics]: Prometheus metrics on a listener of their own (None: only on the API socket).
    metrics: MetricsConfig | None = None
    # [skip]: the SKIP key provider for routers (qkdd.skip.skip_config; None: off).
    skip: SkipConfig | None = None
    # [[ipsec]]: IKEv2 connections of charon whose PPK is kept fresh from hybrid keys.
    ipsec: tuple[IpsecBinding, ...] = ()
    # [relay] pad_bytes: relay pads kept ready per direction of every direct link, for
    # relaying (0: relaying is off; on with [relay] or any [[remote]]).
    relay_pad_bytes: int = 0

    @property
    def direct_peers(self) -> tuple[PeerConfig, ...]:
        """The [[peers]]: sites joined to this one by a QKD link and a peer session."""
        return tuple(p for p in self.peers if not p.relayed)

    @property
    def remote_peers(self) -> tuple[PeerConfig, ...]:
        """The [[remote]] sites, whose keys come relayed through trusted sites."""
        return tuple(p for p in self.peers if p.relayed)

    @property
    def local_sae_ids(self) -> frozenset[str]:
        return frozenset(c.sae_id for c in self.consumers)

    def talking_pairs(self) -> frozenset[tuple[str, str]]:
        """(local SAE, remote SAE) pairs some consumer gets keys for: its talks_to, or every
        SAE of every peer when it has none. Only these pools are filled here."""
        remote = [sae for peer in self.peers for sae in peer.remote_sae_ids]
        return frozenset(
            (c.sae_id, sae)
            for c in self.consumers
            for sae in (remote if c.talks_to is None else c.talks_to)
        )

    def sae_ids_for_uid(self, uid: int) -> frozenset[str]:
        """The SAE IDs a local caller with this uid may act as (uid unset = any caller)."""
        return frozenset(c.sae_id for c in self.consumers if c.uid is None or c.uid == uid)

    def peer(self, site_id: str) -> PeerConfig | None:
        return next((p for p in self.peers if p.site_id == site_id), None)

    def quota_of(self, sae_id: str) -> int | None:
        """Keys per rolling hour the SAE may take with enc_keys; None for no quota."""
        return next((c.keys_per_hour for c in self.consumers if c.sae_id == sae_id), None)


def _public_key(reader: ConfigReader) -> bytes:
    """The pinned key, inline (``public_key``) or in a file (``public_key_file``)."""
    expected = (
        f"the peer's ML-DSA-65 public key in base64 ({SIGNATURE_PUBLIC_KEY_SIZE} bytes), "
        "as `qkdd keygen` prints it"
    )
    if ("public_key" in reader.table) == ("public_key_file" in reader.table):
        raise reader.error("public_key", "exactly one of public_key or public_key_file")
    if "public_key_file" in reader.table:
        name = "public_key_file"
        path = reader.path(name)
        try:
            text = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise reader.error(
                name, f"a readable file holding {expected}", f"{path} ({exc.strerror})"
            ) from None
        except UnicodeDecodeError:
            raise reader.error(
                name, f"a text file holding {expected}", f"{path} (not UTF-8)"
            ) from None
    else:
        name = "public_key"
        text = reader.get(name, str, expected)
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):  # ValueError: a character outside ASCII
        raise reader.error(name, expected, text[:32] + "...") from None
    if len(raw) != SIGNATURE_PUBLIC_KEY_SIZE:
        raise reader.error(name, expected, f"{len(raw)} bytes")
    return raw


def _secret_source(reader: ConfigReader, name: str) -> SecretSource:
    expected = 'a file path, or "credential:NAME" for a systemd credential'
    value = reader.get(name, str, expected)
    if value.startswith("credential:"):
        credential = value.removeprefix("credential:")
        if not credential or "/" in credential:
            raise reader.error(name, expected, value)
        return SecretSource(None, credential)
    return SecretSource(reader.path(name), None)


def _tls(reader: ConfigReader, local_saes: set[str]) -> TlsConfig:
    reader.reject_unknown({"listen", "certificate", "private_key", "client_ca", "clients"})
    clients = reader.get("clients", dict, "a table of certificate name = SAE ID")
    for name, sae in clients.items():
        if sae not in local_saes:
            raise ConfigError(
                reader.file,
                f"{reader.key('clients')}.{name}",
                f"the SAE ID of a [[consumers]] entry ({', '.join(sorted(local_saes)) or 'none'})",
                sae,
            )
    return TlsConfig(
        listen=reader.address("listen"),
        certificate=reader.path("certificate"),
        private_key=reader.path("private_key"),
        client_ca=reader.path("client_ca"),
        clients=tuple(sorted(clients.items())),
    )


def _metrics(reader: ConfigReader, api_socket: Path) -> MetricsConfig:
    reader.reject_unknown({"listen", "socket", "socket_mode"})
    if ("listen" in reader.table) == ("socket" in reader.table):
        raise reader.error(
            "listen",
            'exactly one of listen (a TCP "host:port", e.g. "127.0.0.1:9447") or socket '
            "(a Unix socket path)",
        )
    if "listen" in reader.table:
        if "socket_mode" in reader.table:
            raise reader.error("socket_mode", "no socket_mode without socket (a Unix socket)")
        return MetricsConfig(listen=reader.address("listen"), socket=None)
    socket = reader.path("socket")
    if socket == api_socket:
        raise reader.error("socket", "a path other than api.socket", str(socket))
    return MetricsConfig(
        listen=None, socket=socket, socket_mode=reader.integer("socket_mode", 0, 0o777, 0o660)
    )


def _device(reader: ConfigReader) -> DeviceConfig:
    kind = reader.get("kind", str, f"one of {', '.join(DEVICE_KINDS)}")
    if kind == "serial":
        reader.reject_unknown({"kind", "path", "baudrate"})
        return SerialDeviceConfig(
            path=reader.path("path", resolve=False),
            baudrate=reader.integer("baudrate", 50, 4_000_000, 115200),
        )
    if kind == "etsi014":
        reader.reject_unknown(
            {
                "kind",
                "url",
                "certificate",
                "private_key",
                "ca",
                "own_sae_id",
                "peer_sae_id",
                "key_size",
            }
        )
        url = reader.get("url", str, "an https:// URL of the device's ETSI 014 API")
        if not url.startswith("https://"):
            raise reader.error("url", "an https:// URL of the device's ETSI 014 API", url)
        key_size = reader.integer("key_size", 8, 8192, 256)
        if key_size % 8:
            raise reader.error("key_size", "a multiple of 8 bits", key_size)
        own_expected = "the SAE ID the device knows qkdd by"
        own_sae_id = reader.get("own_sae_id", str, own_expected)
        if not own_sae_id:
            raise reader.error("own_sae_id", f"{own_expected}, not empty", own_sae_id)
        peer_expected = "the SAE ID of the peer site's qkdd"
        peer_sae_id = reader.get("peer_sae_id", str, peer_expected)
        if not peer_sae_id or peer_sae_id == own_sae_id:
            # The driver refuses them too; said here, check-config finds it as well.
            expected = f"{peer_expected}, not empty and not own_sae_id"
            raise reader.error("peer_sae_id", expected, peer_sae_id)
        return Etsi014DeviceConfig(
            url=url,
            certificate=reader.path("certificate"),
            private_key=reader.path("private_key") if "private_key" in reader.table else None,
            ca=reader.path("ca") if "ca" in reader.table else None,
            own_sae_id=own_sae_id,
            peer_sae_id=peer_sae_id,
            key_size=key_size,
        )
    raise reader.error("kind", f"one of {', '.join(DEVICE_KINDS)}", kind)


# The keys of a [[peers]] entry that a [[remote]] entry has too.
_SITE_KEYS = {
    "site_id",
    "public_key",
    "public_key_file",
    "remote_sae_ids",
    "pool_size",
    "auth_key_bits",
    "qkd_buffer_keys",
    "otp_pad_bytes",
}


def _peer(reader: ConfigReader) -> PeerConfig:
    reader.reject_unknown(_SITE_KEYS | {"address", "device"})
    return _site(
        reader, lambda: reader.address("address"), lambda: _device(reader.subtable("device"))
    )


def _remote(reader: ConfigReader) -> PeerConfig:
    """A [[remote]] entry: a site without a QKD link to this one, as a relayed peer."""
    reader.reject_unknown(_SITE_KEYS | {"via"})
    if reader.table.get("otp_pad_bytes", 0) != 0:
        # Its QKD material is relayed: every relay on the path has seen it, so a one-time
        # pad made of it would hide nothing from them. Messages to its SAEs are sealed
        # under hybrid keys instead.
        raise ConfigError(
            reader.file,
            reader.key("otp_pad_bytes"),
            "0 or absent: one-time-pad messages need a direct QKD link (the relays of a "
            "remote site see its QKD material)",
            reader.table["otp_pad_bytes"],
        )
    via = reader.identifier("via") if "via" in reader.table else None
    return _site(reader, lambda: ("", 0), lambda: RelayedDeviceConfig(via))


def _site(
    reader: ConfigReader,
    address: Callable[[], tuple[str, int]],
    device: Callable[[], DeviceConfig],
) -> PeerConfig:
    """The keys [[peers]] and [[remote]] share, read in the order of the table's docs."""
    remote = reader.get("remote_sae_ids", list, "a list of the SAE IDs at that site")
    for index, sae in enumerate(remote):
        if not isinstance(sae, str) or not ID_PATTERN.fullmatch(sae):
            raise ConfigError(
                reader.file, f"{reader.key('remote_sae_ids')}[{index}]", "an SAE ID", sae
            )
    return PeerConfig(
        site_id=reader.identifier("site_id"),
        address=address(),
        public_key=_public_key(reader),
        remote_sae_ids=tuple(remote),
        device=device(),
        pool_size=reader.integer("pool_size", 1, 1_000_000, 256),
        auth_key_bits=_auth_key_bits(reader),
        # QKD keys held here at most before the device is made to wait (back-pressure).
        qkd_buffer_keys=reader.integer("qkd_buffer_keys", 16, 10_000_000, QKD_BUFFER_MAX),
        otp_pad_bytes=reader.integer("otp_pad_bytes", 0, 1 << 30, 0),
    )


def _relay_pad_bytes(root: ConfigReader, remotes: int) -> int:
    """[relay] pad_bytes while relaying is on (with [relay], or any [[remote]]), else 0."""
    if "relay" not in root.table:
        return RELAY_PAD_BYTES_DEFAULT if remotes else 0
    reader = root.subtable("relay")
    reader.reject_unknown({"enabled", "pad_bytes"})
    enabled = reader.get("enabled", bool, "true or false", True)
    if not enabled and remotes:
        raise reader.error(
            "enabled",
            "true, or no [[remote]] entries (a site that gets relayed keys relays on its "
            f"own links too; {remotes} [[remote]] entries are configured)",
            enabled,
        )
    expected = f"a multiple of 1024 bytes from {RELAY_PAD_BYTES_MIN} to {RELAY_PAD_BYTES_MAX}"
    pad_bytes = reader.get("pad_bytes", int, expected, RELAY_PAD_BYTES_DEFAULT)
    if not RELAY_PAD_BYTES_MIN <= pad_bytes <= RELAY_PAD_BYTES_MAX or pad_bytes % 1024:
        raise reader.error("pad_bytes", expected, pad_bytes)
    return pad_bytes if enabled else 0


def _auth_key_bits(reader: ConfigReader) -> int:
    """QKD bits set aside per session for the next session's PSK (the link master's value
    is the one used; both sites should agree)."""
    bits = reader.integer("auth_key_bits", 128, 4096, 256)
    if bits % 8:
        raise reader.error("auth_key_bits", "a multiple of 8 bits from 128 to 4096", bits)
    return bits


def _consumer(reader: ConfigReader) -> ConsumerConfig:
    reader.reject_unknown({"sae_id", "uid", "keys_per_hour", "talks_to"})
    uid = reader.integer("uid", 0, 2**32 - 2, None) if "uid" in reader.table else None
    quota = (
        reader.integer("keys_per_hour", 1, 10**12, None)
        if "keys_per_hour" in reader.table
        else None
    )
    talks_to = None
    if "talks_to" in reader.table:
        talks_to = reader.get("talks_to", list, "a list of remote SAE IDs")
        for index, sae in enumerate(talks_to):
            if not isinstance(sae, str) or not ID_PATTERN.fullmatch(sae):
                raise ConfigError(
                    reader.file, f"{reader.key('talks_to')}[{index}]", "an SAE ID", sae
                )
    return ConsumerConfig(
        sae_id=reader.identifier("sae_id"),
        uid=uid,
        keys_per_hour=quota,
        talks_to=tuple(talks_to) if talks_to is not None else None,
    )


def parse_config(file: Path, data: Mapping[str, Any]) -> SiteConfig:
    """The site config in ``data``; raises ConfigError, or ConfigErrors for several."""
    from qkdd.config_checks import cross_checks  # they build on this module
    from qkdd.skip.skip_config import parse_skip

    root = ConfigReader(file, data)
    problems = ConfigProblems()
    problems.take(lambda: root.reject_unknown(_TOP_LEVEL_KEYS), None)

    def section(name: str, known: set[str], optional: bool = False) -> ConfigReader:
        if optional and name not in root.table:
            return ConfigReader(file, {}, f"{name}.")
        reader = problems.take(lambda: root.subtable(name), ConfigReader(file, {}, f"{name}."))
        problems.take(lambda: reader.reject_unknown(known), None)
        return reader

    messages = section("messages", {"max_size", "max_pending"}, optional=True)
    identity = section("identity", {"private_key"})
    store = section("store", {"key_encryption_key", "key_lifetime"})
    api = section("api", {"socket", "socket_mode", "key_size", "max_keys_per_request", "tls"})

    def backend() -> str:
        value = root.get("pqc_backend", str, f"one of {', '.join(BACKEND_CHOICES)}", "auto")
        if value not in BACKEND_CHOICES:
            raise root.error("pqc_backend", f"one of {', '.join(BACKEND_CHOICES)}", value)
        return value

    def key_size() -> int:
        value = api.integer("key_size", 8, 8192, 256)
        if value % 8:
            raise api.error("key_size", "a multiple of 8 bits", value)
        return value

    before = len(problems.errors)
    consumers = tuple(problems.items(lambda: root.table_list("consumers"), _consumer))
    direct = tuple(problems.items(lambda: root.table_list("peers"), _peer))
    remotes = tuple(problems.items(lambda: root.table_list("remote"), _remote))
    # A remote site is served as a peer: SAE routing, pools and messages take it unchanged.
    peers = direct + remotes
    site_id = problems.take(lambda: root.identifier("site_id"), "")
    sae_lists_ok = len(problems.errors) == before
    wireguard: tuple[WireGuardBinding, ...] = ()
    if sae_lists_ok:
        wireguard = tuple(
            problems.items(
                lambda: root.table_list("wireguard"), lambda r: parse_wireguard(r, consumers, peers)
            )
        )
        problems.take(
            lambda: cross_checks(file, site_id, consumers, direct, wireguard, remotes), None
        )
    ipsec: tuple[IpsecBinding, ...] = ()
    if sae_lists_ok:
        ipsec = tuple(
            problems.items(
                lambda: root.table_list("ipsec"), lambda r: parse_ipsec(r, consumers, peers)
            )
        )
        problems.take(lambda: unique_names(file, ipsec), None)
    api_socket = problems.take(lambda: api.path("socket"), Path("/"))
    config = SiteConfig(
        file=file,
        site_id=site_id,
        listen=problems.take(lambda: root.address("listen"), ("", 0)),
        state_directory=problems.take(lambda: root.path("state_directory"), Path("/")),
        key_encryption_key=problems.take(
            lambda: _secret_source(store, "key_encryption_key"), SecretSource(None, "")
        ),
        key_lifetime=problems.take(
            lambda: store.integer("key_lifetime", 1, 10 * 365 * 86400, 3600), 0
        ),
        identity_key=problems.take(
            lambda: _secret_source(identity, "private_key"), SecretSource(None, "")
        ),
        api_socket=api_socket,
        api_socket_mode=problems.take(lambda: api.integer("socket_mode", 0, 0o777, 0o600), 0),
        api_tls=problems.take(
            lambda: _tls(api.subtable("tls"), {c.sae_id for c in consumers}), None
        )
        if "tls" in api.table and sae_lists_ok
        else None,
        key_size=problems.take(key_size, 0),
        max_keys_per_request=problems.take(
            lambda: api.integer("max_keys_per_request", 1, 10_000, 128), 0
        ),
        pqc_backend=problems.take(backend, ""),
        consumers=consumers,
        peers=peers,
        message_max_size=problems.take(
            lambda: messages.integer("max_size", 0, 1024 * 1024, 1024 * 1024), 0
        ),
        message_max_pending=problems.take(
            lambda: messages.integer("max_pending", 1, 10**9, 100_000), 0
        ),
        wireguard=wireguard,
        ipsec=ipsec,
        metrics=problems.take(lambda: _metrics(root.subtable("metrics"), api_socket), None)
        if "metrics" in root.table
        else None,
        skip=problems.take(lambda: parse_skip(root.subtable("skip"), consumers, peers), None)
        if "skip" in root.table and sae_lists_ok
        else None,
        relay_pad_bytes=problems.take(lambda: _relay_pad_bytes(root, len(remotes)), 0),
    )
    problems.check()
    return config


_TOP_LEVEL_KEYS = {
    "site_id",
    "listen",
    "state_directory",
    "pqc_backend",
    "identity",
    "store",
    "api",
    "consumers",
    "peers",
    "remote",
    "relay",
    "messages",
    "wireguard",
    "metrics",
    "skip",
    "ipsec",
}


def load_config(path: str | os.PathLike[str]) -> SiteConfig:
    """Read and check the site config file; every problem raises ConfigError."""
    file = Path(path).resolve()
    return config_from_bytes(file, _read_config_file(file))


def _read_config_file(file: Path) -> bytes:
    try:
        with open(file, "rb") as handle:
            # One byte more than allowed, to tell a file at the limit from a longer one.
            raw = handle.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(file, "(file)", "an existing TOML config file") from None
    except PermissionError:
        raise ConfigError(file, "(file)", "a file readable by this user") from None
    except IsADirectoryError:
        raise ConfigError(file, "(file)", "a TOML config file, not a directory") from None
    except OSError as exc:
        raise ConfigError(
            file, "(file)", f"a readable TOML config file ({exc.strerror or exc})"
        ) from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(file, "(file)", f"a config file of at most {MAX_CONFIG_BYTES} bytes")
    return raw


def config_from_bytes(file: Path, raw: bytes) -> SiteConfig:
    """The site config held in `raw`, the content of `file` (named in every error)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError(
            file,
            "(encoding)",
            "a UTF-8 text file (TOML)",
            f"byte 0x{raw[exc.start]:02x} at offset {exc.start} (line {line})",
        ) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(file, "(syntax)", f"valid TOML ({exc})") from None
    except RecursionError:
        raise ConfigError(
            file, "(syntax)", "TOML without arrays or tables nested this deep"
        ) from None
    return parse_config(file, data)


def check_files(config: SiteConfig) -> list[ConfigError]:
    """Problems a daemon would hit at start that parsing alone cannot see (missing secret
    files, socket directories, [api.tls] files that do not load)."""
    from qkdd.config_checks import file_problems
    from qkdd.skip.skip_config import file_problems as skip_file_problems

    return file_problems(config) + skip_file_problems(config)


def config_warnings(config: SiteConfig) -> list[str]:
    """Settings that work but probably not as meant; `qkdd check-config` prints them and
    the daemon logs them at start."""
    from qkdd.config_checks import warnings_for

    return warnings_for(config)
