"""The two ends of the serial protocol as plain state machines, without I/O or clocks.

``HostProtocol`` is what the daemon's driver runs; ``DeviceProtocol`` is what a QKD device
(or the emulator) runs. Both take received bytes and return events; whatever they want to
send accumulates until ``data_to_send()``. Time is an argument (``now``), never read.

Theory of operation:
- Each received frame is classified into an *input* (``"hello-reply"``, ``"keys"``...);
  the machine's transition table maps (state, input) to an action and the next state.
  Inputs missing from a table cannot occur; the tables are complete on purpose.
- The host sends HELLO; the device answers with its own HELLO naming the version chosen
  (the highest both support), or ERROR UNSUPPORTED_VERSION. A device that boots or loses
  its session may announce itself with a HELLO whose selected version is 0; the host then
  says HELLO again. Every HELLO is preceded by an extra 0x00 so that the receiver drops any
  half frame left over from before.
- From version 2 the device follows its HELLO answer with IDENTITY (which end of which
  link it is); the host then waits for it before it accepts any key, so a host attached
  to the wrong end never stores a key from it (the driver checks the identity).
- The device keeps every key until the host ACKs its ID. At most ``window`` keys are in
  flight; one unacknowledged for ``retransmit_timeout`` is sent again, and on a new HELLO
  all in-flight keys are sent again. The host therefore sees duplicates and must drop them
  (the driver does; see ``dedup.py``) and still ACK them.
"""

from __future__ import annotations

import collections
import enum
from collections.abc import Callable, Iterable, Sequence

from ..device_errors import FrameError, MessageError
from .framing import FrameDecoder, SerialFrame, encode_frame
from .protocol_events import (
    DeviceEvent,
    ErrorReceived,
    FrameDropped,
    HostConnected,
    HostEvent,
    KeysAcked,
    KeysReceived,
    MessageIgnored,
    PeerIncompatible,
    RehandshakeStarted,
    SequenceGap,
    SerialHandshakeComplete,
    StatusReceived,
)
from .serial_constants import (
    DEFAULT_RETRANSMIT_TIMEOUT,
    DEFAULT_WINDOW,
    HELLO_FRAME_VERSION,
    IDENTITY_VERSION,
    KEY_ENTRY_HEADER_SIZE,
    KEY_ID_SIZE,
    MAX_ACK_IDS_PER_FRAME,
    MAX_FRAME_SIZE,
    MAX_KEY_MATERIAL_SIZE,
    MAX_KEYS_PER_FRAME,
    MIN_FRAME_SIZE,
    PROTOCOL_VERSION_MAX,
    PROTOCOL_VERSION_MIN,
    SEQ_MODULUS,
)
from .serial_messages import (
    Ack,
    Identity,
    KeyEntry,
    Keys,
    LinkState,
    Message,
    SerialErrorCode,
    SerialErrorMessage,
    SerialHello,
    SerialMessageType,
    SerialRole,
    Status,
    decode_message,
    encode_message,
)

__all__ = [
    "DeviceProtocol",
    "DeviceState",
    "ErrorReceived",
    "FrameDropped",
    "SerialHandshakeComplete",
    "HostConnected",
    "HostProtocol",
    "HostState",
    "KeysAcked",
    "KeysReceived",
    "MessageIgnored",
    "PeerIncompatible",
    "RehandshakeStarted",
    "SequenceGap",
    "StatusReceived",
]


def _choose_version(lo: int, hi: int, our_lo: int, our_hi: int) -> int:
    """Highest version in both ranges, or 0."""
    best = min(hi, our_hi)
    return best if best >= max(lo, our_lo) else 0


