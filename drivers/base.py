"""The interface between the daemon and any QKD device: the key record (``QkdKey``), the
sink the daemon hands keys to (``KeySink``), the status snapshot operators see
(``DeviceStatus``) and the abstract device (``QkdDevice``).

Delivery contract of every ``QkdDevice``:
- A key is acknowledged to the device only after ``sink.store_qkd_keys`` has returned, so a
  crash between the two loses nothing: the device still holds the key and resends it.
- Because of that, a key may arrive twice (after a reconnect or a device restart). Drivers
  drop IDs they stored recently (a bounded memory, see ``dedup.RecentKeyIds``); the sink
  must still ignore an ID it already holds, since the driver's memory is bounded and does
  not survive a daemon restart. ``KeyDelivery`` is that step, written once for every driver.
"""

from __future__ import annotations

import abc
import dataclasses
import re
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol, runtime_checkable

import trio

from .dedup import DEFAULT_RECENT_IDS, RecentKeyIds
from .device_errors import DeviceError

__all__ = [
    "CANONICAL_KEY_ID",
    "DEFAULT_RECONNECT_INITIAL_DELAY",
    "DEFAULT_RECONNECT_MAX_DELAY",
    "CountingKeySink",
    "DeviceError",
    "DeviceStatus",
    "FetchByIdDevice",
    "KeyDelivery",
    "KeySink",
    "NewKeys",
    "QkdDevice",
    "QkdKey",
]

#: Reconnect backoff of every driver: first delay, doubled after each failure up to the
#: configured cap.
DEFAULT_RECONNECT_INITIAL_DELAY = 0.25
DEFAULT_RECONNECT_MAX_DELAY = 5.0

#: A key ID as the daemon passes it around: a canonical lowercase UUID.
CANONICAL_KEY_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


@dataclass(frozen=True)
class QkdKey:
    """One QKD key as delivered by a device."""

    key_id: str  # canonical lowercase UUID string (ETSI-style key ID)
    material: bytes = field(repr=False)  # the QKD key bits

    def __post_init__(self) -> None:
        # A non-canonical ID would make the same key look like two different keys.
        if not CANONICAL_KEY_ID.fullmatch(self.key_id):
            raise ValueError(f"key ID {self.key_id!r} is not a canonical lowercase UUID")
        if not self.material:
            raise ValueError("QKD key material must not be empty")

    @classmethod
    def from_wire(cls, key_id: bytes, material: bytes) -> QkdKey:
        """Build a key from the 16-byte wire form of its ID."""
        if len(key_id) != 16:
            raise ValueError("a wire key ID is 16 bytes")
        if not material:
            raise ValueError("QKD key material must not be empty")
        # Built without ``__post_init__``: the ID is canonical by construction, and checking
        # it again costs a regular-expression match per key at device line rates.
        key = object.__new__(cls)
        h = key_id.hex()
        object.__setattr__(key, "key_id", f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}")
        object.__setattr__(key, "material", material)
        return key

    @property
    def key_id_bytes(self) -> bytes:
        return uuid.UUID(self.key_id).bytes


class KeySink(Protocol):
    async def store_qkd_keys(self, keys: Sequence[QkdKey]) -> None:
        """Store keys durably; once this returns the device is told to delete them.

        Must ignore a key ID it already holds (a device may resend keys)."""
        ...


@runtime_checkable
class CountingKeySink(KeySink, Protocol):
    """A sink that can say how many QKD keys it holds, unused. Optional: devices that take
    keys on demand (an ETSI GS QKD 014 KME) use it to take only as many as the daemon needs;
    with a plain ``KeySink`` they rely on ``store_qkd_keys`` blocking while the sink is full."""

    def qkd_keys_buffered(self) -> int: ...


@dataclass
class DeviceStatus:
    """A snapshot for operators; drivers replace the whole object on every change."""

    state: str  # "connecting" | "up" | "down"
    detail: str  # plain words for operators
    keys_received: int = 0
    qber: float | None = None
    secret_key_rate: float | None = None  # bit/s reported by the device
    keys_buffered: int | None = None
    key_size_bits: int | None = None  # bits per key the device hands out, if it says


