"""``qkd-emulator half``: the fibre-link wire format and state machine without sockets, then
two real half processes on 127.0.0.1, each with its own pty read by a ``SerialDevice``:
identical keys with identical IDs, lockstep across cut connections and a restarted Bob,
and refusal of halves configured differently."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import struct
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from qkdd_drivers.base import QkdKey
from qkdd_drivers.emulator.command import build_parser
from qkdd_drivers.emulator.fibre_protocol import (
    FIBRE_PROTOCOL_VERSION,
    HEADER_SIZE,
    MAX_BODY_SIZE,
    Commit,
    Committed,
    FibreError,
    FibreErrorCode,
    FibreErrorMessage,
    FibreFrameType,
    FibreHello,
    FibreProtocol,
    FibreState,
    FrameFormatError,
    FrameReader,
    HalfRole,
    Next,
    ParameterMismatchError,
    PeerRefusedError,
    Ping,
    Record,
    Reply,
    Request,
    UnexpectedFrameError,
    canonical_params,
    decode_body,
    encode_frame,
    key_ids_digest,
)
from qkdd_drivers.emulator.half import link_params_from_args, parse_address
from qkdd_drivers.emulator.physics import DecoyStats, PartyRecord
from qkdd_drivers.serial.driver import SerialDevice
from timeouts import timeout

EMULATOR = [sys.executable, "-m", "qkdd_drivers.emulator.command"]
PARAMS = canonical_params({"--mu": 0.5, "--length-km": 10.0})
#: Small blocks: ~50 keys of 256 bits each (smaller blocks leave no key once the
#: finite-key bounds are paid), about a tenth of a second apiece.
SMALL = ["--block-detections", "200000", "--status-interval", "0.2"]


# -- sans-IO: frames and messages --------------------------------------------------------


def sample_messages() -> list[object]:
    rng = random.Random(7)
    bits = bytes(rng.getrandbits(1) for _ in range(1001))
    bases = bytes(rng.getrandbits(1) for _ in range(1001))
    decoy = DecoyStats((10**9, 10**8, 5), (1001, 7, 0), (3, 0), (1, 0))
    return [
        FibreHello(HalfRole.BOB, bytes(range(16)), 0, PARAMS),
        FibreHello(HalfRole.ALICE, b"\xff" * 16, 2**63, PARAMS),
        Next(),
        Record(1, 123_456_789, None, PartyRecord(bits, bases)),
        Record(2, 5, decoy, PartyRecord(b"", b"")),
        Request(3, b"\x01payload"),
        Reply(3, b""),
        Commit(4, 31, bytes(range(32))),
        Committed(4),
        Ping(),
        FibreErrorMessage(FibreErrorCode.CONFIGURATION, "différent"),
    ]


def test_every_message_round_trips_byte_by_byte() -> None:
    messages = sample_messages()
    stream = b"".join(encode_frame(m) for m in messages)  # type: ignore[arg-type]
    reader = FrameReader()
    frames = []
    for i in range(len(stream)):
        frames += reader.feed(stream[i : i + 1])
    assert reader.buffered == 0
    decoded = [decode_body(kind, body) for kind, body in frames]
    assert decoded == messages
    assert decoded[3].bob.bits == messages[3].bob.bits  # type: ignore[attr-defined]


def test_size_cap_is_enforced_from_the_header_alone() -> None:
    reader = FrameReader(max_body=100)
    assert reader.feed(encode_frame(Request(1, bytes(92)))) != []  # 8 + 92 = 100: fits
    with pytest.raises(FrameFormatError, match="exceeds the 100-byte limit"):
        reader.feed(encode_frame(Request(1, bytes(93)))[:HEADER_SIZE])
    with pytest.raises(ValueError, match="exceeds"):
        encode_frame(Request(1, bytes(MAX_BODY_SIZE)))


@pytest.mark.parametrize(
    "garbage",
    [b"GET / HTTP/1.1\r\n\r\n", b"\x00\x00\x00\x00\x63", b"\x16\x03\x01\x02\x00\x01"],
)
def test_garbage_is_refused_within_one_header(garbage: bytes) -> None:
    with pytest.raises(FrameFormatError):
        FrameReader().feed(garbage)


@pytest.mark.parametrize(
    ("kind", "body", "match"),
    [
        (FibreFrameType.HELLO, b"HTTP" + bytes(80), "not a qkd-emulator half"),
        (FibreFrameType.RECORD, bytes(10), "truncated"),
        # One click, padding bit set in the bits byte.
        (
            FibreFrameType.RECORD,
            bytes(8) + bytes(8) + b"\x00" + b"\x00\x00\x00\x01\x03\x00",
            "padding",
        ),
        (FibreFrameType.RECORD, bytes(17) + b"\x00\x00\x00\x09" + bytes(3), "expected 4"),
        (FibreFrameType.COMMIT, bytes(43), "expected 44"),
        (FibreFrameType.NEXT, b"x", "expected 0"),
        (FibreFrameType.ERROR, b"\x09why", "unknown code"),
    ],
)
def test_malformed_bodies_are_refused(kind: FibreFrameType, body: bytes, match: str) -> None:
    with pytest.raises(FrameFormatError, match=match):
        decode_body(kind, body)


def test_hello_of_another_version_is_a_configuration_error() -> None:
    frame = bytearray(encode_frame(FibreHello(HalfRole.BOB, bytes(16), 0, PARAMS)))
    frame[HEADER_SIZE + 4] = FIBRE_PROTOCOL_VERSION + 1
    alice = FibreProtocol(HalfRole.ALICE, PARAMS)
    with pytest.raises(ParameterMismatchError, match="same qkd-emulator release"):
        alice.receive_data(bytes(frame))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_give_messages_or_a_link_error(data: bytes) -> None:
    proto = FibreProtocol(HalfRole.ALICE, PARAMS)
    with contextlib.suppress(FibreError):
        proto.receive_data(data)


# -- sans-IO: the two ends' state machines ------------------------------------------------


def connect_pair(
    bob_params: bytes = PARAMS,
) -> tuple[FibreProtocol, FibreProtocol]:
    alice, bob = FibreProtocol(HalfRole.ALICE, PARAMS), FibreProtocol(HalfRole.BOB, bob_params)
    (hello,) = alice.receive_data(bob.send(FibreHello(HalfRole.BOB, bytes(16), 0, bob_params)))
    assert isinstance(hello, FibreHello) and alice.state is FibreState.HELLO_RECEIVED
    (hello,) = bob.receive_data(alice.send(FibreHello(HalfRole.ALICE, b"a" * 16, 0, PARAMS)))
    assert hello.role is HalfRole.ALICE and bob.peer == hello
    return alice, bob


def test_a_whole_block_passes_both_state_machines() -> None:
    alice, bob = connect_pair()
    record = Record(1, 1000, None, PartyRecord(b"\x01\x00", b"\x00\x01"))
    keys = [(bytes([i]) * 16, b"k" * 32) for i in range(3)]
    exchange = [
        (bob, alice, Next()),
        (alice, bob, record),
        (bob, alice, Request(1, b"\x01sift")),
        (alice, bob, Ping()),
        (alice, bob, Reply(1, b"bases")),
        (bob, alice, Commit(1, 3, key_ids_digest(keys))),
        (alice, bob, Committed(1)),
        (bob, alice, Next()),
    ]
    for sender, receiver, msg in exchange:
        assert receiver.receive_data(sender.send(msg)) == [msg]  # type: ignore[arg-type]
        assert alice.state is bob.state or {alice.state, bob.state} == {FibreState.AWAIT_RECORD}
    assert alice.state is FibreState.AWAIT_RECORD and alice.seq == bob.seq == 1


def test_out_of_order_frames_are_refused_and_change_nothing() -> None:
    alice, bob = connect_pair()
    with pytest.raises(UnexpectedFrameError, match="cannot send REQUEST in state idle"):
        bob.send(Request(1, b"x"))
    assert bob.state is FibreState.IDLE
    with pytest.raises(UnexpectedFrameError, match="cannot receive COMMIT in state idle"):
        alice.receive_data(encode_frame(Commit(1, 1, bytes(32))))
    assert alice.state is FibreState.IDLE
    alice.receive_data(bob.send(Next()))
    bob.receive_data(alice.send(Record(5, 1, None, PartyRecord(b"", b""))))
    with pytest.raises(UnexpectedFrameError, match="block 4, but block 5"):
        alice.receive_data(encode_frame(Request(4, b"x")))
    with pytest.raises(UnexpectedFrameError, match="cannot receive HELLO"):
        alice.receive_data(encode_frame(FibreHello(HalfRole.BOB, bytes(16), 0, PARAMS)))


def test_different_parameters_are_refused_naming_the_flag() -> None:
    theirs = canonical_params({"--mu": 0.5, "--length-km": 20.0})
    alice = FibreProtocol(HalfRole.ALICE, PARAMS)
    bob = FibreProtocol(HalfRole.BOB, theirs)
    with pytest.raises(ParameterMismatchError, match=r"--length-km \(here 10.0, peer 20.0\)"):
        alice.receive_data(bob.send(FibreHello(HalfRole.BOB, bytes(16), 0, theirs)))
    # The refusing side's ERROR makes the other refuse too, and not retry.
    with pytest.raises(PeerRefusedError, match="length-km") as refused:
        bob.receive_data(
            encode_frame(FibreErrorMessage(FibreErrorCode.CONFIGURATION, "--length-km"))
        )
    assert refused.value.fatal


def test_two_halves_of_the_same_role_are_refused() -> None:
    one, other = FibreProtocol(HalfRole.BOB, PARAMS), FibreProtocol(HalfRole.ALICE, PARAMS)
    hello = encode_frame(FibreHello(HalfRole.ALICE, bytes(16), 0, PARAMS))
    with pytest.raises(ParameterMismatchError, match="both halves run --role alice"):
        other.receive_data(hello)
    one.send(FibreHello(HalfRole.BOB, bytes(16), 0, PARAMS))
    one.receive_data(hello)  # control: Bob accepts the same HELLO
    assert one.state is FibreState.IDLE


def test_cli_parameters_cover_every_link_flag_but_not_local_ones() -> None:
    parser = build_parser()
    base = ["half", "--role", "bob", "--link", "/x", "--connect", "h:1"]
    a = link_params_from_args(parser.parse_args(base))
    assert a == link_params_from_args(parser.parse_args([*base, "--buffer", "7", "--json"]))
    assert a != link_params_from_args(parser.parse_args([*base, "--eve-fraction", "0.1"]))
    assert a != link_params_from_args(parser.parse_args([*base, "--key-bits", "128"]))
    assert {"--mu", "--length-km", "--block-detections", "--seed"} <= set(json.loads(a))
    assert parse_address("[::1]:7000") == ("::1", 7000)
    assert parse_address("qkd-b.example:7000") == ("qkd-b.example", 7000)


# -- real processes ---------------------------------------------------------------------


class ListSink:
    def __init__(self, delay: float = 0.0) -> None:
        self.keys: list[QkdKey] = []
        self.delay = delay  # a slow host: keys wait in the device buffer meanwhile

    async def store_qkd_keys(self, keys: Sequence[QkdKey]) -> None:
        await trio.sleep(self.delay)
        self.keys += keys

    def ids(self) -> set[str]:
        return {k.key_id for k in self.keys}


async def start_half(
    tmp_path: Path, role: str, where: list[str], *extra: str, log_name: str | None = None
) -> tuple[subprocess.Popen[bytes], dict[str, str], Path]:
    link = tmp_path / f"qkd-{role}"
    log = tmp_path / f"{log_name or role}.log"
    with log.open("ab") as stderr:
        proc = subprocess.Popen(
            [*EMULATOR, "half", "--role", role, "--link", str(link), *where, "--json"]
            + ["--log-level", "INFO", *SMALL, *extra],
            stdout=subprocess.PIPE,
            stderr=stderr,
        )
    assert proc.stdout is not None
    with trio.fail_after(timeout(10)):
        line = await trio.to_thread.run_sync(proc.stdout.readline, abandon_on_cancel=True)
    assert line, log.read_text()
    return proc, json.loads(line), log


async def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
    with trio.fail_after(timeout(15)):
        return await trio.to_thread.run_sync(proc.wait, abandon_on_cancel=True)


def device(path: Path) -> SerialDevice:
    return SerialDevice(str(path), reconnect_initial_delay=0.05, reconnect_max_delay=0.3)


async def wait_for(condition, seconds: float, what: str) -> None:  # type: ignore[no-untyped-def]
    with trio.move_on_after(timeout(seconds)) as scope:
        while not condition():
            await trio.sleep(0.05)
    assert not scope.cancelled_caught, f"timed out waiting for {what}"


async def settle(a: ListSink, b: ListSink, seconds: float = 10) -> None:
    """Every ID either side has now must reach the other side: a key handed to one pty
    only would never arrive on the other."""
    wanted = a.ids() | b.ids()
    await wait_for(lambda: wanted <= a.ids() and wanted <= b.ids(), seconds, "lockstep")


def assert_same_keys(a: ListSink, b: ListSink) -> None:
    for sink in (a, b):
        ids = [k.key_id for k in sink.keys]
        assert len(ids) == len(set(ids)), "a key was delivered twice"
    material_a = {k.key_id: k.material for k in a.keys}
    assert all(material_a[k.key_id] == k.material for k in b.keys if k.key_id in material_a)


class CuttingProxy:
    """A TCP relay between the halves that parses the fibre-link frames going each way
    and can cut the connection at a chosen frame (which is then not delivered)."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.connections = 0
        self.cuts: list[str] = []
        self._rules: list[tuple[str, FibreFrameType, int]] = []  # (direction, type, nth)
        self._scopes: list[trio.CancelScope] = []

    def cut_at(self, direction: str, kind: FibreFrameType, nth: int = 0) -> None:
        """Cut the next connection at its ``nth`` ``kind`` frame going ``direction``."""
        self._rules.append((direction, kind, nth))

    def cut_now(self) -> None:
        self.cuts.append("now")
        for scope in self._scopes:
            scope.cancel()

    async def serve(self, task_status=trio.TASK_STATUS_IGNORED) -> None:  # type: ignore[no-untyped-def]
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(self._relay, listeners)

    async def _relay(self, bob: trio.SocketStream) -> None:
        self.connections += 1
        rule = self._rules.pop(0) if self._rules else None
        alice = await trio.open_tcp_stream("127.0.0.1", self.upstream)
        with trio.CancelScope() as scope:
            self._scopes.append(scope)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pump, bob, alice, "bob->alice", rule, scope)
                nursery.start_soon(self._pump, alice, bob, "alice->bob", rule, scope)
        self._scopes.remove(scope)
        await trio.aclose_forcefully(alice)
        await trio.aclose_forcefully(bob)

    async def _pump(self, src, dst, direction, rule, scope) -> None:  # type: ignore[no-untyped-def]
        reader, seen = FrameReader(), 0
        try:
            while data := await src.receive_some(65536):
                out: list[bytes] = []
                for kind, body in reader.feed(data):
                    if rule is not None and (rule[0], rule[1]) == (direction, kind):
                        if seen == rule[2]:
                            # Deliver what came before the chosen frame, not the frame.
                            await dst.send_all(b"".join(out))
                            self.cuts.append(f"{direction} {kind.name} #{seen}")
                            scope.cancel()
                            return
                        seen += 1
                    out.append(struct.pack(">IB", len(body), kind) + body)
                await dst.send_all(b"".join(out))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        scope.cancel()