class _Endpoint:
    """What both ends share: frame decoding, sequence numbers and the outgoing buffer."""

    def __init__(self, max_frame: int, min_version: int, max_version: int) -> None:
        self._decoder = FrameDecoder()
        self._outbox = bytearray()
        self._tx_seq = 0
        self._rx_seq: int | None = None  # next expected, once in session
        self._version = 0  # negotiated version; 0 before HELLO completes
        self._our_max_frame = max_frame
        self._peer_max_frame = MAX_FRAME_SIZE
        self._min_version = min_version
        self._max_version = max_version
        self.frames_seen = 0  # every frame delimited, good or bad
        self.frames_ok = 0  # frames that decoded to a valid message

    @property
    def version(self) -> int:
        return self._version

    @property
    def in_frame(self) -> bool:
        """True while a frame has started arriving but is not complete."""
        return self._decoder.in_frame

    def data_to_send(self) -> bytes:
        data = bytes(self._outbox)
        self._outbox.clear()
        return data

    def _send(self, msg: Message) -> None:
        msg_type, payload = encode_message(msg)
        if msg_type == SerialMessageType.HELLO:
            # Sequence numbers restart with each HELLO; the extra 0x00 ends any half
            # frame the peer may still hold from before.
            self._tx_seq = 0
            self._outbox += b"\x00"
            version = HELLO_FRAME_VERSION
        else:
            version = self._version or HELLO_FRAME_VERSION
        self._outbox += encode_frame(version, msg_type, self._tx_seq, payload)
        self._tx_seq = (self._tx_seq + 1) % SEQ_MODULUS

    def _frames(self, data: bytes) -> Iterable[tuple[SerialFrame, Message] | FrameDropped]:
        for item in self._decoder.feed(data):
            self.frames_seen += 1
            if isinstance(item, FrameError):
                yield FrameDropped(str(item))
                continue
            if item.msg_type == SerialMessageType.HELLO:
                expected_ok = item.version == HELLO_FRAME_VERSION
                expected = str(HELLO_FRAME_VERSION)
            elif self._version and item.msg_type != SerialMessageType.ERROR:
                expected_ok = item.version == self._version
                expected = str(self._version)
            else:
                # Outside a session: a frame of an earlier session, in any version we
                # speak (the state machine tells the sender it is not in session); and an
                # ERROR from a peer that lost the session cannot know the version.
                expected_ok = self._min_version <= item.version <= self._max_version
                expected = f"{self._min_version}..{self._max_version}"
            if not expected_ok:
                yield FrameDropped(f"frame version {item.version}, expected {expected}")
                continue
            try:
                msg = decode_message(item.msg_type, item.payload)
            except MessageError as exc:
                yield FrameDropped(f"malformed {_type_name(item.msg_type)}: {exc}")
                continue
            self.frames_ok += 1
            yield item, msg

    def _check_seq(self, frame: SerialFrame) -> SequenceGap | None:
        if frame.msg_type == SerialMessageType.HELLO:
            self._rx_seq = (frame.seq + 1) % SEQ_MODULUS
            return None
        expected = self._rx_seq
        self._rx_seq = (frame.seq + 1) % SEQ_MODULUS
        if expected is not None and frame.seq != expected:
            return SequenceGap(expected, frame.seq)
        return None


def _type_name(msg_type: int) -> str:
    try:
        return SerialMessageType(msg_type).name
    except ValueError:
        return f"type 0x{msg_type:x}"


# -- host side -----------------------------------------------------------------------------


class HostState(enum.Enum):
    IDLE = "idle"  # start() not yet called
    AWAIT_HELLO = "await-hello"  # HELLO sent, no answer yet
    AWAIT_IDENTITY = "await-identity"  # version 2 on: answered, IDENTITY not yet here
    READY = "ready"  # in session: keys flow
    FAILED = "failed"  # the device is incompatible; a new HostProtocol is needed


_HostAction = Callable[["HostProtocol", SerialFrame, Message], list[HostEvent]]

