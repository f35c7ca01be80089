"""IPsec PPK rotation: the [[ipsec]] config, the PPK derivation, the IPSEC_INSTALL body, and
two sites' rotators wired to each other in-process under Trio's virtual clock.

The rotator tests drive a model of two charons (``ModelCharon``): each site's loaded PPK,
and one IKE SA that a reauthentication replaces only when both sites hold the same PPK, as
charon's IKE_AUTH does. Timing over minutes of virtual time needs the model; what charon
really does with each call (PPK loaded and replaced, IKE SAs authenticated with it, torn
down) is checked against charon itself in tests/test_ipsec_real.py.
"""

from __future__ import annotations

import base64
import logging
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from demo_layout import config_error, site_host_example, toml_table, write_demo_sites
from rotation_helpers import FAST, KeyPool, RotatorPair, logged_events
from timeouts import timeout

from qkdd import labels
from qkdd.config import ConfigError, load_config
from qkdd.crypto.select import select_backend
from qkdd.demo_sites import SITE_A, SITE_B
from qkdd.identity import write_identity, write_key_encryption_key
from qkdd.ipsec.charon import CharonError, CharonUnreachableError
from qkdd.ipsec.ipsec_binding import DEFAULT_VICI_SOCKET, IpsecBinding, IpsecError, derive_ppk
from qkdd.ipsec.ppk_rotator import PpkRotator
from qkdd.peer.calls import CallKind, IpsecInstall, WgInstall
from qkdd.peer.peer_errors import RemoteProtocolError
from qkdd.rotation.key_rotator import NotTheDrivingSiteError
from qkdd.rotation.policy import KeyState, RotationAction, RotationPolicy
from qkdd.rotation.tunnel_binding import BindingValueError, KeyMaterialError
from qkdd.wireguard.wireguard_binding import derive_psk

NAME = "tunnel-a-b"
SOCKET_A, SOCKET_B = "/run/site-a/charon.vici", "/run/site-b/charon.vici"


def binding(**changes: object) -> IpsecBinding:
    """Site A's binding (the driving site); site B's is `slave_binding`."""
    fields: dict[str, object] = dict(
        name=NAME,
        connection="site-to-site",
        ppk_id="qkdd-tunnel",
        peer_site="site-b",
        local_sae="ipsec-a",
        remote_sae="ipsec-b",
        vici_socket=SOCKET_A,
    )
    fields.update(changes)
    return IpsecBinding(**fields)  # type: ignore[arg-type]


def slave_binding(master: IpsecBinding) -> IpsecBinding:
    return IpsecBinding(
        name=master.name,
        connection=master.connection,
        ppk_id=master.ppk_id,
        peer_site="site-a",
        local_sae=master.remote_sae,
        remote_sae=master.local_sae,
        vici_socket=SOCKET_B,
        interval=master.interval,
        max_key_age=master.max_key_age,
        startup_timeout=master.startup_timeout,
    )


# --------------------------------------------------------------------------------------
# The binding and its config


def test_binding_defaults():
    b = IpsecBinding(name="t", connection="c", peer_site="site-b", local_sae="a", remote_sae="b")
    assert (b.ppk_id, b.vici_socket, b.interval, b.max_key_age, b.startup_timeout) == (
        "t",
        DEFAULT_VICI_SOCKET,
        300,
        900,
        15,
    )
    assert b.secret_id == "qkdd-ppk-t"


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("name", "-x"),
        ("name", "a b"),
        ("connection", "a b"),
        ("connection", ""),
        ("connection", "a/b"),
        ("ppk_id", "with space"),
        ("ppk_id", "@fqdn"),
        ("ppk_id", "*"),
        ("vici_socket", "relative/charon.vici"),
        ("vici_socket", "/a\x00b"),
        ("interval", 0),
        ("interval", True),
        ("interval", float("nan")),
        ("max_key_age", 300),
        ("startup_timeout", -1),
    ],
)
def test_binding_rejects_bad_values(key, value):
    with pytest.raises(BindingValueError) as info:
        binding(**{key: value})
    assert info.value.key == key