async def test_two_halves_deliver_identical_keys_with_identical_ids(tmp_path: Path) -> None:
    alice, ready_a, _ = await start_half(tmp_path, "alice", ["--listen", "127.0.0.1:0"])
    port = ready_a["listen"].rsplit(":", 1)[1]
    bob, ready_b, _ = await start_half(tmp_path, "bob", ["--connect", f"127.0.0.1:{port}"])
    try:
        assert ready_b == {
            "role": "bob",
            "link": str(tmp_path / "qkd-bob"),
            "connect": f"127.0.0.1:{port}",
        }
        assert os.readlink(tmp_path / "qkd-alice") != os.readlink(tmp_path / "qkd-bob")
        sink_a, sink_b = ListSink(), ListSink()
        dev_a, dev_b = device(tmp_path / "qkd-alice"), device(tmp_path / "qkd-bob")
        async with trio.open_nursery() as nursery:
            await nursery.start(dev_a.run, sink_a)
            await nursery.start(dev_b.run, sink_b)
            await wait_for(
                lambda: (
                    min(len(sink_a.keys), len(sink_b.keys)) >= 300 and dev_a.status.secret_key_rate
                ),
                15,
                "300 keys on each side",
            )
            status = dev_b.status
            nursery.cancel_scope.cancel()
    finally:
        codes = [await stop(bob), await stop(alice)]
    assert codes == [0, 0]
    n = min(len(sink_a.keys), len(sink_b.keys))
    assert [(k.key_id, k.material) for k in sink_a.keys[:n]] == [
        (k.key_id, k.material) for k in sink_b.keys[:n]
    ]
    assert_same_keys(sink_a, sink_b)
    assert all(len(k.material) == 32 for k in sink_a.keys)
    assert status.state == "up" and status.qber is not None and 0 < status.qber < 0.05
    assert not os.path.lexists(tmp_path / "qkd-alice")
    assert not os.path.lexists(tmp_path / "qkd-bob")


