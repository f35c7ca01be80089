"""qkdd's QKD device layer: the interface the daemon uses (``QkdDevice``, ``KeySink``,
``QkdKey``, ``DeviceStatus``), the serial protocol (PROTOCOL.md) as sans-IO codecs and state
machines, the pyserial/Trio driver ``SerialDevice``, and the ``qkd-emulator`` link emulator.
"""

from .base import DeviceStatus, KeySink, QkdDevice, QkdKey
from .errors import DeviceError
from .serial_driver import SerialDevice

__all__ = ["DeviceError", "DeviceStatus", "KeySink", "QkdDevice", "QkdKey", "SerialDevice"]
