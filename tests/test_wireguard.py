"""WireGuard PSK rotation: the binding config, the PSK derivation, and two sites' rotators
wired to each other in-process (the policy they run is tested in
tests/test_rotation_policy.py, the `wg` runner in tests/test_wireguard_wg_tool.py).

Where `wg` runs, these tests use a recording stand-in for wg(8) that each test writes into
its tmp dir and puts first on PATH: a real `wg set` needs a WireGuard interface, and most
CI containers (this project's included) have neither the kernel module nor the right to
create one. The stand-in reads the key file the way wg does, records its argv and the key,
checks the key's format as wg does, and fails when a test asks it to.
test_real_wg_interface runs against the real `wg` and a real interface when the machine
allows both, and otherwise skips saying why.
"""

from __future__ import annotations

import base64
import dataclasses
import logging
import math
import os
import shutil
import struct
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from rotation_helpers import FAST, KeyPool, RotatorPair, logged_events
from timeouts import timeout
from wg_standin import StandinWg, install_standin, path_with

from qkdd import labels
from qkdd.rotation.key_rotator import NotTheDrivingSiteError, PeerUnreachableError
from qkdd.rotation.tunnel_binding import KeyMaterialError
from qkdd.wireguard.psk_rotator import PskRotator
from qkdd.wireguard.wg_tool import WgCommandError
from qkdd.wireguard.wireguard_binding import WireGuardBinding, WireGuardError, derive_psk

PUB_A = base64.b64encode(bytes(range(32))).decode()  # site A's WireGuard public key
PUB_B = base64.b64encode(bytes(range(100, 132))).decode()
NAME = "tunnel-a-b"


def binding(**changes: object) -> WireGuardBinding:
    """Site A's binding (the driving site); site B's is `slave_binding`."""
    fields: dict[str, object] = dict(
        name=NAME,
        interface="wg-a",
        peer_public_key=PUB_B,
        peer_site="site-b",
        local_sae="wg-a",
        remote_sae="wg-b",
    )
    fields.update(changes)
    return WireGuardBinding(**fields)  # type: ignore[arg-type]


def slave_binding(master: WireGuardBinding) -> WireGuardBinding:
    return dataclasses.replace(
        master,
        interface="wg-b",
        peer_public_key=PUB_A,
        peer_site="site-a",
        local_sae=master.remote_sae,
        remote_sae=master.local_sae,
    )


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# --------------------------------------------------------------------------------------
# WireGuardBinding


def test_binding_defaults():
    b = binding()
    assert (b.interval, b.max_key_age, b.startup_timeout, b.wg_command) == (120, 600, 15, "wg")
    with pytest.raises(dataclasses.FrozenInstanceError):
        b.interval = 1  # type: ignore[misc]


NON_CANONICAL_KEY = PUB_B[:42] + chr(ord(PUB_B[42]) + 1) + "="  # same bytes, stray low bits


@pytest.mark.parametrize(
    "key,value",
    [
        ("name", ""),
        ("name", "has space"),
        ("peer_site", "-leading-dash"),
        ("local_sae", 7),
        ("remote_sae", "x" * 65),
        ("interface", ""),
        ("interface", "wg/0"),
        ("interface", "wg 0"),
        ("interface", "-wg0"),
        ("interface", "a" * 16),
        ("peer_public_key", "not base64!"),
        ("peer_public_key", b64(bytes(31))),
        ("peer_public_key", b64(bytes(33))),
        ("peer_public_key", PUB_B.rstrip("=")),
        ("peer_public_key", NON_CANONICAL_KEY),
        ("interval", 0),
        ("interval", -1),
        ("interval", math.nan),
        ("interval", math.inf),
        ("interval", True),
        ("interval", "120"),
        ("max_key_age", 120),  # not more than interval
        ("max_key_age", 60),
        ("startup_timeout", 0),
        ("wg_command", ""),
    ],
)
def test_binding_rejects_bad_values(key, value):
    with pytest.raises(ValueError, match=f"wireguard.{key}: expected"):
        binding(**{key: value})


def test_non_canonical_key_really_decodes_to_the_same_bytes():
    # Guards the case above: it must differ only in spelling, not be plain invalid.
    assert base64.b64decode(NON_CANONICAL_KEY) == base64.b64decode(PUB_B)


def test_binding_accepts_a_real_shaped_config():
    b = binding(interface="wg0", interval=0.5, max_key_age=2, startup_timeout=1, wg_command="/x")
    assert b.interface == "wg0" and b.max_key_age == 2


