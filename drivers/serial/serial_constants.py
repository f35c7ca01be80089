"""Every size limit and timer of the serial protocol in one place, each with its reason.

PROTOCOL.md is the normative text; these names are the ones it uses. What every driver
shares (reconnect backoff, the memory of recent key IDs) is in ``base`` and ``dedup``.
"""

from __future__ import annotations

# -- versions ------------------------------------------------------------------------------

#: Protocol versions this implementation speaks (inclusive range), offered in HELLO.
#: Version 2 adds IDENTITY: which end of which link the device is (PROTOCOL.md §4.6).
PROTOCOL_VERSION_MIN = 1
PROTOCOL_VERSION_MAX = 2
#: The first version in which a device says which end of the link it is.
IDENTITY_VERSION = 2
#: HELLO always travels in a version-1 frame, whatever the peers support, so that any two
#: versions can still negotiate.
HELLO_FRAME_VERSION = 1

# -- frame layout (sizes of the decoded frame, before COBS) -------------------------------

#: Byte 0: protocol version in the high nibble, message type in the low nibble.
VERSION_TYPE_SIZE = 1
#: Bytes 1-4: sender's frame sequence number, big-endian, restarting at 0 with each HELLO.
SEQ_SIZE = 4
FRAME_HEADER_SIZE = VERSION_TYPE_SIZE + SEQ_SIZE
#: Last 4 bytes: CRC-32C (Castagnoli) over header + payload, big-endian.
CRC_SIZE = 4
#: An empty payload is legal, so this is the smallest frame.
MIN_FRAME_SIZE = FRAME_HEADER_SIZE + CRC_SIZE
#: Largest decoded frame. 4 KiB keeps a frame under 0.4 s at 115200 baud and lets a small
#: microcontroller buffer a whole frame.
MAX_FRAME_SIZE = 4096
MAX_PAYLOAD_SIZE = MAX_FRAME_SIZE - MIN_FRAME_SIZE
#: COBS adds one byte per started 254-byte block; the 0x00 delimiter is not counted.
MAX_ENCODED_FRAME_SIZE = MAX_FRAME_SIZE + MAX_FRAME_SIZE // 254 + 1
#: Frame delimiter; COBS guarantees it never occurs inside an encoded frame.
FRAME_DELIMITER = 0x00
SEQ_MODULUS = 1 << 32

# -- message sizes -------------------------------------------------------------------------

#: HELLO: role, min/max/selected version, window (u16), max_frame (u16), name length.
HELLO_FIXED_SIZE = 9
#: Peer names are for logs only; short so they fit any log line.
MAX_PEER_NAME_SIZE = 32
#: The smallest max_frame a peer may announce: one KEYS frame with one key of
#: MAX_KEY_MATERIAL_SIZE bytes must fit (9 + 1 + 16 + 2 + 1024 = 1052), rounded up.
MIN_PEER_MAX_FRAME = 1280

#: STATUS: link state u8, QBER u16, secret key rate u32, keys buffered u32.
STATUS_SIZE = 11
#: QBER is carried in units of 1/10000 (0.01 %); 10000 means 100 %.
QBER_SCALE = 10_000
UNKNOWN_U16 = 0xFFFF
UNKNOWN_U32 = 0xFFFF_FFFF

#: UUID key ID as 16 raw bytes (RFC 9562 byte order).
KEY_ID_SIZE = 16
#: KEYS entry header: key ID + material length (u16).
KEY_ENTRY_HEADER_SIZE = KEY_ID_SIZE + 2
#: 8192-bit keys cover every QKD product we know of; larger blocks are split by the device.
MAX_KEY_MATERIAL_SIZE = 1024
#: Count fields (KEYS, ACK) are one byte.
MAX_KEYS_PER_FRAME = 255
MAX_ACK_IDS_PER_FRAME = 255

#: IDENTITY: two site IDs (this end's site, the other end's), each a length byte and up to
#: this many bytes of UTF-8: the length of a qkdd site ID.
MAX_SITE_ID_SIZE = 64

#: ERROR: code u16, detail length u8, detail UTF-8.
ERROR_FIXED_SIZE = 3
MAX_ERROR_DETAIL_SIZE = 200

# -- flow control and timers (seconds) ----------------------------------------------------

#: Keys a device keeps in flight (sent, not yet acknowledged) unless HELLO says otherwise.
DEFAULT_WINDOW = 128
#: A device resends an in-flight key after this long without its ACK (frame lost to noise).
DEFAULT_RETRANSMIT_TIMEOUT = 2.0
#: A device sends STATUS at least this often once in session; it doubles as a heartbeat.
DEFAULT_STATUS_INTERVAL = 1.0
#: The host gives the device this long to answer HELLO.
DEFAULT_HELLO_TIMEOUT = 2.0
#: The host declares the device silent after this long without a valid frame
#: (several STATUS intervals, so one lost heartbeat is not a fault).
DEFAULT_IDLE_TIMEOUT = 5.0
#: Once a frame has started, its delimiter must arrive within this long. A full frame
#: takes under 0.4 s at 115200 baud.
DEFAULT_STALL_TIMEOUT = 2.0
