"""The daemon's error tree: one root, ``QkddError``, and one class per layer under it.

Every error qkdd raises for an operator, a caller or a peer to read derives from
``QkddError``, so ``qkdd`` (``qkdd.cli``) catches that one class and prints the message on
one line instead of a traceback. The layer roots are defined here; each layer's own
errors are defined in its module, under its root::

    QkddError
    ├── ConfigError         the site config (qkdd.config_reader: ConfigErrors; the config
    │                       loader turns a BindingValueError into one, naming the file)
    ├── IdentityError       a secret file: identity key, key-encryption key (qkdd.identity)
    ├── CryptoError         the crypto layer (qkdd.crypto: AuthenticationFailed,
    │                       BackendUnavailable, SeedNotSupported; SelfTestFailed)
    ├── StoreError          the key store (qkdd.sealing: WrongKeyEncryptionKey,
    │                       RowDoesNotOpen; qkdd.durability: DurabilityLost)
    ├── SystemdError        what the service manager handed over (ListenFdsError)
    ├── DeviceSetupError    a QKD device the daemon cannot build from [peers.device]
    ├── PeerError           peers: the protocol (qkdd.peer.peer_errors: PeerProtocolError and
    │                       below), key agreement (qkdd.link_params: LinkError,
    │                       SessionDead), calls and chains (qkdd.peering: PeerUnavailable,
    │                       PskChainLost)
    ├── KeyServiceError     the key service and its listeners (qkdd.etsi014.key_pool:
    │                       KeysUnavailable, InvalidKeyRequest, UnknownKeys; qkdd.quota:
    │                       QuotaExceeded; qkdd.http_server: TlsConfigError,
    │                       SocketPathError; MetricsListenerError; SkipListenerError)
    ├── MessagingError      secure messages (BadMessage, NotDelivered, InboxError)
    ├── RotationError       a tunnel's keys (KeyMaterialError, the rotator's errors,
    │                       WireGuardError and IpsecError and theirs)
    ├── ViciError           strongSwan's VICI protocol (qkdd.ipsec.vici)
    ├── DemoError           ``qkdd demo`` (qkdd.demo)
    ├── KeyIdError          a text that is not a key ID (also a ValueError)
    └── BindingValueError   a bad [[wireguard]] / [[ipsec]] value (also a ValueError)

Extra bases stay where callers catch them: ``KeyIdError``, ``BindingValueError``,
``KeyMaterialError`` and ``ViciEncodeError`` are also ``ValueError``.

Control flow that never reaches an operator keeps ``Exception`` as its base: an HTTP
request's early answer (``qkdd.http_server.exchange.Reject``, ``MethodNotAllowed``,
``qkdd.http_server.serving._BodyTooLarge``), a SKIP request's (``qkdd.skip.provider.
_Refusal``), a peer call's refusal sent back to the caller (``qkdd.peer.calls.
CallRefused``), a session that ended (``qkdd.peer_sessions.PeerClosed``,
``qkdd.peering.HandshakeEvicted``) and a key not found in a store lookup
(``qkdd.store.application_keys._KeyMissing``).

Two trees stay apart, because their packages must not import this one:

- ``qkdd.client`` is the standard-library-only light client for applications: its root
  is ``qkdd.client.client_errors.ClientError`` (and ``HttpProtocolError`` for its HTTP parser).
- ``drivers/`` (``qkdd_drivers``) imports nothing of qkdd but the client: its root is
  ``qkdd_drivers.device_errors.DeviceError``. The daemon meets device errors at one boundary.
  Every driver's ``run`` retries its own faults (a KME or serial port that fails is
  reconnected, never fatal), so a device error ends the daemon only where it builds a
  driver from ``[peers.device]``: ``qkdd.peering.PeerLink`` turns the driver's
  ``DeviceError`` (or the ``ValueError`` of a constructor argument) into a
  ``DeviceSetupError`` naming the config file and the peer's device table. So ``qkdd``
  catches ``QkddError`` alone, plus ``OSError`` for what the operating system refuses
  (a port in use, a directory it may not write).
"""

from __future__ import annotations

import os


class QkddError(Exception):
    """Base class of every error the daemon raises for someone to read."""


class ConfigError(QkddError):
    """A config file is missing, unreadable or holds a bad value."""

    def __init__(self, file: str | os.PathLike[str], key: str, expected: str, got: object = None):
        self.file = str(file)
        self.key = key
        self.expected = expected
        detail = f"{self.file}: {key}: expected {expected}"
        if got is not None:
            detail += f", got {got!r}"
        super().__init__(detail)


class IdentityError(QkddError):
    """A secret key file is missing, unreadable, too open, or malformed."""


class CryptoError(QkddError):
    """Base class of every error raised by the crypto layer."""


class StoreError(QkddError):
    """The key store cannot be opened or used (the message names the file)."""


class SystemdError(QkddError):
    """The environment systemd handed to the daemon is malformed or unusable."""


class DeviceSetupError(QkddError):
    """A peer's QKD device cannot be built from its ``[peers.device]`` table: the driver
    refused the settings (the message names the config file, the table and the driver's
    reason)."""

    def __init__(self, file: str | os.PathLike[str], key: str, reason: str) -> None:
        self.file = str(file)
        self.key = key
        super().__init__(f"{self.file}: {key}: {reason}")


class PeerError(QkddError):
    """Base of the errors of peer sites: the peer protocol, key agreement on a link, peer
    calls and the PSK chain."""


class KeyServiceError(QkddError):
    """Base of the key-service layer's errors."""


class MessagingError(QkddError):
    """Base of the messaging layer's errors."""


class RotationError(QkddError):
    """Base class of every error of a tunnel binding's keys (WireGuard's and IPsec's errors
    derive from it)."""


class ViciError(QkddError):
    """Base class of the VICI errors."""