# Inputs: hello-reply (device HELLO choosing a version 1 we support), hello-reply-v2 (one
# choosing version 2 or later: IDENTITY follows), hello-announce (device HELLO with version
# 0), hello-bad (no common version / wrong role), status, keys, ack, identity,
# error-version (ERROR UNSUPPORTED_VERSION), error-lost (ERROR UNEXPECTED_MESSAGE: the
# device is not in session with us), error (any other ERROR).
_H = HostState
HOST_TRANSITIONS: dict[tuple[HostState, str], tuple[str, HostState]] = {
    (_H.IDLE, "hello-reply"): ("ignore", _H.IDLE),
    (_H.IDLE, "hello-reply-v2"): ("ignore", _H.IDLE),
    (_H.IDLE, "hello-announce"): ("ignore", _H.IDLE),
    (_H.IDLE, "hello-bad"): ("ignore", _H.IDLE),
    (_H.IDLE, "status"): ("ignore", _H.IDLE),
    (_H.IDLE, "keys"): ("ignore", _H.IDLE),
    (_H.IDLE, "ack"): ("ignore", _H.IDLE),
    (_H.IDLE, "identity"): ("ignore", _H.IDLE),
    (_H.IDLE, "error-version"): ("ignore", _H.IDLE),
    (_H.IDLE, "error-lost"): ("ignore", _H.IDLE),
    (_H.IDLE, "error"): ("ignore", _H.IDLE),
    (_H.AWAIT_HELLO, "hello-reply"): ("open_session", _H.READY),
    (_H.AWAIT_HELLO, "hello-reply-v2"): ("await_identity", _H.AWAIT_IDENTITY),
    (_H.AWAIT_HELLO, "hello-announce"): ("say_hello", _H.AWAIT_HELLO),
    (_H.AWAIT_HELLO, "hello-bad"): ("fail_version", _H.FAILED),
    # Stale frames of an earlier session, still in the port's buffer.
    (_H.AWAIT_HELLO, "status"): ("ignore", _H.AWAIT_HELLO),
    (_H.AWAIT_HELLO, "keys"): ("ignore", _H.AWAIT_HELLO),
    (_H.AWAIT_HELLO, "ack"): ("ignore", _H.AWAIT_HELLO),
    (_H.AWAIT_HELLO, "identity"): ("ignore", _H.AWAIT_HELLO),
    (_H.AWAIT_HELLO, "error-version"): ("fail_error", _H.FAILED),
    (_H.AWAIT_HELLO, "error-lost"): ("ignore", _H.AWAIT_HELLO),
    (_H.AWAIT_HELLO, "error"): ("report_error", _H.AWAIT_HELLO),
    # No key is taken before the device has said which end of the link it is.
    (_H.AWAIT_IDENTITY, "hello-reply"): ("open_session", _H.READY),
    (_H.AWAIT_IDENTITY, "hello-reply-v2"): ("await_identity", _H.AWAIT_IDENTITY),
    (_H.AWAIT_IDENTITY, "hello-announce"): ("say_hello", _H.AWAIT_HELLO),
    (_H.AWAIT_IDENTITY, "hello-bad"): ("fail_version", _H.FAILED),
    (_H.AWAIT_IDENTITY, "status"): ("ignore", _H.AWAIT_IDENTITY),
    (_H.AWAIT_IDENTITY, "keys"): ("ignore", _H.AWAIT_IDENTITY),
    (_H.AWAIT_IDENTITY, "ack"): ("ignore", _H.AWAIT_IDENTITY),
    (_H.AWAIT_IDENTITY, "identity"): ("open_identified", _H.READY),
    (_H.AWAIT_IDENTITY, "error-version"): ("fail_error", _H.FAILED),
    (_H.AWAIT_IDENTITY, "error-lost"): ("ignore", _H.AWAIT_IDENTITY),
    (_H.AWAIT_IDENTITY, "error"): ("report_error", _H.AWAIT_IDENTITY),
    (_H.READY, "hello-reply"): ("open_session", _H.READY),
    (_H.READY, "hello-reply-v2"): ("await_identity", _H.AWAIT_IDENTITY),
    (_H.READY, "hello-announce"): ("rehandshake", _H.AWAIT_HELLO),
    (_H.READY, "hello-bad"): ("fail_version", _H.FAILED),
    (_H.READY, "status"): ("report_status", _H.READY),
    (_H.READY, "keys"): ("deliver_keys", _H.READY),
    (_H.READY, "ack"): ("reject_unexpected", _H.READY),
    (_H.READY, "identity"): ("ignore", _H.READY),
    (_H.READY, "error-version"): ("fail_error", _H.FAILED),
    (_H.READY, "error-lost"): ("rehandshake", _H.AWAIT_HELLO),
    (_H.READY, "error"): ("report_error", _H.READY),
    (_H.FAILED, "hello-reply"): ("ignore", _H.FAILED),
    (_H.FAILED, "hello-reply-v2"): ("ignore", _H.FAILED),
    (_H.FAILED, "hello-announce"): ("ignore", _H.FAILED),
    (_H.FAILED, "hello-bad"): ("ignore", _H.FAILED),
    (_H.FAILED, "status"): ("ignore", _H.FAILED),
    (_H.FAILED, "keys"): ("ignore", _H.FAILED),
    (_H.FAILED, "ack"): ("ignore", _H.FAILED),
    (_H.FAILED, "identity"): ("ignore", _H.FAILED),
    (_H.FAILED, "error-version"): ("ignore", _H.FAILED),
    (_H.FAILED, "error-lost"): ("ignore", _H.FAILED),
    (_H.FAILED, "error"): ("ignore", _H.FAILED),
}


