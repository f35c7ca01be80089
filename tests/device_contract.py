"""The contract of ``QkdDevice`` (drivers/base.py), as one suite every device driver passes.

Each driver runs against a real device side (a ``Harness``):
- ``serial``: ``SerialDevice`` over a pty, the device side being the protocol's device state
  machine (``DeviceHalf``);
- ``emulator``: ``SerialDevice`` on one end of the emulator's link (``EmulatedLink``, both
  halves fed from one key source);
- ``kme-master`` and ``kme-slave``: ``Etsi014Device`` at either end of a link, against a real
  ETSI GS QKD 014 KME over mutual TLS (tests/kme_server.py). At the slave the daemon names
  the keys to collect (``FetchByIdDevice.fetch_keys``); the harness does that in ``collect``.

What every driver must do: deliver the keys the device hands out to the sink, in order, with
their IDs and each once; report status (a fresh snapshot on each change: connecting, up
with its keys counted, down saying why); survive the device going away and a failing sink,
telling every fault as a ``DeviceError``; and stop when cancelled, letting go of the device.
tests/test_device_contract.py runs each check against each harness.
"""

from __future__ import annotations

import abc
import collections
import logging
import os
import re
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import trio
from kme_server import A, B, Kme, start_kme
from pki import Pki, make_pki
from pty_pair import Pty
from qkdd_drivers.base import DeviceError, DeviceStatus, FetchByIdDevice, QkdDevice, QkdKey
from qkdd_drivers.emulator.device_side import DeviceHalf, EmulatedLink
from qkdd_drivers.kme import Etsi014Device
from qkdd_drivers.serial import SerialDevice
from timeouts import timeout

from qkdd.etsi014.memory_pool import MemoryKeyPool

__all__ = [
    "harness",
    "pki",
    "test_a_failing_sink_is_a_device_error_and_loses_no_key_it_still_holds",
    "test_a_key_handed_over_again_is_stored_once",
    "test_keys_reach_the_sink_in_order_with_their_ids",
    "test_status_is_a_snapshot_connecting_then_up_with_the_keys_counted",
    "test_stopping_returns_and_lets_go_of_the_device",
    "test_the_device_going_away_is_a_device_error_and_recovered_from",
]

KEY_BYTES = 32  # the KME's default key size, 256 bits


# -- the device sides ---------------------------------------------------------------------


class Harness(abc.ABC):
    """A driver and the real device side it runs against."""

    name: str
    where: str  # the device path or KME URL, which the driver's status names
    # The daemon names the keys to collect (a FetchByIdDevice at the link slave).
    fetches_by_id = False
    # The device side can hand a key over again (resent after lost acknowledgements).
    resends = True

    @abc.abstractmethod
    async def start(self, nursery: trio.Nursery) -> None:
        """Bring the device side up."""

    @abc.abstractmethod
    def make_device(self) -> QkdDevice: ...

    @abc.abstractmethod
    def offer(self, keys: Sequence[QkdKey]) -> None:
        """Have the device side hand out these keys, in this order."""

    async def collect(self, device: QkdDevice, keys: Sequence[QkdKey]) -> None:
        """What the daemon does for the driver to deliver offered keys: nothing for a device
        that streams them; for a device at a link slave, naming them."""
        if self.fetches_by_id:
            assert isinstance(device, FetchByIdDevice)
            await device.fetch_keys([key.key_id for key in keys])

    @abc.abstractmethod
    async def take_away(self) -> None:
        """The device goes away (unplugged, crashed, unreachable)."""

    @abc.abstractmethod
    async def bring_back(self) -> None:
        """The device is back, with the keys it had not handed over yet."""


