"""What the two state machines of ``protocol`` report: one frozen dataclass per
event, for the host (the daemon's driver) and for the device (a QKD device or the emulator).
"""

from __future__ import annotations

from dataclasses import dataclass

from .serial_messages import Identity, KeyEntry, SerialMessageType, Status

__all__ = [
    "DeviceEvent",
    "ErrorReceived",
    "FrameDropped",
    "SerialHandshakeComplete",
    "HostConnected",
    "HostEvent",
    "KeysAcked",
    "KeysReceived",
    "MessageIgnored",
    "PeerIncompatible",
    "RehandshakeStarted",
    "SequenceGap",
    "StatusReceived",
]


@dataclass(frozen=True)
class SerialHandshakeComplete:
    """Host side: the device answered HELLO (and, from version 2, said which end of the
    link it is); keys may flow. ``identity`` is None if the device said nothing about it
    (version 1, or a device that was not told)."""

    version: int
    device_name: str
    window: int
    identity: Identity | None = None


@dataclass(frozen=True)
class RehandshakeStarted:
    """Host side: the device lost its session (restart); HELLO has been sent again."""

    reason: str


@dataclass(frozen=True)
class StatusReceived:
    status: Status


@dataclass(frozen=True)
class KeysReceived:
    keys: tuple[KeyEntry, ...]


@dataclass(frozen=True)
class HostConnected:
    """Device side: a host said HELLO; all unacknowledged keys will be sent again."""

    version: int
    host_name: str
    window: int


@dataclass(frozen=True)
class KeysAcked:
    """Device side: these key IDs were acknowledged and deleted."""

    key_ids: tuple[bytes, ...]
    unknown: int  # IDs acknowledged that the device did not hold (already deleted)


@dataclass(frozen=True)
class ErrorReceived:
    code: int
    detail: str


@dataclass(frozen=True)
class PeerIncompatible:
    """No common protocol version, or the peer has the wrong role. Terminal for a host."""

    reason: str


@dataclass(frozen=True)
class FrameDropped:
    """A frame was discarded: framing, CRC, version nibble or payload error."""

    reason: str


@dataclass(frozen=True)
class SequenceGap:
    """Frames were lost (or repeated) between two that arrived."""

    expected: int
    received: int


@dataclass(frozen=True)
class MessageIgnored:
    """A valid message that this state does not accept (e.g. stale KEYS before HELLO)."""

    msg_type: SerialMessageType
    state: str


HostEvent = (
    SerialHandshakeComplete
    | RehandshakeStarted
    | StatusReceived
    | KeysReceived
    | ErrorReceived
    | PeerIncompatible
    | FrameDropped
    | SequenceGap
    | MessageIgnored
)
DeviceEvent = (
    HostConnected
    | KeysAcked
    | ErrorReceived
    | PeerIncompatible
    | FrameDropped
    | SequenceGap
    | MessageIgnored
)