@pytest.fixture
def site_dir(tmp_path, any_backend):
    return write_demo_sites(tmp_path, any_backend)


IPSEC = {
    "name": '"t"',
    "connection": '"site-to-site"',
    "peer_site": '"site-b"',
    "local_sae": '"sae-a"',
    "remote_sae": '"sae-b"',
}


def ipsec_table(**changes: str | None) -> str:
    return toml_table("ipsec", IPSEC, **changes)


def test_ipsec_binding_loads(site_dir: Path):
    path = site_dir / "site-a.toml"
    path.write_text(
        path.read_text()
        + ipsec_table(interval="60", vici_socket='"/run/charon.vici"')
        + ipsec_table(name='"u"', connection='"other"', ppk_id='"ppk-u"')
    )
    first, second = load_config(path).ipsec
    assert (first.name, first.connection, first.ppk_id, first.interval) == (
        "t",
        "site-to-site",
        "t",
        60,
    )
    assert first.vici_socket == "/run/charon.vici"
    assert (second.ppk_id, second.vici_socket) == ("ppk-u", DEFAULT_VICI_SOCKET)


@pytest.mark.parametrize(
    ("changes", "key", "expected"),
    [
        ({"peer_site": '"site-c"'}, "ipsec[0].peer_site", "[[peers]]"),
        ({"local_sae": '"sae-x"'}, "ipsec[0].local_sae", "[[consumers]]"),
        ({"remote_sae": '"sae-x"'}, "ipsec[0].remote_sae", "remote_sae_ids of peer site-b"),
        ({"connection": '"a b"'}, "ipsec[0].connection", "swanctl.conf"),
        ({"ppk_id": '"a b"'}, "ipsec[0].ppk_id", "ppk_id as in swanctl.conf"),
        ({"vici_socket": '"charon.vici"'}, "ipsec[0].vici_socket", "absolute path"),
        ({"max_key_age": "300"}, "ipsec[0].max_key_age", "more than interval"),
        ({"interval": '"5"'}, "ipsec[0].interval", "positive number"),
        ({"connection": None}, "ipsec[0].connection", "required"),
        ({"interface": '"wg0"'}, "ipsec[0].interface", "no such key"),
    ],
)
def test_ipsec_errors_name_the_key(site_dir: Path, changes, key, expected):
    path = site_dir / "site-a.toml"
    error = config_error(path, ipsec_table(**changes))
    assert error.key == key, error
    assert expected in error.expected, error
    assert str(path) in str(error)


def test_site_host_example_ipsec_block_parses_once_uncommented(tmp_path, any_backend):
    text = site_host_example(tmp_path, any_backend)
    text = text.replace('remote_sae_ids = ["sae-b"]', 'remote_sae_ids = ["sae-b", "ipsec-b"]')
    start = text.index('# [[consumers]]\n# sae_id = "ipsec-a"')
    block = text[start:]
    text = text[:start] + "\n".join(line.removeprefix("# ") for line in block.splitlines())
    path = tmp_path / "qkdd.toml"
    path.write_text(text + "\n")
    (ipsec,) = load_config(path).ipsec
    assert (ipsec.connection, ipsec.ppk_id, ipsec.interval) == ("site-b", "qkdd-tunnel-a-b", 300)


@pytest.mark.parametrize(
    ("second", "key"),
    [({"connection": '"other"'}, "ipsec[].name"), ({"name": '"u"'}, "ipsec[].connection")],
)
def test_two_bindings_never_share_a_name_or_a_connection(site_dir: Path, second, key):
    path = site_dir / "site-a.toml"
    path.write_text(path.read_text() + ipsec_table() + ipsec_table(**second))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == key