async def test_cut_connections_never_leave_a_key_on_one_side(tmp_path: Path) -> None:
    alice, ready_a, _ = await start_half(tmp_path, "alice", ["--listen", "127.0.0.1:0"])
    proxy = CuttingProxy(int(ready_a["listen"].rsplit(":", 1)[1]))
    # 1: Alice has committed and handed over the block, her COMMITTED never reaches Bob.
    proxy.cut_at("alice->bob", FibreFrameType.COMMITTED, nth=2)
    # 2: in the middle of a block's post-processing: dropped at both ends.
    proxy.cut_at("bob->alice", FibreFrameType.REQUEST, nth=7)
    # 3: Bob's COMMIT is lost: Alice never commits, Bob must drop the block.
    proxy.cut_at("bob->alice", FibreFrameType.COMMIT, nth=1)
    sink_a, sink_b = ListSink(), ListSink()
    bob = None
    try:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(proxy.serve)
            bob, _, bob_log = await start_half(
                tmp_path,
                "bob",
                ["--connect", f"127.0.0.1:{port}", "--reconnect-max-delay", "0.2"],
            )
            await nursery.start(device(tmp_path / "qkd-alice").run, sink_a)
            await nursery.start(device(tmp_path / "qkd-bob").run, sink_b)
            await wait_for(lambda: len(proxy.cuts) == 3, 20, "three planned cuts")
            await wait_for(lambda: proxy.connections == 4, 10, "the fourth connection")
            count = len(sink_b.keys)
            await wait_for(lambda: len(sink_b.keys) > count + 100, 10, "keys after the cuts")
            proxy.cut_now()  # 4: wherever the traffic happens to be
            await wait_for(lambda: proxy.connections == 5, 10, "the fifth connection")
            count = len(sink_a.keys)
            await wait_for(lambda: len(sink_a.keys) > count + 100, 10, "keys after the cut")
            await settle(sink_a, sink_b)
            nursery.cancel_scope.cancel()
    finally:
        codes = [await stop(alice)] + ([await stop(bob)] if bob is not None else [])
    assert codes == [0] * len(codes)
    assert proxy.cuts[:3] == [
        "alice->bob COMMITTED #2",
        "bob->alice REQUEST #7",
        "bob->alice COMMIT #1",
    ]
    assert_same_keys(sink_a, sink_b)
    log = bob_log.read_text()
    # Cut 1 was settled by Alice's next HELLO, cut 3 by dropping the block.
    assert "half.pending-committed" in log
    assert "reason='not committed by Alice'" in log


