"""Host and device state machines talking to each other in memory: handshake and version
negotiation both ways, windowed key delivery, retransmission, restarts on either side,
loss and corruption — asserting what both ends end up with."""

from __future__ import annotations

import itertools
import os
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from qkdd_drivers.serial.framing import FrameDecoder, SerialFrame, cobs_decode, encode_frame
from qkdd_drivers.serial.protocol import (
    DEVICE_TRANSITIONS,
    HOST_TRANSITIONS,
    DeviceProtocol,
    DeviceState,
    ErrorReceived,
    FrameDropped,
    HostConnected,
    HostProtocol,
    HostState,
    KeysAcked,
    KeysReceived,
    MessageIgnored,
    PeerIncompatible,
    RehandshakeStarted,
    SequenceGap,
    SerialHandshakeComplete,
    StatusReceived,
)
from qkdd_drivers.serial.serial_constants import PROTOCOL_VERSION_MAX
from qkdd_drivers.serial.serial_messages import (
    Ack,
    KeyEntry,
    Keys,
    LinkState,
    SerialErrorCode,
    SerialMessageType,
    decode_message,
    encode_message,
)


def make_keys(n: int, size: int = 32) -> list[tuple[bytes, bytes]]:
    return [(os.urandom(16), os.urandom(size)) for _ in range(n)]


def received(events: list) -> list[KeyEntry]:  # type: ignore[type-arg]
    return [e for ev in events if isinstance(ev, KeysReceived) for e in ev.keys]


def connect(host: HostProtocol, dev: DeviceProtocol) -> list:  # type: ignore[type-arg]
    host.start()
    dev_events = dev.receive_data(host.data_to_send())
    assert any(isinstance(e, HostConnected) for e in dev_events)
    return host.receive_data(dev.data_to_send())


def frames_of(data: bytes) -> list[SerialFrame]:
    return [f for f in FrameDecoder().feed(data) if isinstance(f, SerialFrame)]


# -- tables ------------------------------------------------------------------------------


def test_transition_tables_are_complete() -> None:
    host_inputs = {i for _, i in HOST_TRANSITIONS}
    assert set(HOST_TRANSITIONS) == set(itertools.product(HostState, host_inputs))
    device_inputs = {i for _, i in DEVICE_TRANSITIONS}
    assert set(DEVICE_TRANSITIONS) == set(itertools.product(DeviceState, device_inputs))
    for action, _ in HOST_TRANSITIONS.values():
        assert callable(getattr(HostProtocol, "_act_" + action))
    for action, _ in DEVICE_TRANSITIONS.values():
        assert callable(getattr(DeviceProtocol, "_act_" + action))


# -- handshake and versions --------------------------------------------------------------


def test_handshake_both_ends_agree() -> None:
    host = HostProtocol(name="site-a")
    dev = DeviceProtocol(name="dev-1", window=16)
    events = connect(host, dev)
    assert events == [SerialHandshakeComplete(PROTOCOL_VERSION_MAX, "dev-1", 16)]
    assert host.state is HostState.READY and dev.state is DeviceState.READY
    assert dev.host_name == "site-a" and host.device_name == "dev-1"


def test_every_hello_starts_with_a_resync_delimiter_and_seq_zero() -> None:
    host = HostProtocol()
    host.start()
    wire = host.data_to_send()
    assert wire[0] == 0
    (frame,) = frames_of(wire)
    assert frame.seq == 0 and frame.version == 1 and frame.msg_type == SerialMessageType.HELLO


def test_versions_negotiate_to_highest_common() -> None:
    host = HostProtocol(min_version=1, max_version=3)
    dev = DeviceProtocol(min_version=2, max_version=5)
    assert connect(host, dev)[0] == SerialHandshakeComplete(3, "qkd-device", dev._window)
    dev.add_keys(make_keys(1))
    dev.poll(0.0)
    wire = dev.data_to_send()
    assert [f.version for f in frames_of(wire)] == [3]
    assert len(received(host.receive_data(wire))) == 1


def test_device_refuses_host_without_common_version() -> None:
    host = HostProtocol(min_version=1, max_version=1)
    dev = DeviceProtocol(min_version=2, max_version=2)
    host.start()
    dev_events = dev.receive_data(host.data_to_send())
    assert isinstance(dev_events[0], PeerIncompatible)
    assert dev.state is DeviceState.AWAIT_HELLO
    host_events = host.receive_data(dev.data_to_send())
    assert isinstance(host_events[0], PeerIncompatible)
    assert host.state is HostState.FAILED
    assert "rejected our protocol versions" in (host.failure or "")