# --------------------------------------------------------------------------------------
# derive_psk


def lp(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def test_derive_psk_is_the_documented_hkdf():
    material = bytes(range(32))
    info = lp(labels.LABEL_WIREGUARD_PSK) + lp(NAME.encode()) + lp(b"key-1")
    expected = HKDF(hashes.SHA256(), 32, None, info).derive(material)
    assert derive_psk(material, NAME, "key-1") == expected


def test_derive_psk_recorded_vector():
    """A change to the derivation must be deliberate: this value changes with it."""
    psk = derive_psk(bytes(range(32)), NAME, str(uuid.UUID(int=1)))
    assert psk.hex() == RECORDED_PSK


RECORDED_PSK = "54af0d48f0bf21a7d710c12cf0dc7a61017aed3437d5a2de6452d1d94cb08cb7"


@pytest.mark.parametrize(
    "material,name,key_id",
    [
        (b"\x01" * 32, NAME, "key-2"),
        (b"\x01" * 32, "tunnel-a-c", "key-1"),
        (b"\x02" * 32, NAME, "key-1"),
        (b"\x01" * 64, NAME, "key-1"),
    ],
)
def test_every_input_changes_the_psk(material, name, key_id):
    base = derive_psk(b"\x01" * 32, NAME, "key-1")
    other = derive_psk(material, name, key_id)
    assert len(other) == 32 and other != base


def test_psk_is_not_the_hybrid_key_itself():
    material = os.urandom(32)
    assert derive_psk(material, NAME, "k") != material


def test_short_key_material_is_refused_without_showing_it():
    material = b"\xab" * 31
    with pytest.raises(KeyMaterialError, match="248 bits.*at least 256") as caught:
        derive_psk(material, NAME, "k")
    assert isinstance(caught.value, ValueError)
    assert material.hex() not in str(caught.value)


# --------------------------------------------------------------------------------------
# Two sites in-process


def psk_pool() -> KeyPool:
    """Both sites' stores for the binding's SAE pair (``key``: a key's PSK)."""
    return KeyPool(derive_psk, NAME)


class FakeWg:
    """The kernels' view for tests that do not run `wg`: each interface's current PSK,
    every install in order, the installs that ended the session, and failures on
    request."""

    def __init__(self) -> None:
        self.current: dict[str, bytes] = {}
        self.history: list[tuple[str, bytes, float]] = []
        self.sessions_ended: list[tuple[str, bytes]] = []
        self.failing: dict[str, str] = {}

    async def install(self, interface: str, peer_public_key: str, psk: bytes) -> None:
        await trio.lowlevel.checkpoint()
        if interface in self.failing:
            raise WgCommandError(self.failing[interface], 1, self.failing[interface])
        self.current[interface] = psk
        self.history.append((interface, psk, trio.current_time()))

    async def install_ending_session(
        self, interface: str, peer_public_key: str, psk: bytes
    ) -> None:
        await self.install(interface, peer_public_key, psk)
        self.sessions_ended.append((interface, psk))

    def installs(self, interface: str) -> list[bytes]:
        return [psk for iface, psk, _ in self.history if iface == interface]


def wg_link(pool: KeyPool, master: WireGuardBinding, **wiring: Any) -> RotatorPair:
    """Master and slave rotators (``installer``, default `wg`; ``announce_hook``)."""
    return RotatorPair(pool, PskRotator, master, slave_binding(master), **wiring)


def events(caplog: pytest.LogCaptureFixture, name: str) -> list[str]:
    return logged_events(caplog, "qkdd.wireguard", name)


async def test_both_sites_install_the_same_psk(autojump_clock):
    pool, wg = psk_pool(), FakeWg()
    pool.add(1)
    link = wg_link(pool, binding(**FAST), installer=wg)
    master, slave = await link.first_install()
    key_id = pool.taken[0]
    assert master == slave == f"fresh key {key_id}"
    assert wg.current["wg-a"] == wg.current["wg-b"] == pool.key(key_id)
    # The peer installs first: the driving site only switches once the peer has the key.
    assert [iface for iface, _, _ in wg.history] == ["wg-b", "wg-a"]
    assert link.states() == ("fresh", "fresh")


async def test_rotates_every_interval_with_a_new_key_each_time(autojump_clock, nursery):
    pool, wg = psk_pool(), FakeWg()
    pool.add(10)
    link = wg_link(pool, binding(**FAST), installer=wg)
    await link.first_install()
    nursery.start_soon(link.master.run)
    nursery.start_soon(link.slave.run)
    await trio.sleep(35)  # virtual time: rotations at 10, 20, 30
    assert len(pool.taken) == 4
    assert wg.installs("wg-a") == wg.installs("wg-b") == [pool.key(k) for k in pool.taken]
    assert len(set(wg.installs("wg-a"))) == 4
    times = [t for iface, _, t in wg.history if iface == "wg-a"]
    assert [round(b - a) for a, b in zip(times, times[1:], strict=False)] == [10, 10, 10]
    assert link.master.status()["key_id"] == link.slave.status()["key_id"] == pool.taken[-1]


async def test_empty_pool_keeps_the_key_and_retries_sooner(autojump_clock, nursery, caplog):
    caplog.set_level(logging.INFO, "qkdd.wireguard")
    pool, wg = psk_pool(), FakeWg()
    pool.add(1)
    link = wg_link(pool, binding(**FAST), installer=wg)
    await link.first_install()
    first = wg.current["wg-a"]
    nursery.start_soon(link.master.run)
    nursery.start_soon(link.slave.run)
    await trio.sleep(12)  # the rotation at 10 found no key
    assert wg.current["wg-a"] == wg.current["wg-b"] == first
    assert link.states()[0] == "stale"
    failed = events(caplog, "wireguard_rotation_failed")
    assert len(failed) == 1 and "no ready hybrid key" in failed[0]
    assert f"binding={NAME}" in failed[0]
    pool.add(1)
    await trio.sleep(5)  # the retry, 5 s after the failure, not a whole interval
    assert wg.current["wg-a"] == wg.current["wg-b"] == pool.key(pool.taken[-1])
    assert link.states() == ("fresh", "fresh")


async def test_unreachable_peer_is_a_failed_rotation_that_takes_no_key(
    autojump_clock, nursery, caplog
):
    caplog.set_level(logging.INFO, "qkdd.wireguard")
    pool, wg = psk_pool(), FakeWg()
    pool.add(5)
    link = wg_link(pool, binding(**FAST), installer=wg)
    await link.first_install()
    first = wg.current["wg-a"]
    link.peer_up = False
    nursery.start_soon(link.master.run)
    await trio.sleep(11)
    # The driving site does not switch to a key the peer did not confirm, and takes no
    # key for an attempt that cannot reach the peer.
    assert wg.current["wg-a"] == first
    assert len(pool.taken) == 1 and len(pool.ready) == 4
    (failed,) = events(caplog, "wireguard_rotation_failed")
    assert "no session with site site-b" in failed and "key_id=- " in failed
    assert link.master.status()["last_error"] == "no session with site site-b"


async def test_peer_outage_takes_no_key_and_is_logged_once(autojump_clock, nursery, caplog):
    caplog.set_level(logging.INFO, "qkdd.wireguard")
    pool, wg = psk_pool(), FakeWg()
    pool.add(5)
    link = wg_link(pool, binding(**FAST), installer=wg)
    await link.first_install()
    nursery.start_soon(link.master.run)
    nursery.start_soon(link.slave.run)
    link.peer_up = False
    await trio.sleep(200)  # dozens of attempts, failing closed at 60 s
    assert len(pool.taken) == 1 and len(pool.ready) == 4
    assert link.master.status()["consecutive_failures"] >= 30
    assert link.states() == ("fail-closed", "fail-closed")
    # One warning for the outage (the repeats go to DEBUG), one fail-closed per site.
    assert len(events(caplog, "wireguard_rotation_failed")) == 1
    assert len(events(caplog, "wireguard_fail_closed")) == 2
    link.peer_up = True
    await trio.sleep(6)
    assert link.states() == ("fresh", "fresh") and len(pool.taken) == 2
    link.peer_up = False  # a second outage is news again
    await trio.sleep(30)
    assert len(events(caplog, "wireguard_rotation_failed")) == 2
    assert len(pool.taken) == 2


async def test_a_new_kind_of_failure_is_logged_again(autojump_clock, nursery, caplog):
    caplog.set_level(logging.INFO, "qkdd.wireguard")
    pool, wg = psk_pool(), FakeWg()
    pool.add(1)
    link = wg_link(pool, binding(**FAST), installer=wg)
    await link.first_install()
    nursery.start_soon(link.master.run)
    await trio.sleep(30)  # the pool is dry: several attempts, one warning
    link.peer_up = False
    await trio.sleep(20)  # now the peer is gone too: one more
    failed = events(caplog, "wireguard_rotation_failed")
    assert len(failed) == 2
    assert "no ready hybrid key" in failed[0] and "no session" in failed[1]


async def test_a_key_named_in_a_call_that_went_out_is_never_reused(autojump_clock, nursery, caplog):
    """The peer may have taken the key by ID even though no answer came: it counts as
    consumed, and the next rotation names another key."""
    pool, wg = psk_pool(), FakeWg()
    pool.add(5)
    lost: list[str] = []

    async def session_breaks_after_sending() -> None:
        if link.master.status()["key_id"] is not None and not lost:
            lost.append(pool.taken[-1])
            pool.at_peer.pop(lost[0])  # the peer took it; its answer is lost
            raise PeerUnreachableError("the session with site site-b ended")

    link = wg_link(pool, binding(**FAST), installer=wg, announce_hook=session_breaks_after_sending)
    await link.first_install()
    nursery.start_soon(link.master.run)
    nursery.start_soon(link.slave.run)
    await trio.sleep(16)  # the rotation at 10 s is lost; the retry at 15 s succeeds
    assert lost and pool.taken.count(lost[0]) == 1
    assert link.master.status()["key_id"] == link.slave.status()["key_id"] == pool.taken[-1]
    assert pool.taken[-1] != lost[0]
    assert wg.current["wg-a"] == wg.current["wg-b"]


async def test_failed_install_at_the_peer_fails_the_rotation(autojump_clock, nursery, caplog):
    caplog.set_level(logging.INFO, "qkdd.wireguard")
    pool, wg = psk_pool(), FakeWg()
    pool.add(5)
    link = wg_link(pool, binding(**FAST), installer=wg)
    await link.first_install()
    first = wg.current["wg-a"]
    wg.failing["wg-b"] = "Unable to modify interface: No such device"
    nursery.start_soon(link.master.run)
    await trio.sleep(11)
    assert wg.current["wg-a"] == wg.current["wg-b"] == first
    assert "No such device" in events(caplog, "wireguard_install_failed")[0]
    assert "No such device" in events(caplog, "wireguard_rotation_failed")[0]
    assert link.slave.status()["state"] == "stale"


async def test_fail_closed_after_max_key_age_then_recover(autojump_clock, nursery, caplog):
    caplog.set_level(logging.INFO, "qkdd.wireguard")
    pool, wg = psk_pool(), FakeWg()
    pool.add(1)
    link = wg_link(pool, binding(**FAST), installer=wg)
    await link.first_install()
    last_fresh = wg.current["wg-a"]
    nursery.start_soon(link.master.run)
    nursery.start_soon(link.slave.run)
    await trio.sleep(59.9)
    assert link.states() == ("stale", "stale")
    assert wg.current["wg-a"] == last_fresh
    await trio.sleep(100)  # well past max_key_age (60 s), many retries later
    assert link.states() == ("fail-closed", "fail-closed")
    random_a, random_b = wg.current["wg-a"], wg.current["wg-b"]
    assert last_fresh not in (random_a, random_b) and random_a != random_b
    assert len(random_a) == len(random_b) == 32
    # Exactly one random key and one log line per site, however long the outage; each
    # ended the WireGuard session, which a rotation never does.
    assert wg.installs("wg-a") == [last_fresh, random_a]
    assert sorted(wg.sessions_ended) == [("wg-a", random_a), ("wg-b", random_b)]
    fail_closed = events(caplog, "wireguard_fail_closed")
    assert len(fail_closed) == 2
    assert all(f"replaced={pool.taken[0]}" in line for line in fail_closed)
    # Replaced exactly at max_key_age after the last fresh install, on both sides.
    fresh_time = wg.history[1][2]
    assert [t - fresh_time for _, _, t in wg.history[2:]] == pytest.approx([60, 60], abs=0.01)

    pool.add(1)
    await trio.sleep(6)  # the next retry
    assert wg.current["wg-a"] == wg.current["wg-b"] == pool.key(pool.taken[-1])
    assert link.states() == ("fresh", "fresh")
    assert len(events(caplog, "wireguard_recovered")) == 2


async def test_hung_peer_does_not_delay_failing_closed(autojump_clock, nursery):
    """An announce that never returns is cut off when the key becomes too old."""
    pool, wg = psk_pool(), FakeWg()
    pool.add(5)
    hung = False

    async def maybe_hang() -> None:
        if hung:
            await trio.sleep_forever()

    link = wg_link(pool, binding(**FAST), installer=wg, announce_hook=maybe_hang)
    await link.first_install()
    fresh_time = wg.history[-1][2]
    hung = True
    nursery.start_soon(link.master.run)
    await trio.sleep(61)
    assert link.master.status()["state"] == "fail-closed"
    _, _, replaced_at = wg.history[-1]
    assert replaced_at - fresh_time == pytest.approx(60, abs=0.01)


async def test_master_first_install_fails_closed_after_startup_timeout(autojump_clock, caplog):
    caplog.set_level(logging.INFO, "qkdd.wireguard")
    pool, wg = psk_pool(), FakeWg()
    rotator = PskRotator(
        binding(**FAST), installer=wg, take_fresh_key=pool.take_fresh_key, announce=_never_called
    )
    start = trio.current_time()
    assert await rotator.first_install() == "random key (fail closed)"
    assert wg.history[-1][2] - start == pytest.approx(15, abs=0.01)
    assert rotator.status()["state"] == "fail-closed"
    (line,) = events(caplog, "wireguard_fail_closed")
    assert "startup_timeout" in line
    # It kept trying during start-up, once a second, and said so once.
    assert rotator.status()["consecutive_failures"] == 15
    assert len(events(caplog, "wireguard_rotation_failed")) == 1


async def _never_called(key_id: str) -> None:
    raise AssertionError("no key to announce")


async def test_slave_first_install_waits_for_the_peer(autojump_clock, nursery):
    pool, wg = psk_pool(), FakeWg()
    pool.add(1)
    link = wg_link(pool, binding(**FAST), installer=wg)
    task_status: dict[str, str] = {}

    async def slave_first() -> None:
        task_status["slave"] = await link.slave.first_install()

    nursery.start_soon(slave_first)
    await trio.sleep(14)  # the master comes up late, within the slave's startup_timeout
    assert "slave" not in task_status
    assert await link.master.first_install() == f"fresh key {pool.taken[0]}"
    await trio.testing.wait_all_tasks_blocked()
    assert task_status["slave"] == f"fresh key {pool.taken[0]}"
    assert wg.current["wg-a"] == wg.current["wg-b"]


async def test_slave_first_install_fails_closed_without_the_peer(autojump_clock, caplog):
    caplog.set_level(logging.INFO, "qkdd.wireguard")
    wg = FakeWg()
    rotator = PskRotator(slave_binding(binding(**FAST)), installer=wg)
    assert await rotator.first_install() == "random key (fail closed)"
    assert len(wg.current["wg-b"]) == 32
    assert len(events(caplog, "wireguard_fail_closed")) == 1
    # A fresh key announced later replaces the random one.
    pool = psk_pool()
    pool.add(1)
    key_id = pool.ready[0]
    await rotator.install_announced(key_id, pool.material[key_id])
    assert wg.current["wg-b"] == pool.key(key_id)
    assert rotator.status()["state"] == "fresh"


async def test_fresh_key_arriving_while_failing_closed_wins(autojump_clock, nursery):
    """A fresh install in progress when the startup timeout fires is not overwritten by the
    random key queued behind it."""
    wg = FakeWg()
    gate = trio.Event()
    rotator = PskRotator(slave_binding(binding(**FAST)), installer=wg)
    results: list[str] = []

    async def first() -> None:
        results.append(await rotator.first_install())

    async def slow_install(interface: str, peer_public_key: str, psk: bytes) -> None:
        await gate.wait()
        await FakeWg.install(wg, interface, peer_public_key, psk)

    nursery.start_soon(first)
    await trio.sleep(14.5)
    pool = psk_pool()
    pool.add(1)
    key_id = pool.ready[0]
    wg.install = slow_install  # type: ignore[method-assign]
    async with trio.open_nursery() as inner:
        inner.start_soon(rotator.install_announced, key_id, pool.material[key_id])
        await trio.sleep(1)  # the startup timeout passes while that install hangs
        gate.set()
    await trio.testing.wait_all_tasks_blocked()
    assert results == [f"fresh key {key_id}"]
    assert wg.installs("wg-b") == [pool.key(key_id)]


async def test_first_install_raises_if_no_key_can_be_installed(autojump_clock):
    wg = FakeWg()
    wg.failing["wg-b"] = "Unable to modify interface: Operation not permitted"
    rotator = PskRotator(slave_binding(binding(**FAST)), installer=wg)
    # Virtual time: a first_install that retried forever would fail here, not hang.
    with (
        trio.fail_after(3600),
        pytest.raises(WireGuardError, match="could not install any.*Operation not permitted"),
    ):
        await rotator.first_install()


async def test_announced_key_is_refused_at_the_driving_site(autojump_clock):
    pool, wg = psk_pool(), FakeWg()
    link = wg_link(pool, binding(**FAST), installer=wg)
    with pytest.raises(NotTheDrivingSiteError):
        await link.master.install_announced("k", bytes(32))
    assert wg.history == []


async def test_short_hybrid_key_is_refused_at_both_sites(autojump_clock, caplog):
    caplog.set_level(logging.INFO, "qkdd.wireguard")
    wg = FakeWg()
    slave = PskRotator(slave_binding(binding(**FAST)), installer=wg)
    with pytest.raises(KeyMaterialError):
        await slave.install_announced("k", bytes(16))
    master = PskRotator(
        binding(**FAST),
        installer=wg,
        take_fresh_key=lambda: ("k", bytes(16)),
        announce=_never_called,
    )
    await master._rotate()
    assert "at least 256" in events(caplog, "wireguard_rotation_failed")[0]
    assert wg.history == []


def test_rotator_needs_both_driving_callables():
    with pytest.raises(ValueError, match="both"):
        PskRotator(binding(), take_fresh_key=lambda: None)
    with pytest.raises(ValueError, match="driving site only"):
        PskRotator(binding(), peer_unavailable=lambda: None)


async def test_status_and_logs_never_show_key_material(autojump_clock, nursery, caplog):
    caplog.set_level(logging.DEBUG)
    pool, wg = psk_pool(), FakeWg()
    pool.add(3)
    link = wg_link(pool, binding(**FAST), installer=wg)
    assert link.master.status()["state"] == "pending"
    await link.first_install()
    nursery.start_soon(link.master.run)
    nursery.start_soon(link.slave.run)
    await trio.sleep(100)  # rotations, then an empty pool, then failing closed
    status = link.master.status()
    assert set(status) >= {"binding", "interface", "state", "key_id", "last_fresh_install"}
    assert status["binding"] == NAME and status["interface"] == "wg-a"
    assert isinstance(status["last_fresh_install"], float)
    secrets_seen = [*pool.material.values(), *(psk for _, psk, _ in wg.history)]
    text = repr(status) + repr(link.slave.status()) + caplog.text + repr(link.master)
    assert caplog.text  # the check below has something to look at
    for secret in secrets_seen:
        for spelling in (secret.hex(), b64(secret), repr(secret)):
            assert spelling not in text


# --------------------------------------------------------------------------------------
# Rotators running the recording stand-in


@pytest.fixture
def standin_wg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> StandinWg:
    """A recording `wg` first on PATH (the real one cannot run here: see the module
    docstring)."""
    standin = install_standin(tmp_path / "bin")
    monkeypatch.setenv("PATH", path_with(standin.directory))
    return standin


async def wait_until(condition: Callable[[], bool]) -> None:
    # The bound only keeps a broken build from hanging the run; nothing asserts on timing.
    with trio.fail_after(timeout(20)):
        while not condition():
            await trio.sleep(0.01)


async def test_standin_sites_install_the_same_psk_never_in_argv(standin_wg, nursery):
    pool = psk_pool()
    pool.add(3)
    link = wg_link(pool, binding(interval=0.05, max_key_age=5, startup_timeout=5))
    assert await link.first_install() == (f"fresh key {pool.taken[0]}",) * 2
    nursery.start_soon(link.master.run)
    nursery.start_soon(link.slave.run)
    await wait_until(lambda: len(standin_wg.installed("wg-a")) == 3)
    expected = [pool.key(k) for k in pool.taken]
    assert standin_wg.installed("wg-a") == standin_wg.installed("wg-b") == expected
    calls = standin_wg.calls()
    assert [c["argv"][1] for c in calls[:6]] == ["wg-b", "wg-a"] * 3  # type: ignore[index]
    for call in calls:
        for psk in expected:
            for spelling in (b64(psk), psk.hex()):
                assert not any(spelling in arg for arg in call["argv"])  # type: ignore[union-attr]


async def test_standin_fail_closed_then_recover(standin_wg, nursery, caplog):
    caplog.set_level(logging.INFO, "qkdd.wireguard")
    pool = psk_pool()
    pool.add(2)
    link = wg_link(pool, binding(interval=0.1, max_key_age=2.0, startup_timeout=5))
    await link.first_install()
    nursery.start_soon(link.master.run)
    nursery.start_soon(link.slave.run)
    # Both sites rotate to the last key from the pool; then the pool is dry, rotations
    # fail, and once that key is max_key_age old both sites fail closed. (How long they
    # stay stale before that depends on how fast `wg` runs; the states in between are
    # checked on a virtual clock above.)
    await wait_until(lambda: not pool.ready)
    last_fresh = pool.key(pool.taken[-1])
    await wait_until(lambda: link.states() == ("fail-closed", "fail-closed"))
    assert events(caplog, "wireguard_rotation_failed")
    random_a = standin_wg.installed("wg-a")[-1]
    random_b = standin_wg.installed("wg-b")[-1]
    assert last_fresh not in (random_a, random_b)
    assert standin_wg.installed("wg-a")[-2] == standin_wg.installed("wg-b")[-2] == last_fresh
    fail_closed = events(caplog, "wireguard_fail_closed")
    assert sorted("interface=wg-a" in line for line in fail_closed) == [False, True]
    closed_a, closed_b = len(standin_wg.installed("wg-a")), len(standin_wg.installed("wg-b"))

    pool.add(1)
    # Both sites recover; the one key lasts max_key_age, after which they may fail closed
    # again, so what is checked is the PSK each installed next, not the state now.
    await wait_until(lambda: len(events(caplog, "wireguard_recovered")) == 2)
    recovered = pool.key(pool.taken[-1])
    assert standin_wg.installed("wg-a")[closed_a] == recovered
    assert standin_wg.installed("wg-b")[closed_b] == recovered


async def test_standin_wg_failing_at_the_peer_keeps_both_sites_on_the_old_key(
    standin_wg, nursery, caplog
):
    caplog.set_level(logging.INFO, "qkdd.wireguard")
    pool = psk_pool()
    pool.add(5)
    link = wg_link(pool, binding(interval=0.05, max_key_age=5, startup_timeout=5))
    await link.first_install()
    standin_wg.fail("wg-b", "Unable to modify interface: No such device\n")
    nursery.start_soon(link.master.run)
    await wait_until(lambda: events(caplog, "wireguard_rotation_failed"))
    assert standin_wg.installed("wg-a") == [pool.key(pool.taken[0])]
    assert "No such device" in events(caplog, "wireguard_rotation_failed")[0]
    standin_wg.recover("wg-b")
    await wait_until(lambda: len(standin_wg.installed("wg-a")) == 2)
    assert standin_wg.installed("wg-a")[-1] == standin_wg.installed("wg-b")[-1]


# --------------------------------------------------------------------------------------
# The real wg


@pytest.fixture
def real_wireguard_interface():
    wg, ip = shutil.which("wg"), shutil.which("ip")
    if wg is None or ip is None:
        pytest.skip(
            "the real `wg` and `ip` are not both installed; the stand-in tests above cover "
            "the installer"
        )
    name = f"qkddt{os.getpid() % 100000}"
    made = subprocess.run(
        [ip, "link", "add", name, "type", "wireguard"], capture_output=True, text=True
    )
    if made.returncode != 0:
        pytest.skip(
            f"cannot create a WireGuard interface here (`ip link add {name} type wireguard`: "
            f"{made.stderr.strip()}); needs the wireguard kernel module and CAP_NET_ADMIN. "
            "The stand-in tests above cover the installer"
        )
    try:
        yield wg, name
    finally:
        subprocess.run([ip, "link", "del", name], capture_output=True)


async def test_real_wg_interface(real_wireguard_interface):
    wg, interface = real_wireguard_interface
    pool = psk_pool()
    pool.add(1)
    (key_id,) = pool.ready
    slave = PskRotator(slave_binding(binding(interface=interface, wg_command=wg)))
    await slave.install_announced(key_id, pool.material[key_id])
    shown = subprocess.run(
        [wg, "show", interface, "preshared-keys"], capture_output=True, text=True, check=True
    ).stdout.split()
    assert shown == [PUB_A, b64(pool.key(key_id))]