class HostProtocol(_Endpoint):
    """Host (daemon) end: says HELLO, receives STATUS and KEYS, sends ACK."""

    def __init__(
        self,
        *,
        name: str = "qkdd",
        window: int = 0,
        min_version: int = PROTOCOL_VERSION_MIN,
        max_version: int = PROTOCOL_VERSION_MAX,
        max_frame: int = MAX_FRAME_SIZE,
    ) -> None:
        super().__init__(max_frame, min_version, max_version)
        self.state = HostState.IDLE
        self._name = name
        self._window = window
        self.device_name = ""
        self._window_announced = 0
        self.identity: Identity | None = None  # what the device says it is (version 2 on)
        self.failure: str | None = None

    def start(self) -> None:
        """Queue HELLO; call once after opening the port."""
        if self.state is not HostState.IDLE:
            raise RuntimeError("start() was already called")
        self._say_hello()
        self.state = HostState.AWAIT_HELLO

    def acknowledge(self, key_ids: Sequence[bytes]) -> None:
        """Queue ACK frames for keys that the sink has stored.

        Outside a session the ACK is dropped: the device has forgotten what it sent and
        will resend those keys, which the driver recognises as already stored."""
        if self.state is not HostState.READY:
            return
        per_frame = min(
            MAX_ACK_IDS_PER_FRAME, (self._peer_max_frame - MIN_FRAME_SIZE - 1) // KEY_ID_SIZE
        )
        for i in range(0, len(key_ids), per_frame):
            self._send(Ack(tuple(key_ids[i : i + per_frame])))

    def receive_data(self, data: bytes) -> list[HostEvent]:
        events: list[HostEvent] = []
        for item in self._frames(data):
            if isinstance(item, FrameDropped):
                events.append(item)
                continue
            frame, msg = item
            action, next_state = HOST_TRANSITIONS[(self.state, self._classify(msg))]
            if self.state is HostState.READY and action != "ignore":
                gap = self._check_seq(frame)
                if gap:
                    events.append(gap)
            events += getattr(self, "_act_" + action)(frame, msg)
            self.state = next_state
        return events

    def _classify(self, msg: Message) -> str:
        if isinstance(msg, SerialHello):
            if msg.role is not SerialRole.DEVICE:
                return "hello-bad"
            if msg.selected_version == 0:
                if not _choose_version(
                    msg.min_version, msg.max_version, self._min_version, self._max_version
                ):
                    return "hello-bad"
                return "hello-announce"
            if not self._min_version <= msg.selected_version <= self._max_version:
                return "hello-bad"
            return "hello-reply-v2" if msg.selected_version >= IDENTITY_VERSION else "hello-reply"
        if isinstance(msg, SerialErrorMessage):
            if msg.code == SerialErrorCode.UNSUPPORTED_VERSION:
                return "error-version"
            if msg.code == SerialErrorCode.UNEXPECTED_MESSAGE:
                return "error-lost"
            return "error"
        return {Status: "status", Keys: "keys", Ack: "ack", Identity: "identity"}[type(msg)]

    def _say_hello(self) -> None:
        self._rx_seq = None
        self._version = 0
        self._send(
            SerialHello(
                SerialRole.HOST,
                self._min_version,
                self._max_version,
                0,
                self._window,
                self._our_max_frame,
                self._name,
            )
        )

    # -- actions (named in HOST_TRANSITIONS) --

    def _act_ignore(self, frame: SerialFrame, msg: Message) -> list[HostEvent]:
        return [MessageIgnored(SerialMessageType(frame.msg_type), self.state.value)]

    def _act_open_session(self, frame: SerialFrame, msg: Message) -> list[HostEvent]:
        assert isinstance(msg, SerialHello)
        self._check_seq(frame)
        self._version = msg.selected_version
        self._peer_max_frame = msg.max_frame
        self.device_name = msg.name
        self._window_announced = msg.window
        return [SerialHandshakeComplete(msg.selected_version, msg.name, msg.window)]

    def _act_await_identity(self, frame: SerialFrame, msg: Message) -> list[HostEvent]:
        self._act_open_session(frame, msg)
        return []

    def _act_open_identified(self, frame: SerialFrame, msg: Message) -> list[HostEvent]:
        assert isinstance(msg, Identity)
        self._check_seq(frame)
        self.identity = msg if msg.known else None
        return [
            SerialHandshakeComplete(
                self._version, self.device_name, self._window_announced, self.identity
            )
        ]

    def _act_say_hello(self, frame: SerialFrame, msg: Message) -> list[HostEvent]:
        self._say_hello()
        return []

    def _act_rehandshake(self, frame: SerialFrame, msg: Message) -> list[HostEvent]:
        if isinstance(msg, SerialHello):
            reason = "the device announced itself again (restarted?)"
        else:
            reason = "the device reported it is not in session with us"
        self._say_hello()
        return [RehandshakeStarted(reason)]

    def _act_fail_version(self, frame: SerialFrame, msg: Message) -> list[HostEvent]:
        assert isinstance(msg, SerialHello)
        if msg.role is not SerialRole.DEVICE:
            reason = "the peer says it is a host, not a QKD device (two daemons wired together?)"
        else:
            reason = (
                f"the device speaks protocol versions {msg.min_version}..{msg.max_version}, "
                f"this driver {self._min_version}..{self._max_version}"
            )
            self._send(SerialErrorMessage(SerialErrorCode.UNSUPPORTED_VERSION, reason))
        self.failure = reason
        return [PeerIncompatible(reason)]

    def _act_fail_error(self, frame: SerialFrame, msg: Message) -> list[HostEvent]:
        assert isinstance(msg, SerialErrorMessage)
        self.failure = f"the device rejected our protocol versions: {msg.detail}"
        return [PeerIncompatible(self.failure)]

    def _act_report_error(self, frame: SerialFrame, msg: Message) -> list[HostEvent]:
        assert isinstance(msg, SerialErrorMessage)
        return [ErrorReceived(msg.code, msg.detail)]

    def _act_report_status(self, frame: SerialFrame, msg: Message) -> list[HostEvent]:
        assert isinstance(msg, Status)
        return [StatusReceived(msg)]

    def _act_deliver_keys(self, frame: SerialFrame, msg: Message) -> list[HostEvent]:
        assert isinstance(msg, Keys)
        return [KeysReceived(msg.keys)]

    def _act_reject_unexpected(self, frame: SerialFrame, msg: Message) -> list[HostEvent]:
        self._send(
            SerialErrorMessage(SerialErrorCode.UNEXPECTED_MESSAGE, "a host does not accept ACK")
        )
        return [MessageIgnored(SerialMessageType(frame.msg_type), self.state.value)]