async def test_restarted_bob_half_keeps_both_sides_in_lockstep(tmp_path: Path) -> None:
    alice, ready_a, _ = await start_half(tmp_path, "alice", ["--listen", "127.0.0.1:0"])
    where = ["--connect", ready_a["listen"], "--reconnect-max-delay", "0.2", "--buffer", "300"]
    bob, _, _ = await start_half(tmp_path, "bob", where)
    # Bob's host is slow, so his pty holds keys when SIGTERM comes: they must reach the
    # host before the half exits, as Alice's copies reach hers.
    sink_a, sink_b = ListSink(), ListSink(delay=0.3)
    codes = []
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(device(tmp_path / "qkd-alice").run, sink_a)
            await nursery.start(device(tmp_path / "qkd-bob").run, sink_b)
            for restart in range(2):
                target = len(sink_b.keys) + 150
                await wait_for(lambda t=target: len(sink_b.keys) > t, 10, "keys")
                codes.append(await stop(bob))  # while blocks are flowing
                bob, _, _ = await start_half(tmp_path, "bob", where, log_name=f"bob{restart}")
            count = len(sink_b.keys)
            await wait_for(lambda: len(sink_b.keys) > count + 150, 10, "keys after restarts")
            await settle(sink_a, sink_b)
            nursery.cancel_scope.cancel()
    finally:
        codes += [await stop(bob), await stop(alice)]
    assert codes == [0, 0, 0, 0]
    assert_same_keys(sink_a, sink_b)