class SerialHarness(Harness):
    """``SerialDevice`` on a pty, the device state machine on the other side."""

    name = "serial"

    def __init__(self, tmp_path: Path) -> None:
        self.path = tmp_path / "qkd"
        self.where = str(self.path)

    def device_half(self, nursery: trio.Nursery) -> DeviceHalf:
        return DeviceHalf("contract-device", window=16, retransmit_timeout=0.3, status_interval=0.2)

    async def start(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        self.half = self.device_half(nursery)
        await self.bring_back()

    def make_device(self) -> QkdDevice:
        return SerialDevice(
            self.where,
            reconnect_initial_delay=0.05,
            reconnect_max_delay=0.2,
            hello_timeout=1.0,
            idle_timeout=2.0,
        )

    def offer(self, keys: Sequence[QkdKey]) -> None:
        self.half.add_keys([(key.key_id_bytes, key.material) for key in keys])

    async def take_away(self) -> None:
        self._serving.cancel()
        await self.pty.close()

    async def bring_back(self) -> None:
        self.pty = Pty(self.path)
        self._serving = trio.CancelScope()
        half, stream, scope = self.half, self.pty.stream, self._serving

        async def serve() -> None:
            with scope:
                await half.serve(stream)

        self._nursery.start_soon(serve)


class OfferedKeys:
    """A key source for the emulator that hands out exactly the keys offered."""

    qber: float | None = None

    def __init__(self) -> None:
        self.waiting: collections.deque[tuple[bytes, bytes]] = collections.deque()

    async def next_block(self, max_keys: int) -> list[tuple[bytes, bytes]]:
        count = min(max_keys, len(self.waiting))
        return [self.waiting.popleft() for _ in range(count)]


class EmulatorHarness(SerialHarness):
    """``SerialDevice`` on end A of the emulator's link."""

    name = "emulator"
    # Its halves refuse an ID they still hold, and the other end's half holds every key.
    resends = False

    def device_half(self, nursery: trio.Nursery) -> DeviceHalf:
        self.source = OfferedKeys()
        link = EmulatedLink(self.source, window=16, retransmit_timeout=0.3, status_interval=0.2)
        nursery.start_soon(link.produce)
        return link.halves[0]

    def offer(self, keys: Sequence[QkdKey]) -> None:
        self.source.waiting.extend((key.key_id_bytes, key.material) for key in keys)


class KmeHarness(Harness):
    """``Etsi014Device`` at the link master, against a real KME."""

    name = "kme-master"

    def __init__(self, pki: Pki) -> None:
        self.pki = pki
        self._ids: collections.deque[str] = collections.deque()
        self.pool = MemoryKeyPool([A, B], max_key_per_request=16, new_key_id=self._ids.popleft)

    async def start(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        self.kme: Kme = await start_kme(nursery, self.pki, self.pool)
        self.where = self.kme.url

    def make_device(self) -> QkdDevice:
        return self._device("master", self.pki.client_a.cert, self.pki.client_a.key)

    def _device(self, role: str, cert: str, key: str) -> Etsi014Device:
        own, peer = (A, B) if role == "master" else (B, A)
        return Etsi014Device(
            self.where,
            cert_file=cert,
            key_file=key,
            ca_file=self.pki.ca,
            own_sae_id=own,
            peer_sae_id=peer,
            role=role,  # type: ignore[arg-type]
            poll_interval=0.05,
            reconnect_initial_delay=0.05,
            reconnect_max_delay=0.2,
            request_timeout=3.0,
        )

    def offer(self, keys: Sequence[QkdKey]) -> None:
        self._ids.extend(key.key_id for key in keys)
        self.pool.add_material(A, B, b"".join(key.material for key in keys))

    async def take_away(self) -> None:
        self.kme.scope.cancel()

    async def bring_back(self) -> None:
        self.kme = await start_kme(self._nursery, self.pki, self.pool, self.kme.port)


class KmeSlaveHarness(KmeHarness):
    """``Etsi014Device`` at the link slave: keys the master took wait at the KME, and the
    daemon collects them by ID."""

    name = "kme-slave"
    fetches_by_id = True

    def make_device(self) -> QkdDevice:
        return self._device("slave", self.pki.client_b.cert, self.pki.client_b.key)

    def offer(self, keys: Sequence[QkdKey]) -> None:
        super().offer(keys)
        # What the master site's qkdd took from its KME, now waiting for this site.
        self.pool.take_for_master(A, B, len(keys), KEY_BYTES * 8)


HARNESSES: dict[str, Callable[[Path, Pki], Harness]] = {
    "serial": lambda tmp_path, pki: SerialHarness(tmp_path),
    "emulator": lambda tmp_path, pki: EmulatorHarness(tmp_path),
    "kme-master": lambda tmp_path, pki: KmeHarness(pki),
    "kme-slave": lambda tmp_path, pki: KmeSlaveHarness(pki),
}


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(params=list(HARNESSES))
async def harness(
    request: pytest.FixtureRequest, nursery: trio.Nursery, tmp_path: Path, pki: Pki
) -> Harness:
    made = HARNESSES[request.param](tmp_path, pki)
    await made.start(nursery)
    return made


# -- what the checks share ----------------------------------------------------------------


class RecordingSink:
    """Every store in order, duplicates included (the contract's sink would ignore them:
    recording them shows a driver that let one through). The next `failures` stores fail."""

    def __init__(self, failures: int = 0) -> None:
        self.keys: list[QkdKey] = []
        self.failures = failures

    async def store_qkd_keys(self, keys: Sequence[QkdKey]) -> None:
        if self.failures:
            self.failures -= 1
            raise OSError("disk full")
        self.keys += keys


def new_keys(count: int) -> list[QkdKey]:
    return [QkdKey(str(uuid.uuid4()), os.urandom(KEY_BYTES)) for _ in range(count)]


def as_pairs(keys: Sequence[QkdKey]) -> list[tuple[str, bytes]]:
    return [(key.key_id, key.material) for key in keys]


async def until(predicate: Callable[[], bool], what: str, seconds: float = 10.0) -> None:
    with trio.move_on_after(timeout(seconds)):
        while not predicate():
            await trio.sleep(0.01)
        return
    pytest.fail(f"timed out waiting for {what}")


def down_reports(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    """(error class, message) of each `device.down` the driver logged."""
    found = (
        re.search(r"\berror=(\w+) reason=(.*?) retry_in=", record.getMessage())
        for record in caplog.records
        if record.name == "qkdd.device" and record.getMessage().startswith("device.down")
    )
    return [(match[1], match[2]) for match in found if match]


def device_error_names() -> set[str]:
    names: set[str] = set()
    todo: list[type[DeviceError]] = [DeviceError]
    while todo:
        cls = todo.pop()
        names.add(cls.__name__)
        todo += cls.__subclasses__()
    return names


def assert_faults_are_device_errors(caplog: pytest.LogCaptureFixture) -> None:
    errors = [error for error, _ in down_reports(caplog)]
    assert errors, "the driver reported no fault"
    assert set(errors) <= device_error_names(), errors


# -- the contract -------------------------------------------------------------------------


async def test_keys_reach_the_sink_in_order_with_their_ids(
    harness: Harness, nursery: trio.Nursery
) -> None:
    keys = new_keys(40)
    harness.offer(keys)
    sink = RecordingSink()
    device = harness.make_device()
    await nursery.start(device.run, sink)
    await harness.collect(device, keys)
    await until(lambda: len(sink.keys) >= len(keys), "the keys to reach the sink")
    assert as_pairs(sink.keys) == as_pairs(keys)


async def test_a_key_handed_over_again_is_stored_once(
    harness: Harness, nursery: trio.Nursery
) -> None:
    if not harness.resends:
        pytest.skip(f"the {harness.name} device side never hands a key over twice")
    first, fresh = new_keys(10), new_keys(3)
    harness.offer(first)
    sink = RecordingSink()
    device = harness.make_device()
    await nursery.start(device.run, sink)
    await harness.collect(device, first)
    await until(lambda: len(sink.keys) == 10, "the first keys")
    # The device hands the same keys over again (it lost the acknowledgements, or the KME
    # reuses IDs), then new ones: only the new ones are stored.
    harness.offer(first[:4] + fresh)
    await harness.collect(device, first[:4] + fresh)
    await until(lambda: len(sink.keys) >= 13, "the fresh keys")
    assert as_pairs(sink.keys) == as_pairs(first + fresh)
    assert device.status.keys_received == 13


async def test_status_is_a_snapshot_connecting_then_up_with_the_keys_counted(
    harness: Harness, nursery: trio.Nursery
) -> None:
    device = harness.make_device()
    before = device.status
    assert isinstance(before, DeviceStatus) and before.state == "connecting"
    keys = new_keys(5)
    harness.offer(keys)
    sink = RecordingSink()
    await nursery.start(device.run, sink)
    await harness.collect(device, keys)
    await until(lambda: device.status.keys_received == 5, "the keys to be counted")
    await until(lambda: device.status.state == "up", "the device to be up")
    assert harness.where in device.status.detail
    # Each change is a new snapshot: one taken earlier still says what it said.
    assert (before.state, before.keys_received) == ("connecting", 0)


async def test_the_device_going_away_is_a_device_error_and_recovered_from(
    harness: Harness, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "qkdd.device")
    first, later = new_keys(3), new_keys(4)
    harness.offer(first)
    sink = RecordingSink()
    device = harness.make_device()
    await nursery.start(device.run, sink)
    await harness.collect(device, first)
    await until(lambda: len(sink.keys) == 3 and device.status.state == "up", "the first keys")

    await harness.take_away()
    await until(lambda: device.status.state == "down", "the device to be reported down")
    assert harness.where in device.status.detail
    harness.offer(later)
    if harness.fetches_by_id:
        with pytest.raises(DeviceError):
            await harness.collect(device, later)
    await until(lambda: bool(down_reports(caplog)), "the fault to be logged")
    assert_faults_are_device_errors(caplog)

    await harness.bring_back()
    await until(lambda: device.status.state == "up", "the device to be up again")
    await harness.collect(device, later)
    await until(lambda: len(sink.keys) >= 7, "the later keys")
    assert as_pairs(sink.keys) == as_pairs(first + later)


async def test_a_failing_sink_is_a_device_error_and_loses_no_key_it_still_holds(
    harness: Harness, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "qkdd.device")
    keys = new_keys(8)
    harness.offer(keys)
    sink = RecordingSink(failures=1)
    device = harness.make_device()
    await nursery.start(device.run, sink)
    if harness.fetches_by_id:
        # The KME erased the keys when it handed them out, so they are lost; the caller is
        # told, and the next keys are collected as usual.
        with pytest.raises(DeviceError, match="disk full"):
            await harness.collect(device, keys)
        keys = new_keys(8)
        harness.offer(keys)
        await harness.collect(device, keys)
    else:
        # A streaming device still holds the keys (or the driver does): they come again.
        await until(lambda: bool(down_reports(caplog)), "the failure to be reported")
        assert any("disk full" in reason for _, reason in down_reports(caplog))
        assert_faults_are_device_errors(caplog)
    await until(lambda: len(sink.keys) >= len(keys), "the keys once the sink works")
    assert as_pairs(sink.keys) == as_pairs(keys)


async def test_stopping_returns_and_lets_go_of_the_device(
    harness: Harness, nursery: trio.Nursery
) -> None:
    first, later = new_keys(5), new_keys(5)
    harness.offer(first)
    sink = RecordingSink()
    device = harness.make_device()
    with trio.fail_after(timeout(20)):
        async with trio.open_nursery() as running:
            await running.start(device.run, sink)
            await harness.collect(device, first)
            await until(lambda: len(sink.keys) == 5, "the first keys")
            running.cancel_scope.cancel()  # run returns once cancelled
    # Another driver takes the device over (a serial port is locked while open).
    successor_sink = RecordingSink()
    successor = harness.make_device()
    await nursery.start(successor.run, successor_sink)
    harness.offer(later)
    await harness.collect(successor, later)
    await until(lambda: len(successor_sink.keys) >= 5, "the successor's keys")
    assert as_pairs(successor_sink.keys) == as_pairs(later)
    assert as_pairs(sink.keys) == as_pairs(first)