def test_host_refuses_device_choosing_a_version_outside_its_range() -> None:
    host = HostProtocol(min_version=1, max_version=1)
    rogue = DeviceProtocol(min_version=2, max_version=2)
    rogue._version = 2
    reply = encode_message(rogue._hello(2))
    host.start()
    host.data_to_send()
    events = host.receive_data(encode_frame(1, reply[0], 0, reply[1]))
    assert isinstance(events[0], PeerIncompatible) and host.state is HostState.FAILED
    # and tells the device why
    (frame,) = frames_of(host.data_to_send())
    assert decode_message(frame.msg_type, frame.payload).code == SerialErrorCode.UNSUPPORTED_VERSION


def test_two_hosts_wired_together_fail_clearly() -> None:
    a, b = HostProtocol(), HostProtocol()
    a.start()
    b.start()
    events = a.receive_data(b.data_to_send())
    assert isinstance(events[0], PeerIncompatible)
    assert "not a QKD device" in events[0].reason


# -- key flow --------------------------------------------------------------------------


def test_window_limits_keys_in_flight_until_acked() -> None:
    host, dev = HostProtocol(), DeviceProtocol(window=4)
    connect(host, dev)
    keys = make_keys(10)
    dev.add_keys(keys)
    dev.poll(0.0)
    first = received(host.receive_data(dev.data_to_send()))
    assert [e.key_id for e in first] == [k for k, _ in keys[:4]]
    dev.poll(0.1)
    assert received(host.receive_data(dev.data_to_send())) == []
    host.acknowledge([e.key_id for e in first[:2]])
    (acked,) = dev.receive_data(host.data_to_send())
    assert acked == KeysAcked(tuple(e.key_id for e in first[:2]), 0)
    dev.poll(0.2)
    nxt = received(host.receive_data(dev.data_to_send()))
    assert [e.key_id for e in nxt] == [k for k, _ in keys[4:6]]
    assert dev.held == 8 and dev.in_flight == 4


def test_materials_arrive_intact() -> None:
    host, dev = HostProtocol(), DeviceProtocol(window=1000)
    connect(host, dev)
    keys = make_keys(300, size=100)
    dev.add_keys(keys)
    dev.poll(0.0)
    got = received(host.receive_data(dev.data_to_send()))
    assert [(e.key_id, e.material) for e in got] == keys


def test_host_window_preference_caps_device_window() -> None:
    host, dev = HostProtocol(window=3), DeviceProtocol(window=50)
    assert connect(host, dev)[0].window == 3
    dev.add_keys(make_keys(10))
    dev.poll(0.0)
    assert len(received(host.receive_data(dev.data_to_send()))) == 3


def test_unacked_keys_are_retransmitted_after_timeout() -> None:
    host, dev = HostProtocol(), DeviceProtocol(window=8, retransmit_timeout=1.0)
    connect(host, dev)
    dev.add_keys(make_keys(3))
    dev.poll(10.0)
    first = received(host.receive_data(dev.data_to_send()))
    assert dev.next_deadline() == 11.0
    dev.poll(10.9)
    assert dev.data_to_send() == b""
    dev.poll(11.0)
    again = received(host.receive_data(dev.data_to_send()))
    assert again == first
    host.acknowledge([e.key_id for e in again])
    dev.receive_data(host.data_to_send())
    assert dev.held == 0 and dev.next_deadline() is None


def test_keys_frames_respect_the_hosts_max_frame() -> None:
    host, dev = HostProtocol(max_frame=1280), DeviceProtocol(window=500)
    connect(host, dev)
    dev.add_keys(make_keys(200, size=64))
    dev.poll(0.0)
    wire = dev.data_to_send()
    sizes = [len(cobs_decode(chunk)) for chunk in wire.split(b"\x00") if chunk]
    assert max(sizes) <= 1280
    assert len(received(host.receive_data(wire))) == 200


def test_ack_is_split_into_frames_of_at_most_255_ids() -> None:
    host, dev = HostProtocol(), DeviceProtocol(window=600, capacity=600)
    connect(host, dev)
    dev.add_keys(make_keys(600, size=4))
    dev.poll(0.0)
    ids = [e.key_id for e in received(host.receive_data(dev.data_to_send()))]
    host.acknowledge(ids)
    wire = host.data_to_send()
    counts = [len(decode_message(f.msg_type, f.payload).key_ids) for f in frames_of(wire)]
    assert counts == [255, 255, 90]
    events = dev.receive_data(wire)
    assert sum(len(e.key_ids) for e in events if isinstance(e, KeysAcked)) == 600
    assert dev.held == 0


