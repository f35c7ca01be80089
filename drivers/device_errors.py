"""The device layer's exception hierarchy: one base class, ``DeviceError``, and the faults
under it that an operator or the reconnect loop needs to tell apart.

Messages are written for operators: they say what is wrong and what to do about it.
"""

from __future__ import annotations


class DeviceError(Exception):
    """Base class of every error raised by the QKD device layer."""


# -- bytes on the wire -------------------------------------------------------------------


class ProtocolError(DeviceError):
    """Bytes received from the peer do not follow the serial protocol."""


class FrameError(ProtocolError):
    """A frame failed COBS decoding, its size limits or its CRC-32C; it is dropped.

    ``FrameDecoder.feed`` returns instances of this class (it does not raise them) so that
    one bad frame never stops the frames behind it.
    """

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


class MessageError(ProtocolError):
    """A frame passed its CRC but its payload is not a valid message."""


# -- opening the port --------------------------------------------------------------------


class DeviceUnavailableError(DeviceError):
    """The configured device path cannot be opened right now."""


class DeviceNotFoundError(DeviceUnavailableError):
    """Nothing exists at the device path (unplugged, or the emulator is not running)."""


class NotATtyError(DeviceUnavailableError):
    """The device path exists but is not a serial device (a regular file, a directory...)."""


class DevicePermissionError(DeviceUnavailableError):
    """The daemon's user may not open the device path."""


class DeviceBusyError(DeviceUnavailableError):
    """Another process holds the exclusive lock on the serial port."""


# -- faults of an open link --------------------------------------------------------------


class DeviceLinkError(DeviceError):
    """An open link failed; the driver closes the port and reconnects."""


class DeviceHangupError(DeviceLinkError):
    """The port reported end of file or EIO: the device went away or the pty was closed."""


class DeviceTimeoutError(DeviceLinkError):
    """The device did not answer HELLO, went silent, or stalled in the middle of a frame."""


class IncompatibleDeviceError(DeviceLinkError):
    """The device speaks no protocol version this driver supports."""


class WrongDeviceError(DeviceLinkError):
    """The device says it is the end of another link, or another site's end of ours (a
    device path left pointing at the wrong device): no key is taken from it."""


class KeySinkError(DeviceLinkError):
    """The key sink failed to store keys; they were not acknowledged and will be resent."""
