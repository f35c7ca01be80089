"""What every tunnel binding (``[[wireguard]]``, ``[[ipsec]]``) shares: the checks of its
names, SAE pair and timers, the parsing of its config table, the derivation of its key
from a hybrid key, and the root of the errors of tunnel keys. No Trio and no I/O here, so
the config loader can use it.

A binding names a tunnel whose key qkdd keeps fresh, the peer site at the tunnel's other
end, and the SAE pair whose hybrid keys feed it: ``local_sae`` here, ``remote_sae`` at the
peer site. ``name`` is the same at both sites: it names the binding on the peer channel and
is bound into every key derived for it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Sequence
from typing import TYPE_CHECKING, Protocol, TypeVar

from qkdd.config_reader import ID_PATTERN, ConfigReader
from qkdd.crypto import hkdf
from qkdd.errors import QkddError, RotationError
from qkdd.hybrid import lp

if TYPE_CHECKING:
    from qkdd.config import ConsumerConfig, PeerConfig

__all__ = [
    "BindingValueError",
    "KeyMaterialError",
    "RotatedBinding",
    "RotationError",
    "check_identifiers",
    "check_timers",
    "derive_binding_key",
    "parse_binding",
]


class KeyMaterialError(RotationError, ValueError):
    """Key material of the wrong size for a tunnel key."""


class BindingValueError(QkddError, ValueError):
    """A bad binding value: the table (``wireguard``, ``ipsec``), which key, and what was
    expected (the config loader reports them, naming the file)."""

    def __init__(self, section: str, key: str, expected: str) -> None:
        super().__init__(f"{section}.{key}: expected {expected}")
        self.key = key
        self.expected = expected


class RotatedBinding(Protocol):
    """The settings every binding has."""

    @property
    def name(self) -> str: ...
    @property
    def peer_site(self) -> str: ...
    @property
    def local_sae(self) -> str: ...
    @property
    def remote_sae(self) -> str: ...
    @property
    def interval(self) -> float: ...
    @property
    def max_key_age(self) -> float: ...
    @property
    def startup_timeout(self) -> float: ...


B = TypeVar("B", bound=RotatedBinding)


def _is_number(value: object) -> bool:
    # bool is an int subclass; `interval = true` is a config mistake, not 1 second.
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_identifiers(binding: RotatedBinding, section: str) -> None:
    """``name``, ``peer_site``, ``local_sae`` and ``remote_sae`` are identifiers; raise
    BindingValueError for the first that is not."""
    for key in ("name", "peer_site", "local_sae", "remote_sae"):
        value = getattr(binding, key)
        if not isinstance(value, str) or not ID_PATTERN.fullmatch(value):
            raise BindingValueError(
                section,
                key,
                "an identifier (letters, digits, '.', '_', ':', '-'; at most 64 "
                f"characters), got {value!r}",
            )


def check_timers(binding: RotatedBinding, section: str) -> None:
    """``interval``, ``max_key_age`` and ``startup_timeout`` are positive seconds, and a key
    may grow older than one interval; raise BindingValueError otherwise."""
    for key in ("interval", "max_key_age", "startup_timeout"):
        value = getattr(binding, key)
        if not _is_number(value) or not math.isfinite(value) or value <= 0:
            raise BindingValueError(section, key, "a positive number of seconds")
    if binding.max_key_age <= binding.interval:
        # Otherwise every key would be too old before its successor is even due.
        raise BindingValueError(
            section,
            "max_key_age",
            f"more than interval ({binding.interval:g} s), got {binding.max_key_age:g}",
        )


def derive_binding_key(
    label: bytes, material: bytes, binding_name: str, key_id: str, *, size: int, what: str
) -> bytes:
    """``HKDF-SHA256(salt = "", ikm = material, info = lp(label) || lp(binding_name) ||
    lp(key_id), size)``: the key of one binding for one rotation from the hybrid key
    ``key_id``. ``what`` names the key in the error for material shorter than ``size``
    (a key never holds less entropy than its own length)."""
    if len(material) < size:
        raise KeyMaterialError(
            f"key {key_id} has {len(material) * 8} bits; {what} needs a hybrid key of at "
            f"least {size * 8} bits (key_size of the binding's SAE pair)"
        )
    info = lp(label) + lp(binding_name.encode()) + lp(key_id.encode())
    return hkdf(b"", material, info, size)


def parse_binding(
    reader: ConfigReader,
    consumers: Sequence[ConsumerConfig],
    peers: Sequence[PeerConfig],
    build: Callable[..., B],
    keys: Collection[str],
    required: Sequence[str],
) -> B:
    """The binding in one table (``reader``) whose known ``keys`` are passed to ``build``;
    ``required`` are checked in their order. Its SAE pair and peer site must be configured:
    ``local_sae`` one of ``consumers``, ``remote_sae`` one of the peer's remote SAE IDs.
    Every bad value raises ConfigError naming the file, the key and what is expected."""
    reader.reject_unknown(set(keys))
    fields = {k: v for k, v in reader.table.items() if k in keys}
    missing = [key for key in required if key not in fields]
    if missing:
        raise reader.error(missing[0], "a value (this key is required)")
    try:
        binding = build(**fields)
    except BindingValueError as exc:
        raise reader.error(exc.key, exc.expected) from None
    peer = next((p for p in peers if p.site_id == binding.peer_site), None)
    if peer is None:
        raise reader.error("peer_site", "the site_id of one of [[peers]]", binding.peer_site)
    if binding.local_sae not in {c.sae_id for c in consumers}:
        raise reader.error(
            "local_sae", "an sae_id of [[consumers]] (keys are made for it)", binding.local_sae
        )
    if binding.remote_sae not in peer.remote_sae_ids:
        raise reader.error(
            "remote_sae", f"one of the remote_sae_ids of peer {peer.site_id}", binding.remote_sae
        )
    return binding
