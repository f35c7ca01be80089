"""The interface between the daemon and any QKD device: the key record (``QkdKey``), the
sink the daemon hands keys to (``KeySink``), the status snapshot operators see
(``DeviceStatus``) and the abstract device (``QkdDevice``).

Delivery contract of every ``QkdDevice``:
- A key is acknowledged to the device only after ``sink.store_qkd_keys`` has returned, so a
  crash between the two loses nothing: the device still holds the key and resends it.
- Because of that, a key may arrive twice (after a reconnect or a device restart). Drivers
  drop IDs they stored recently (a bounded memory, see ``dedup.RecentKeyIds``); the sink
  must still ignore an ID it already holds, since the driver's memory is bounded and does
  not survive a daemon restart.
"""

from __future__ import annotations

import abc
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import trio

from .errors import DeviceError

__all__ = [
    "CountingKeySink",
    "DeviceError",
    "DeviceStatus",
    "FetchByIdDevice",
    "KeySink",
    "QkdDevice",
    "QkdKey",
]

_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


@dataclass(frozen=True)
class QkdKey:
    """One QKD key as delivered by a device."""

    key_id: str  # canonical lowercase UUID string (ETSI-style key ID)
    material: bytes = field(repr=False)  # the QKD key bits

    def __post_init__(self) -> None:
        # A non-canonical ID would make the same key look like two different keys.
        if not _CANONICAL_UUID.fullmatch(self.key_id):
            raise ValueError(f"key ID {self.key_id!r} is not a canonical lowercase UUID")
        if not self.material:
            raise ValueError("QKD key material must not be empty")

    @classmethod
    def from_wire(cls, key_id: bytes, material: bytes) -> QkdKey:
        """Build a key from the 16-byte wire form of its ID."""
        if len(key_id) != 16:
            raise ValueError("a wire key ID is 16 bytes")
        h = key_id.hex()
        return cls(f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}", material)

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
