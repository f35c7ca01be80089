"""The serial QKD device: the protocol of drivers/PROTOCOL.md and its host-side driver.

Sans-IO, bottom up: ``serial_constants`` (every size limit and timer), ``crc32c``,
``framing`` (COBS frames with a CRC), ``serial_messages`` (the payload codecs), ``protocol``
(the host and device state machines) reporting ``protocol_events``. ``driver`` is the one
module with I/O: ``SerialDevice``, the protocol over a tty with pyserial and Trio.
"""

from .driver import SerialDevice, open_serial_port

__all__ = ["SerialDevice", "open_serial_port"]
