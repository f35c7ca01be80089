"""qkdd's QKD device layer: the interface the daemon uses (``QkdDevice``, ``KeySink``,
``QkdKey``, ``DeviceStatus``, and ``KeyDelivery``, the delivery step every driver takes), in
``serial/`` the serial protocol (PROTOCOL.md) as sans-IO codecs and state machines with the
pyserial/Trio driver ``SerialDevice``, in ``kme/`` the driver for a KME serving ETSI GS QKD
014 (``Etsi014Device``), and, in ``emulator/``, the ``qkd-emulator`` BB84 link emulator.

The drivers import nothing of qkdd but its light client, ``qkdd.client``, whose HTTP client
core (``qkdd.client.roundtrip``) the KME driver shares.
"""

from .base import DeviceStatus, KeySink, QkdDevice, QkdKey
from .device_errors import DeviceError
from .serial.driver import SerialDevice

__all__ = ["DeviceError", "DeviceStatus", "KeySink", "QkdDevice", "QkdKey", "SerialDevice"]