class QkdDevice(abc.ABC):
    status: DeviceStatus

    def __init__(self) -> None:
        self.status = DeviceStatus(state="connecting", detail="not started")

    @abc.abstractmethod
    async def run(
        self, sink: KeySink, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Runs until cancelled: connects (reconnecting with backoff on any fault), receives
        keys, awaits sink.store_qkd_keys(keys), and only then acknowledges them to the device.
        task_status.started() once the first connection attempt has been made."""

    def _update(self, **changes: object) -> None:
        # A fresh object each time: whoever holds the previous snapshot keeps a consistent one.
        self.status = dataclasses.replace(self.status, **changes)  # type: ignore[arg-type]


class NewKeys(NamedTuple):
    """Keys a device handed over, sorted against what the driver stored recently."""

    keys: list[QkdKey]  # not stored recently, each once, in the order received
    duplicates: int  # resent with the same material (or twice in one delivery)
    conflicts: int  # resent with other material: the first copy is kept


class KeyDelivery:
    """The delivery step of every driver: drop the keys it stored recently, store the rest
    in the sink, then remember their IDs and count them in the device's status."""

    def __init__(self, device: QkdDevice, recent_ids: int = DEFAULT_RECENT_IDS) -> None:
        self._device = device
        self._recent = RecentKeyIds(recent_ids)

    def __contains__(self, key_id: object) -> bool:
        """Whether a key with this ID was stored recently."""
        return key_id in self._recent

    def sort(self, keys: Iterable[QkdKey]) -> NewKeys:
        """The keys not stored recently, and how many of the others were resent as they were
        or with other material."""
        listed = list(keys)
        recent = self._recent
        ids = [key.key_id for key in listed]
        if recent.holds_none_of(ids) and len(set(ids)) == len(ids):
            return NewKeys(listed, 0, 0)  # nothing resent: no check per key
        fresh: list[QkdKey] = []
        fresh_ids: set[str] = set()
        duplicates = conflicts = 0
        for key in listed:
            key_id = key.key_id
            if key_id not in recent:
                if key_id in fresh_ids:
                    duplicates += 1
                else:
                    fresh.append(key)
                    fresh_ids.add(key_id)
            elif recent.check(key_id, key.material) == "conflict":
                conflicts += 1
            else:
                duplicates += 1
        return NewKeys(fresh, duplicates, conflicts)

    async def store(
        self,
        sink: KeySink,
        keys: Sequence[QkdKey],
        failed: Callable[[Exception], DeviceError],
    ) -> None:
        """Store ``keys`` in the sink, then remember and count them. When the sink fails,
        raises ``failed(the sink's exception)`` and remembers none of them."""
        try:
            await sink.store_qkd_keys(keys)
        except Exception as exc:
            raise failed(exc) from exc
        self._recent.add_many((key.key_id, key.material) for key in keys)
        self._device._update(keys_received=self._device.status.keys_received + len(keys))


class FetchByIdDevice(QkdDevice):
    """A device from which the link slave collects keys by ID instead of receiving a stream.

    Some QKD systems hand a key to each site only when asked, e.g. a key management entity
    (KME) serving ETSI GS QKD 014: the link master's device supplies keys with IDs through
    ``run`` like any other device, and the link slave must then ask its own device for
    exactly the IDs the master named in a KEY_BATCH. At the link slave, ``run`` only keeps
    ``status`` current and the daemon calls ``fetch_keys`` with the IDs it is waiting for.

    The daemon tells such a device from a streaming one with
    ``isinstance(device, FetchByIdDevice)``; devices that stream (``SerialDevice``) are not
    affected. The delivery contract of ``QkdDevice`` still holds for what ``fetch_keys``
    stores: the sink may see an ID it already holds and must ignore it.
    """

    @abc.abstractmethod
    async def fetch_keys(self, key_ids: Sequence[str]) -> None:
        """Collect the keys with these IDs (canonical lowercase UUIDs) from the device and
        store them in the sink given to the running ``run``, returning once they are stored.

        Raises a ``DeviceError``: for IDs the device does not hold (yet), one that names them,
        after the keys it did find have been stored, so a later call need only ask again for
        the missing IDs. Raises ``ValueError`` for an ID that is not a canonical UUID."""