def test_device_buffer_is_bounded() -> None:
    dev = DeviceProtocol(capacity=5)
    dev.add_keys(make_keys(5))
    assert dev.room == 0
    with pytest.raises(ValueError, match="do not fit"):
        dev.add_keys(make_keys(1))


def test_status_reports_keys_buffered() -> None:
    host, dev = HostProtocol(), DeviceProtocol()
    connect(host, dev)
    dev.add_keys(make_keys(7))
    dev.send_status(LinkState.UP, 0.031, 5000)
    (ev,) = host.receive_data(dev.data_to_send())
    assert isinstance(ev, StatusReceived)
    assert ev.status.keys_buffered == 7 and ev.status.qber == pytest.approx(0.031)
    assert ev.status.secret_key_rate == 5000


# -- sessions lost and restarted -------------------------------------------------------


def test_host_reconnect_makes_device_resend_in_flight_first() -> None:
    dev = DeviceProtocol(window=4)
    connect(HostProtocol(), dev)
    keys = make_keys(6)
    dev.add_keys(keys)
    dev.poll(0.0)
    dev.data_to_send()  # lost: the host went away
    host2 = HostProtocol()
    connect(host2, dev)
    dev.poll(0.1)
    got = received(host2.receive_data(dev.data_to_send()))
    assert [e.key_id for e in got] == [k for k, _ in keys[:4]]


def test_device_restart_announcement_triggers_new_handshake() -> None:
    host, dev = HostProtocol(), DeviceProtocol()
    connect(host, dev)
    rebooted = DeviceProtocol()
    rebooted.add_keys(make_keys(2))
    rebooted.announce()
    events = host.receive_data(rebooted.data_to_send())
    assert isinstance(events[0], RehandshakeStarted) and host.state is HostState.AWAIT_HELLO
    rebooted.receive_data(host.data_to_send())
    rebooted.poll(0.0)
    events = host.receive_data(rebooted.data_to_send())
    assert isinstance(events[0], SerialHandshakeComplete)
    assert len(received(events)) == 2


def test_stale_keys_before_hello_answer_are_ignored() -> None:
    dev = DeviceProtocol()
    connect(HostProtocol(), dev)
    dev.add_keys(make_keys(3))
    dev.poll(0.0)
    stale = dev.data_to_send()
    host = HostProtocol()
    host.start()
    events = host.receive_data(stale)
    assert received(events) == [] and isinstance(events[0], MessageIgnored)
    host.acknowledge([b"\x00" * 16])  # outside a session: dropped, not sent
    assert host.data_to_send().count(b"\x00") == 2  # only the HELLO (0x00 + frame + 0x00)


def test_device_that_lost_the_session_makes_host_say_hello_again() -> None:
    host, dev = HostProtocol(), DeviceProtocol()
    connect(host, dev)
    forgetful = DeviceProtocol()  # restarted without announcing itself
    host.acknowledge([os.urandom(16)])
    events = forgetful.receive_data(host.data_to_send())
    assert isinstance(events[0], MessageIgnored)
    events = host.receive_data(forgetful.data_to_send())
    assert any(isinstance(e, RehandshakeStarted) for e in events)
    assert host.state is HostState.AWAIT_HELLO
    forgetful.receive_data(host.data_to_send())
    assert forgetful.state is DeviceState.READY


def test_other_device_errors_are_reported_not_fatal() -> None:
    host, dev = HostProtocol(), DeviceProtocol()
    connect(host, dev)
    dev.send_error(SerialErrorCode.DEVICE_FAULT, "detector too warm")
    assert host.receive_data(dev.data_to_send()) == [
        ErrorReceived(SerialErrorCode.DEVICE_FAULT, "detector too warm")
    ]
    assert host.state is HostState.READY


# -- damage on the line ----------------------------------------------------------------


def test_lost_frame_is_reported_as_sequence_gap_and_corruption_as_dropped() -> None:
    host, dev = HostProtocol(), DeviceProtocol(window=100)
    connect(host, dev)
    frames = []
    for _ in range(3):
        dev.add_keys(make_keys(1))
        dev.poll(0.0)
        frames.append(dev.data_to_send())
    assert len(received(host.receive_data(frames[0]))) == 1
    damaged = bytearray(frames[1])
    damaged[8] = damaged[8] ^ 0x01 or 0x02
    events = host.receive_data(bytes(damaged) + frames[2])
    assert isinstance(events[0], FrameDropped)
    # The device's frames so far: HELLO 0, IDENTITY 1 (version 2 on), then keys.
    assert SequenceGap(expected=3, received=4) in events
    assert len(received(events)) == 1