@pytest.mark.parametrize(
    ("bob_flags", "message"),
    [
        (["--length-km", "20"], "--length-km (here 10"),
        (["--key-bits", "128"], "--key-bits (here 256, peer 128)"),
    ],
)
async def test_halves_with_different_physics_refuse_each_other(
    tmp_path: Path, bob_flags: list[str], message: str
) -> None:
    alice, ready_a, alice_log = await start_half(tmp_path, "alice", ["--listen", "127.0.0.1:0"])
    bob, _, bob_log = await start_half(
        tmp_path, "bob", ["--connect", ready_a["listen"], *bob_flags]
    )
    with trio.fail_after(timeout(15)):
        codes = [
            await trio.to_thread.run_sync(bob.wait, abandon_on_cancel=True),
            await trio.to_thread.run_sync(alice.wait, abandon_on_cancel=True),
        ]
    assert codes == [2, 2]
    for log in (alice_log, bob_log):
        text = log.read_text()
        assert "qkd-emulator half: " in text and "different link parameters" in text
        assert "run both halves with the same link flags" in text
    assert message in alice_log.read_text()
    assert not os.path.lexists(tmp_path / "qkd-alice")


async def test_help_documents_every_flag() -> None:
    proc = await trio.run_process([*EMULATOR, "half", "--help"], capture_stdout=True)
    text = proc.stdout.decode()
    parser = build_parser()
    half = parser._subparsers._group_actions[0].choices["half"]  # type: ignore[union-attr]
    flags = [s for a in half._actions for s in a.option_strings if s.startswith("--")]
    assert len(flags) > 30
    for flag in flags:
        assert flag in text
    for action in half._actions:
        assert action.help, f"{action.option_strings} has no help"