# -- device side ---------------------------------------------------------------------------


class DeviceState(enum.Enum):
    AWAIT_HELLO = "await-hello"  # no host session: nothing is sent but HELLO/ERROR
    READY = "ready"  # in session: keys flow within the window


_D = DeviceState
# Inputs: hello (host HELLO we share a version with), hello-bad, ack, keys, status,
# identity (only devices send it), error (any ERROR).
DEVICE_TRANSITIONS: dict[tuple[DeviceState, str], tuple[str, DeviceState]] = {
    (_D.AWAIT_HELLO, "hello"): ("open_session", _D.READY),
    (_D.AWAIT_HELLO, "hello-bad"): ("reject_version", _D.AWAIT_HELLO),
    (_D.AWAIT_HELLO, "ack"): ("reject_unexpected", _D.AWAIT_HELLO),
    (_D.AWAIT_HELLO, "keys"): ("reject_unexpected", _D.AWAIT_HELLO),
    (_D.AWAIT_HELLO, "status"): ("reject_unexpected", _D.AWAIT_HELLO),
    (_D.AWAIT_HELLO, "identity"): ("reject_unexpected", _D.AWAIT_HELLO),
    (_D.AWAIT_HELLO, "error"): ("report_error", _D.AWAIT_HELLO),
    (_D.READY, "hello"): ("open_session", _D.READY),
    (_D.READY, "hello-bad"): ("reject_version", _D.AWAIT_HELLO),
    (_D.READY, "ack"): ("release_keys", _D.READY),
    (_D.READY, "keys"): ("reject_unexpected", _D.READY),
    (_D.READY, "status"): ("reject_unexpected", _D.READY),
    (_D.READY, "identity"): ("reject_unexpected", _D.READY),
    (_D.READY, "error"): ("report_error", _D.READY),
}