def test_frame_with_wrong_version_nibble_is_dropped() -> None:
    host, dev = HostProtocol(), DeviceProtocol()
    connect(host, dev)
    msg_type, payload = encode_message(Keys((KeyEntry(os.urandom(16), b"x"),)))
    wrong = host.version + 1
    events = host.receive_data(encode_frame(wrong, msg_type, 2, payload))
    assert events == [FrameDropped(f"frame version {wrong}, expected {host.version}")]


def test_host_rejects_ack_from_device_side() -> None:
    host, dev = HostProtocol(), DeviceProtocol()
    connect(host, dev)
    msg_type, payload = encode_message(Ack((os.urandom(16),)))
    events = host.receive_data(encode_frame(host.version, msg_type, 2, payload))
    assert isinstance(events[0], MessageIgnored)
    (frame,) = frames_of(host.data_to_send())
    assert decode_message(frame.msg_type, frame.payload).code == SerialErrorCode.UNEXPECTED_MESSAGE


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.floats(0.0, 0.4), st.integers(1, 40))
def test_lossy_line_still_delivers_every_key_exactly_as_sent(
    seed: int, loss: float, window: int
) -> None:
    """Frames in both directions are dropped or corrupted at random; with retransmission
    every key still arrives, intact, and the device ends up holding nothing."""
    rng = random.Random(seed)
    host, dev = HostProtocol(), DeviceProtocol(window=window, retransmit_timeout=1.0)
    connect(host, dev)
    keys = make_keys(60, size=rng.randint(1, 64))
    dev.add_keys(keys)
    stored: dict[bytes, bytes] = {}

    def damage(data: bytes) -> bytes:
        out = bytearray()
        for chunk in data.split(b"\x00"):
            if chunk and rng.random() < loss:
                if rng.random() < 0.5:
                    continue  # lost
                chunk = bytearray(chunk)
                chunk[rng.randrange(len(chunk))] = rng.randrange(1, 256)  # corrupted
            out += bytes(chunk) + b"\x00"
        return bytes(out)

    now = 0.0
    for _ in range(3000):
        now += 0.5
        dev.poll(now)
        events = host.receive_data(damage(dev.data_to_send()))
        got = received(events)
        for entry in got:
            assert stored.setdefault(entry.key_id, entry.material) == entry.material
        host.acknowledge([e.key_id for e in got])
        dev.receive_data(damage(host.data_to_send()))
        if dev.held == 0:
            break
    assert stored == dict(keys)
    assert dev.held == 0


@settings(max_examples=300)
@given(st.lists(st.binary(max_size=300), max_size=6))
def test_arbitrary_bytes_never_crash_either_machine(chunks: list[bytes]) -> None:
    host, dev = HostProtocol(), DeviceProtocol()
    host.start()
    for chunk in chunks:
        host.receive_data(chunk)
        dev.receive_data(chunk)


@settings(max_examples=300)
@given(st.lists(st.tuples(st.integers(1, 15), st.binary(max_size=200)), max_size=6))
def test_valid_frames_with_arbitrary_payloads_never_crash(items: list[tuple[int, bytes]]) -> None:
    host, dev = HostProtocol(), DeviceProtocol()
    connect(host, dev)
    for seq, (msg_type, payload) in enumerate(items, start=1):
        wire = encode_frame(host.version, msg_type, seq, payload)
        host.receive_data(wire)
        dev.receive_data(wire)
        host.data_to_send()
        dev.data_to_send()


def test_resend_after_hello_is_in_generation_order_despite_retransmissions() -> None:
    dev = DeviceProtocol(window=4, retransmit_timeout=1.0)
    connect(HostProtocol(), dev)
    keys = make_keys(6)
    dev.add_keys(keys[:2])
    dev.poll(0.0)
    dev.add_keys(keys[2:])
    dev.poll(0.5)  # keys 0-1 sent at 0.0, keys 2-3 at 0.5
    dev.poll(1.0)  # only 0-1 are overdue: the in-flight list becomes 2,3,0,1
    dev.data_to_send()
    host = HostProtocol()
    connect(host, dev)
    dev.poll(2.0)
    got = received(host.receive_data(dev.data_to_send()))
    assert [e.key_id for e in got] == [k for k, _ in keys[:4]]