def test_a_daemon_that_cannot_reach_charon_stops_with_one_plain_line(site_dir: Path, tmp_path):
    """Neither a PPK nor failing closed is possible: start-up fails, saying why."""
    backend = select_backend("auto")
    for site in (SITE_A, SITE_B):
        write_identity(site_dir / site.directory / "identity.key", backend)
        write_key_encryption_key(site_dir / site.directory / "kek.bin")
    path = site_dir / "site-a.toml"
    absent = tmp_path / "no-charon.vici"
    path.write_text(
        path.read_text()
        + ipsec_table(vici_socket=f'"{absent}"', startup_timeout="1", interval="10")
    )
    result = subprocess.run(
        [sys.executable, "-m", "qkdd.cli", "run", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=timeout(60),
        check=False,
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    (plain,) = [line for line in result.stderr.splitlines() if line.startswith("qkdd: ")]
    assert "binding t: could neither install a PPK" in plain
    assert f"cannot reach charon's VICI socket {absent}" in plain
    assert "event=ready" not in result.stderr


# --------------------------------------------------------------------------------------
# The PPK and the peer call


def lp(data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + data


def test_derive_ppk_is_the_documented_hkdf():
    material, key_id = bytes(range(32)), "3f1e9a4c-0000-4000-8000-000000000001"
    info = lp(b"qkdd/v1 ipsec postquantum preshared key") + lp(NAME.encode()) + lp(key_id.encode())
    expected = HKDF(hashes.SHA256(), 32, salt=None, info=info).derive(material)
    assert derive_ppk(material, NAME, key_id) == expected
    assert labels.LABEL_IPSEC_PPK in labels.ALL_LABELS


def test_derive_ppk_recorded_vector():
    ppk = derive_ppk(bytes(range(32)), NAME, "3f1e9a4c-0000-4000-8000-000000000001")
    assert ppk.hex() == RECORDED_PPK


RECORDED_PPK = "776187879538a52bd3295ffee8eb790252e843fffa7cded8a3697236e732ae7e"


def test_ppk_is_neither_the_hybrid_key_nor_a_wireguard_psk():
    material, key_id = os.urandom(32), str(uuid.uuid4())
    ppk = derive_ppk(material, NAME, key_id)
    assert ppk not in (material, derive_psk(material, NAME, key_id))
    assert ppk != derive_ppk(material, "other", key_id)
    assert ppk != derive_ppk(material, NAME, str(uuid.uuid4()))


def test_short_key_material_is_refused_without_showing_it():
    material = b"\xab" * 16
    with pytest.raises(KeyMaterialError, match="128 bits") as info:
        derive_ppk(material, NAME, "k")
    assert "ab" * 4 not in str(info.value)


def test_ipsec_install_body_byte_for_byte():
    key_id = "3f1e9a4c-0000-4000-8000-000000000001"
    body = IpsecInstall(NAME, key_id).encode()
    assert body == bytes([len(NAME)]) + NAME.encode() + uuid.UUID(key_id).bytes
    assert IpsecInstall.decode(body) == IpsecInstall(NAME, key_id)
    # Its own kind, with WG_INSTALL's layout.
    assert CallKind.IPSEC_INSTALL == 4
    assert body == WgInstall(NAME, key_id).encode()
    for bad in (body[:-1], body + b"\x00", b""):
        with pytest.raises(RemoteProtocolError):
            IpsecInstall.decode(bad)
    # The example in docs/protocol.md §5.1.1 is this body.
    doc = (Path(__file__).resolve().parent.parent / "docs" / "protocol.md").read_text()
    (example,) = re.findall(r"`((?:[0-9a-f]{2} ){26}[0-9a-f]{2})`", doc)
    assert bytes.fromhex(example) == body


def test_policy_runs_on_the_bindings_timers():
    b = binding(interval=10.0, max_key_age=60.0, startup_timeout=15.0)
    master = RotationPolicy.for_binding(b, drives_rotation=True, now=0)
    assert master.poll(0) is RotationAction.ROTATE
    master.fresh_installed(0, "k1")
    assert (master.wake_at(), master.fail_closed_at) == (10, 60)
    p = RotationPolicy.for_binding(b, drives_rotation=False, now=0)
    assert p.wake_at() == 15
    p.fresh_installed(0, "k1")
    assert p.poll(59.9) is RotationAction.WAIT and p.poll(60) is RotationAction.FAIL_CLOSED
    p.failed_closed(60)
    assert p.state(60) is KeyState.FAIL_CLOSED and p.key_id is None


# --------------------------------------------------------------------------------------
# Two sites in-process


def ppk_pool() -> KeyPool:
    """Both sites' stores for the binding's SAE pair (``key``: a key's PPK)."""
    return KeyPool(derive_ppk, NAME)


class ModelCharon:
    """Two charons joined by a tunnel, as the rotators see them (see the module
    docstring): each site's loaded PPK, and the IKE SA with the PPK it was authenticated
    with, replaced by a reauthentication only when both sites hold the same PPK."""

    def __init__(self) -> None:
        self.ppk: dict[str, bytes | None] = {SOCKET_A: None, SOCKET_B: None}
        self.ike_sa: tuple[int, bytes] | None = None
        self.next_id = 1
        self.loads: list[tuple[str, bytes, float]] = []
        self.tear_downs: list[tuple[str, float]] = []
        self.failing: dict[str, str] = {}
        self.reauth_hangs = False

    def _site(self, b: IpsecBinding) -> str:
        if b.vici_socket in self.failing:
            raise CharonUnreachableError(self.failing[b.vici_socket])
        return b.vici_socket

    async def install(self, b: IpsecBinding, ppk: bytes) -> None:
        await trio.lowlevel.checkpoint()
        site = self._site(b)
        self.ppk[site] = ppk
        self.loads.append((site, ppk, trio.current_time()))

    async def reauthenticate(self, b: IpsecBinding, *, wait: float) -> str:
        await trio.lowlevel.checkpoint()
        self._site(b)
        if self.reauth_hangs:
            await trio.sleep(wait)
            raise CharonError(f"no new IKE SA with a PPK was up within {wait:g} s")
        ppk_a, ppk_b = self.ppk[SOCKET_A], self.ppk[SOCKET_B]
        if ppk_a is None or ppk_a != ppk_b:
            raise CharonError("no new IKE SA with a PPK: AUTHENTICATION_FAILED")
        self.ike_sa = (self.next_id, ppk_a)
        self.next_id += 1
        return f"IKE SA #{self.ike_sa[0]} up with the PPK"

    async def tear_down(self, b: IpsecBinding) -> str:
        await trio.lowlevel.checkpoint()
        site = self._site(b)
        self.ppk[site] = None
        self.ike_sa = None  # the DELETE ends it at both ends
        self.tear_downs.append((site, trio.current_time()))
        return "PPK unloaded, 1 IKE SA(s) ended"

    def loaded(self, site: str) -> list[bytes]:
        return [ppk for s, ppk, _ in self.loads if s == site]


def ipsec_link(
    pool: KeyPool, master: IpsecBinding, charon: ModelCharon, **wiring: Any
) -> RotatorPair:
    """Master and slave rotators on ``charon`` (and ``announce_hook``)."""
    return RotatorPair(pool, PpkRotator, master, slave_binding(master), charon, **wiring)


def events(caplog: pytest.LogCaptureFixture, name: str) -> list[str]:
    return logged_events(caplog, "qkdd.ipsec", name)


async def test_both_sites_load_the_same_ppk_and_an_ike_sa_uses_it(autojump_clock):
    pool, charon = ppk_pool(), ModelCharon()
    pool.add(1)
    link = ipsec_link(pool, binding(**FAST), charon)
    master, slave = await link.first_install()
    key_id = pool.taken[0]
    assert master == slave == f"fresh key {key_id}"
    # The peer loads first, then the driving site, then the IKE SA is renewed.
    assert [site for site, _, _ in charon.loads] == [SOCKET_B, SOCKET_A]
    assert charon.ike_sa == (1, pool.key(key_id))
    assert link.states() == ("fresh", "fresh")
    assert link.master.status()["ike_sa"] == "IKE SA #1 up with the PPK"


async def test_every_interval_a_new_key_a_new_ppk_and_a_new_ike_sa(autojump_clock, nursery):
    pool, charon = ppk_pool(), ModelCharon()
    pool.add(10)
    link = ipsec_link(pool, binding(**FAST), charon)
    await link.first_install()
    nursery.start_soon(link.master.run)
    nursery.start_soon(link.slave.run)
    await trio.sleep(35)  # rotations at 10, 20, 30
    assert len(pool.taken) == 4
    ppks = [pool.key(k) for k in pool.taken]
    assert charon.loaded(SOCKET_A) == charon.loaded(SOCKET_B) == ppks
    assert len(set(ppks)) == 4
    assert charon.ike_sa == (4, ppks[-1])
    assert link.master.status()["key_id"] == link.slave.status()["key_id"] == pool.taken[-1]


async def test_an_ike_sa_that_does_not_come_up_is_a_failed_rotation(
    autojump_clock, nursery, caplog
):
    """The peer's charon holds another PPK (say its PPK was replaced by hand): the IKE SA
    on the previous PPK runs on, the rotation fails, is retried soon and logged once."""
    caplog.set_level(logging.INFO, "qkdd.ipsec")
    pool, charon = ppk_pool(), ModelCharon()
    pool.add(10)
    link = ipsec_link(pool, binding(**FAST), charon)
    await link.first_install()
    first_sa = charon.ike_sa
    original_install = charon.install

    async def peer_loads_garbage(b: IpsecBinding, ppk: bytes) -> None:
        await original_install(b, os.urandom(32) if b.vici_socket == SOCKET_B else ppk)

    charon.install = peer_loads_garbage  # type: ignore[method-assign]
    nursery.start_soon(link.master.run)
    await trio.sleep(25)  # a rotation at 10, retries every 5 s
    assert charon.ike_sa == first_sa
    assert link.master.status()["state"] == "stale"
    assert link.master.status()["key_id"] == pool.taken[0]
    assert link.master.status()["consecutive_failures"] >= 3
    assert "AUTHENTICATION_FAILED" in str(link.master.status()["last_error"])
    assert len(events(caplog, "ipsec_rotation_failed")) == 1
    charon.install = original_install  # type: ignore[method-assign]
    await trio.sleep(5)
    assert link.master.status()["state"] == "fresh"
    assert charon.ike_sa is not None and charon.ike_sa[1] == pool.key(pool.taken[-1])


async def test_fail_closed_after_max_key_age_then_recover(autojump_clock, nursery, caplog):
    caplog.set_level(logging.INFO, "qkdd.ipsec")
    pool, charon = ppk_pool(), ModelCharon()
    pool.add(1)
    link = ipsec_link(pool, binding(**FAST), charon)
    await link.first_install()
    fresh_at = charon.loads[-1][2]
    nursery.start_soon(link.master.run)
    nursery.start_soon(link.slave.run)
    await trio.sleep(59.5)
    assert link.states() == ("stale", "stale") and charon.ike_sa is not None
    await trio.sleep(100)  # well past max_key_age, many retries later
    assert link.states() == ("fail-closed", "fail-closed")
    assert charon.ppk == {SOCKET_A: None, SOCKET_B: None} and charon.ike_sa is None
    # Once per site, exactly at max_key_age, one log line each, however long the outage.
    assert sorted(site for site, _ in charon.tear_downs) == [SOCKET_A, SOCKET_B]
    assert [t - fresh_at for _, t in charon.tear_downs] == pytest.approx([60, 60], abs=0.01)
    lines = events(caplog, "ipsec_fail_closed")
    assert len(lines) == 2 and all(f"replaced={pool.taken[0]}" in line for line in lines)
    assert link.master.status()["ike_sa"] is None

    pool.add(1)
    await trio.sleep(6)  # the next retry
    assert charon.ike_sa is not None and charon.ike_sa[1] == pool.key(pool.taken[-1])
    assert link.states() == ("fresh", "fresh")
    assert len(events(caplog, "ipsec_recovered")) == 2


async def test_a_hung_reauthentication_does_not_delay_failing_closed(autojump_clock, nursery):
    pool, charon = ppk_pool(), ModelCharon()
    pool.add(20)
    link = ipsec_link(pool, binding(**FAST), charon)
    await link.first_install()
    fresh_at = charon.loads[-1][2]
    charon.reauth_hangs = True
    nursery.start_soon(link.master.run)
    await trio.sleep(61)
    assert link.master.status()["state"] == "fail-closed"
    assert charon.tear_downs[0][1] - fresh_at == pytest.approx(60, abs=0.01)


async def test_peer_outage_takes_no_key_and_is_logged_once(autojump_clock, nursery, caplog):
    caplog.set_level(logging.INFO, "qkdd.ipsec")
    pool, charon = ppk_pool(), ModelCharon()
    pool.add(5)
    link = ipsec_link(pool, binding(**FAST), charon)
    await link.first_install()
    link.peer_up = False
    nursery.start_soon(link.master.run)
    await trio.sleep(40)
    assert pool.taken == pool.taken[:1] and len(pool.ready) == 4
    assert link.master.status()["consecutive_failures"] >= 5
    assert len(events(caplog, "ipsec_rotation_failed")) == 1


async def test_master_first_install_fails_closed_after_startup_timeout(autojump_clock, caplog):
    caplog.set_level(logging.INFO, "qkdd.ipsec")
    pool, charon = ppk_pool(), ModelCharon()
    rotator = PpkRotator(
        binding(**FAST), installer=charon, take_fresh_key=pool.take_fresh_key, announce=_unused
    )
    start = trio.current_time()
    assert await rotator.first_install() == "no PPK (fail closed)"
    assert charon.tear_downs == [(SOCKET_A, pytest.approx(start + 15, abs=0.01))]
    (line,) = events(caplog, "ipsec_fail_closed")
    assert "startup_timeout" in line


async def _unused(key_id: str) -> None:
    raise AssertionError("not called: the pool is empty")


async def test_first_install_raises_if_charon_cannot_be_reached(autojump_clock):
    charon = ModelCharon()
    charon.failing[SOCKET_B] = "cannot reach charon's VICI socket /run/site-b/charon.vici"
    rotator = PpkRotator(slave_binding(binding(**FAST)), installer=charon)
    with pytest.raises(IpsecError, match="nor tear it down: cannot reach charon"):
        await rotator.first_install()


async def test_a_failed_install_at_the_peer_is_refused_and_fails_the_rotation(
    autojump_clock, caplog
):
    caplog.set_level(logging.INFO, "qkdd.ipsec")
    pool, charon = ppk_pool(), ModelCharon()
    pool.add(3)
    link = ipsec_link(pool, binding(**FAST), charon)
    charon.failing[SOCKET_B] = "cannot reach charon's VICI socket"
    with trio.move_on_after(3):
        await link.master.first_install()
    assert charon.loads == [] and charon.ike_sa is None
    assert "cannot reach charon" in events(caplog, "ipsec_install_failed")[0]
    assert "cannot reach charon" in events(caplog, "ipsec_rotation_failed")[0]


async def test_announced_key_is_refused_at_the_driving_site(autojump_clock):
    pool, charon = ppk_pool(), ModelCharon()
    link = ipsec_link(pool, binding(**FAST), charon)
    with pytest.raises(NotTheDrivingSiteError):
        await link.master.install_announced("k", os.urandom(32))


async def test_status_and_logs_never_show_key_material(autojump_clock, nursery, caplog):
    caplog.set_level(logging.DEBUG)
    pool, charon = ppk_pool(), ModelCharon()
    pool.add(3)
    link = ipsec_link(pool, binding(**FAST), charon)
    await link.first_install()
    nursery.start_soon(link.master.run)
    await trio.sleep(25)
    text = repr(link.master.status()) + repr(link.slave.status()) + caplog.text
    secrets_seen = [
        form
        for key_id in pool.taken
        for raw in (pool.material[key_id], pool.key(key_id))
        for form in (raw.hex(), base64.b64encode(raw).decode(), repr(raw))
        if form in text
    ]
    assert secrets_seen == []
    assert link.master.status()["key_id"] in text