class DeviceProtocol(_Endpoint):
    """Device end: holds a bounded buffer of keys and sends them to the host within a
    window, deleting each only when the host ACKs it."""

    def __init__(
        self,
        *,
        name: str = "qkd-device",
        window: int = DEFAULT_WINDOW,
        capacity: int = 4096,
        retransmit_timeout: float = DEFAULT_RETRANSMIT_TIMEOUT,
        min_version: int = PROTOCOL_VERSION_MIN,
        max_version: int = PROTOCOL_VERSION_MAX,
        max_frame: int = MAX_FRAME_SIZE,
        identity: Identity | None = None,
    ) -> None:
        if not 1 <= window <= 0xFFFF or capacity < 1:
            raise ValueError("window must be 1..65535 and capacity at least 1")
        super().__init__(max_frame, min_version, max_version)
        self.state = DeviceState.AWAIT_HELLO
        self._name = name
        self._own_window = window
        self._window = window
        self.capacity = capacity
        self.retransmit_timeout = retransmit_timeout
        self.host_name = ""
        # Which end of which link this device is (sent from version 2 on; None: unknown).
        self.identity = identity
        self._keys: dict[bytes, bytes] = {}  # every key held, oldest first
        self._pending: collections.deque[bytes] = collections.deque()  # to send (again)
        self._in_flight: dict[bytes, float] = {}  # key ID -> last sent; oldest first

    # -- key buffer --

    @property
    def held(self) -> int:
        """Keys held: waiting, in flight, or sent and not yet acknowledged."""
        return len(self._keys)

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def holds(self, key_id: bytes) -> bool:
        """True while the key is buffered, i.e. not yet acknowledged."""
        return key_id in self._keys

    @property
    def room(self) -> int:
        return self.capacity - len(self._keys)

    def add_keys(self, keys: Iterable[tuple[bytes, bytes]]) -> None:
        """Append keys (16-byte ID, material) to the buffer; raises if it would overflow."""
        keys = list(keys)
        if len(keys) > self.room:
            raise ValueError(f"{len(keys)} keys do not fit; room for {self.room}")
        for key_id, material in keys:
            if len(key_id) != KEY_ID_SIZE or not 1 <= len(material) <= MAX_KEY_MATERIAL_SIZE:
                raise ValueError("key ID must be 16 bytes and material 1..1024 bytes")
            if key_id in self._keys:
                raise ValueError("key ID is already held")
            self._keys[key_id] = material
            self._pending.append(key_id)

    # -- sending --

    def announce(self) -> None:
        """Queue an unsolicited HELLO (version 0): sent after boot so a host re-handshakes."""
        self._send(self._hello(0))

    def send_status(
        self,
        link_state: LinkState,
        qber: float | None = None,
        secret_key_rate: int | None = None,
    ) -> None:
        if self.state is DeviceState.READY:
            self._send(Status(link_state, qber, secret_key_rate, len(self._keys)))

    def send_error(self, code: SerialErrorCode, detail: str) -> None:
        self._send(SerialErrorMessage(code, detail))

    def poll(self, now: float) -> None:
        """Queue KEYS frames: overdue retransmissions first, then new keys up to the window."""
        if self.state is not DeviceState.READY:
            return
        batch: list[bytes] = []
        for key_id, sent_at in self._in_flight.items():
            if sent_at + self.retransmit_timeout > now:
                break  # ordered by send time: the rest are younger
            batch.append(key_id)
        for key_id in batch:
            del self._in_flight[key_id]  # re-inserted below, at the young end
        resent = set(batch)
        room = self._window - len(self._in_flight) - len(batch)
        while room > 0 and self._pending:
            key_id = self._pending.popleft()
            # Lazy deletion: acknowledged IDs stay in the deque until they come up.
            if key_id in self._keys and key_id not in self._in_flight and key_id not in resent:
                batch.append(key_id)
                room -= 1
        if batch:
            self._send_keys(batch, now)

    def next_deadline(self) -> float | None:
        """When ``poll`` will next have a retransmission to send (None: nothing in flight)."""
        if self.state is not DeviceState.READY or not self._in_flight:
            return None
        oldest = next(iter(self._in_flight.values()))
        return oldest + self.retransmit_timeout

    def _send_keys(self, key_ids: list[bytes], now: float) -> None:
        budget = self._peer_max_frame - MIN_FRAME_SIZE - 1
        entries: list[KeyEntry] = []
        size = 0
        for key_id in key_ids:
            material = self._keys[key_id]
            entry_size = KEY_ENTRY_HEADER_SIZE + len(material)
            if entries and (size + entry_size > budget or len(entries) == MAX_KEYS_PER_FRAME):
                self._send(Keys(tuple(entries)))
                entries, size = [], 0
            entries.append(KeyEntry(key_id, material))
            size += entry_size
            self._in_flight[key_id] = now
        if entries:
            self._send(Keys(tuple(entries)))

    def _hello(self, selected: int) -> SerialHello:
        return SerialHello(
            SerialRole.DEVICE,
            self._min_version,
            self._max_version,
            selected,
            self._window,
            self._our_max_frame,
            self._name,
        )

    # -- receiving --

    def receive_data(self, data: bytes) -> list[DeviceEvent]:
        events: list[DeviceEvent] = []
        for item in self._frames(data):
            if isinstance(item, FrameDropped):
                events.append(item)
                continue
            frame, msg = item
            action, next_state = DEVICE_TRANSITIONS[(self.state, self._classify(msg))]
            if self.state is DeviceState.READY:
                gap = self._check_seq(frame)
                if gap:
                    events.append(gap)
            events += getattr(self, "_act_" + action)(frame, msg)
            self.state = next_state
        return events

    def _classify(self, msg: Message) -> str:
        if isinstance(msg, SerialHello):
            if msg.role is not SerialRole.HOST or not _choose_version(
                msg.min_version, msg.max_version, self._min_version, self._max_version
            ):
                return "hello-bad"
            return "hello"
        if isinstance(msg, SerialErrorMessage):
            return "error"
        return {Status: "status", Keys: "keys", Ack: "ack", Identity: "identity"}[type(msg)]

    # -- actions (named in DEVICE_TRANSITIONS) --

    def _act_open_session(self, frame: SerialFrame, msg: Message) -> list[DeviceEvent]:
        assert isinstance(msg, SerialHello)
        version = _choose_version(
            msg.min_version, msg.max_version, self._min_version, self._max_version
        )
        self._window = min(self._own_window, msg.window) if msg.window else self._own_window
        self._peer_max_frame = msg.max_frame
        self.host_name = msg.name
        # The host may not have received what is in flight: send all of it again, first,
        # in the order the keys were made (retransmissions reorder the in-flight list).
        if self._in_flight:
            in_flight = self._in_flight
            self._pending.extendleft(reversed([k for k in self._keys if k in in_flight]))
            self._in_flight = {}
        self._send(self._hello(version))
        self._version = version
        if version >= IDENTITY_VERSION:
            self._send(self.identity or Identity("", ""))
        self._check_seq(frame)
        return [HostConnected(version, msg.name, self._window)]

    def _act_reject_version(self, frame: SerialFrame, msg: Message) -> list[DeviceEvent]:
        assert isinstance(msg, SerialHello)
        if msg.role is not SerialRole.HOST:
            reason = "the peer says it is a device, not a host"
        else:
            reason = (
                f"device speaks versions {self._min_version}..{self._max_version}, "
                f"host offered {msg.min_version}..{msg.max_version}"
            )
        self._version = 0
        self.send_error(SerialErrorCode.UNSUPPORTED_VERSION, reason)
        return [PeerIncompatible(reason)]

    def _act_reject_unexpected(self, frame: SerialFrame, msg: Message) -> list[DeviceEvent]:
        name = _type_name(frame.msg_type)
        self.send_error(
            SerialErrorCode.UNEXPECTED_MESSAGE, f"{name} not accepted in {self.state.value}"
        )
        return [MessageIgnored(SerialMessageType(frame.msg_type), self.state.value)]

    def _act_report_error(self, frame: SerialFrame, msg: Message) -> list[DeviceEvent]:
        assert isinstance(msg, SerialErrorMessage)
        return [ErrorReceived(msg.code, msg.detail)]

    def _act_release_keys(self, frame: SerialFrame, msg: Message) -> list[DeviceEvent]:
        assert isinstance(msg, Ack)
        released = []
        unknown = 0
        for key_id in msg.key_ids:
            if self._keys.pop(key_id, None) is None:
                unknown += 1
            else:
                released.append(key_id)
            self._in_flight.pop(key_id, None)
        return [KeysAcked(tuple(released), unknown)]
