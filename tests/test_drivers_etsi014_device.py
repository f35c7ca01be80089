"""Etsi014Device against real KMEs (tests/kme_server.py: qkdd's own ETSI GS QKD 014 server
over mutual TLS on 127.0.0.1, with a MemoryKeyPool as the two sites' KMEs); plus its sans-IO
parts."""

from __future__ import annotations

import base64
import itertools
import logging
import random
import re
import socket
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
from cryptography.hazmat.primitives import serialization
from kme_server import A, B, start_kme
from pki import Credentials, Pki, make_pki, new_ca
from qkdd_drivers.base import FetchByIdDevice, QkdKey
from qkdd_drivers.kme import (
    Etsi014Device,
    KmeConfigError,
    KmeError,
    KmeResponseError,
    KmeUnreachableError,
    UnknownKeyIdsError,
    parse_key_container,
    parse_kme_url,
    parse_status,
)
from qkdd_drivers.kme.kme_errors import KME
from timeouts import timeout

from qkdd.client.roundtrip import Exchange
from qkdd.etsi014.key_pool import PoolKey
from qkdd.etsi014.memory_pool import MemoryKeyPool
from qkdd.keystore import KeyStore
from qkdd.link_device import StoreSink

KEK = bytes(range(32))


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


# -- what the daemon would plug into the device ------------------------------------------


class ReorderingPool(MemoryKeyPool):
    """Answers dec_keys with the keys in reverse order (the standard fixes no order)."""

    def take_for_slave(
        self, master_sae_id: str, slave_sae_id: str, key_ids: Sequence[str]
    ) -> list[PoolKey]:
        return super().take_for_slave(master_sae_id, slave_sae_id, key_ids)[::-1]


class SwappingPool(MemoryKeyPool):
    """Answers dec_keys with a key other than the one asked for."""

    def take_for_slave(
        self, master_sae_id: str, slave_sae_id: str, key_ids: Sequence[str]
    ) -> list[PoolKey]:
        keys = super().take_for_slave(master_sae_id, slave_sae_id, key_ids)
        return [PoolKey(str(uuid.uuid4()), keys[0].material), *keys[1:]]


@dataclass
class RecordingSink:
    """Records keys like the daemon's store; ``used`` keys count as consumed."""

    keys: dict[str, bytes] = field(default_factory=dict)
    used: int = 0
    failures: int = 0  # the next this many stores fail

    async def store_qkd_keys(self, keys: Sequence[QkdKey]) -> None:
        if self.failures:
            self.failures -= 1
            raise OSError("disk full")
        for key in keys:
            self.keys.setdefault(key.key_id, key.material)

    def qkd_keys_buffered(self) -> int:
        return len(self.keys) - self.used


def make_device(url: str, pki: Pki, who: Credentials, role: str, **options: Any) -> Etsi014Device:
    own, peer = (A, B) if role == "master" else (B, A)
    settings: dict[str, Any] = {
        "cert_file": who.cert,
        "key_file": who.key,
        "ca_file": pki.ca,
        "own_sae_id": own,
        "peer_sae_id": peer,
        "role": role,
        "poll_interval": 0.05,
        "reconnect_initial_delay": 0.05,
        "reconnect_max_delay": 0.4,
        "request_timeout": 3.0,
    }
    settings.update(options)
    return Etsi014Device(url, **settings)


async def until(predicate: Callable[[], bool], what: str, seconds: float = 5.0) -> None:
    with trio.move_on_after(timeout(seconds)):
        while not predicate():
            await trio.sleep(0.01)
        return
    pytest.fail(f"timed out waiting for {what}")


def down_events(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "qkdd.device" and r.getMessage().startswith("device.down")
    ]


def retry_delays(caplog: pytest.LogCaptureFixture) -> list[float]:
    found = (re.search(r"retry_in=(\S+)", message) for message in down_events(caplog))
    return [float(m.group(1)) for m in found if m]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- the two roles, end to end ------------------------------------------------------------


async def test_slave_fetches_by_id_the_keys_the_master_took(
    nursery: trio.Nursery, pki: Pki
) -> None:
    kme = await start_kme(nursery, pki)
    kme.pool.fill(A, B, 100)
    master_sink = RecordingSink()
    master = make_device(
        kme.url, pki, pki.client_a, "master", keys_per_request=16, buffer_target=40
    )
    await nursery.start(master.run, master_sink)
    await until(lambda: len(master_sink.keys) >= 40, "the master to fill its buffer")
    await until(lambda: master.status.keys_buffered == 60, "the master to report the KME's count")
    await trio.sleep(0.3)  # several polls: the buffer target holds
    assert len(master_sink.keys) == 40
    assert master.status.state == "up"
    assert master.status.keys_received == 40 and master.status.key_size_bits == 256
    assert f"{A} -> {B}" in master.status.detail
    # What the master took waits at the KME for the slave, under the same IDs.
    assert set(kme.pool.pending_key_ids(A, B)) == set(master_sink.keys)

    slave_sink = RecordingSink()
    slave = make_device(kme.url, pki, pki.client_b, "slave")
    assert isinstance(slave, FetchByIdDevice)
    await nursery.start(slave.run, slave_sink)
    await until(lambda: slave.status.state == "up", "the slave to be up")
    assert slave_sink.keys == {}  # the slave takes nothing on its own
    ids = list(master_sink.keys)
    random.shuffle(ids)
    await slave.fetch_keys(ids)  # 40 IDs, at most 16 per request
    assert slave_sink.keys == master_sink.keys
    assert slave.status.keys_received == 40
    assert kme.pool.pending_key_ids(A, B) == []

    # The daemon uses 25 keys: the master takes that many more, no more.
    master_sink.used = 25
    await until(lambda: len(master_sink.keys) == 65, "the master to refill its buffer")
    await trio.sleep(0.2)
    assert len(master_sink.keys) == 65


async def test_keys_flow_into_the_daemons_key_stores(
    nursery: trio.Nursery, pki: Pki, tmp_path: Path
) -> None:
    kme = await start_kme(nursery, pki, ReorderingPool([A, B], max_key_per_request=16))
    kme.pool.fill(A, B, 30)
    store_a = KeyStore(tmp_path / "a.db", KEK)
    store_b = KeyStore(tmp_path / "b.db", KEK)
    master = make_device(kme.url, pki, pki.client_a, "master", keys_per_request=8)
    slave = make_device(kme.url, pki, pki.client_b, "slave")
    # StoreSink cannot count its keys: the master takes what the KME has.
    await nursery.start(master.run, StoreSink(store_a, "site-b"))
    await nursery.start(slave.run, StoreSink(store_b, "site-a"))
    await until(lambda: store_a.qkd_key_count("site-b") == 30, "the master's store to fill")
    ids = store_a.oldest_qkd_key_ids("site-b", 30)
    await slave.fetch_keys(ids)
    assert store_b.get_qkd_keys("site-a", ids) == store_a.get_qkd_keys("site-b", ids)
    assert store_b.oldest_qkd_key_ids("site-a", 30) == ids  # stored in the order asked


async def test_keys_other_than_those_asked_for_are_refused(nursery: trio.Nursery, pki: Pki) -> None:
    kme = await start_kme(nursery, pki, SwappingPool([A, B]))
    kme.pool.fill(A, B, 2)
    handed = kme.pool.take_for_master(A, B, 2, 256)
    sink = RecordingSink()
    slave = make_device(kme.url, pki, pki.client_b, "slave")
    await nursery.start(slave.run, sink)
    with pytest.raises(KmeResponseError, match=f"not sent: {handed[0].key_id}; not asked for: "):
        await slave.fetch_keys([k.key_id for k in handed])
    assert sink.keys == {}


async def test_fetch_names_the_ids_the_kme_does_not_hold(nursery: trio.Nursery, pki: Pki) -> None:
    kme = await start_kme(nursery, pki)
    kme.pool.fill(A, B, 2)
    handed = kme.pool.take_for_master(A, B, 2, 256)  # what the master site's qkdd took
    sink = RecordingSink()
    slave = make_device(kme.url, pki, pki.client_b, "slave")
    with pytest.raises(KmeError, match="start run"):
        await slave.fetch_keys([handed[0].key_id])
    await nursery.start(slave.run, sink)
    unknown = [str(uuid.uuid4()), str(uuid.uuid4())]
    with pytest.raises(UnknownKeyIdsError) as info:
        await slave.fetch_keys([handed[0].key_id, unknown[0], handed[1].key_id, unknown[1]])
    assert info.value.key_ids == tuple(unknown)
    assert all(key_id in str(info.value) for key_id in unknown)
    assert handed[0].key_id not in str(info.value)
    assert f"master SAE {A!r}" in str(info.value)
    # The keys the KME did hold were stored all the same.
    assert sink.keys == {k.key_id: k.material for k in handed}
    # Asking again for a stored key is a no-op, not an error from the KME (it erased it).
    await slave.fetch_keys([handed[0].key_id])
    with pytest.raises(UnknownKeyIdsError) as single:
        await slave.fetch_keys([unknown[0]])
    assert single.value.key_ids == (unknown[0],)
    for bad in ("key-1", unknown[0].upper()):
        with pytest.raises(ValueError, match="canonical"):
            await slave.fetch_keys([bad])
    master = make_device(kme.url, pki, pki.client_a, "master")
    with pytest.raises(KmeConfigError, match="link slave"):
        await master.fetch_keys(unknown)


# -- faults ------------------------------------------------------------------------------


async def test_503_means_down_with_the_kmes_reason_then_backoff_and_recovery(
    nursery: trio.Nursery, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "qkdd.device")
    kme = await start_kme(nursery, pki)
    sink = RecordingSink()
    master = make_device(kme.url, pki, pki.client_a, "master")
    await nursery.start(master.run, sink)
    await until(lambda: master.status.state == "up", "up with an empty KME")
    assert "waiting for the QKD link" in master.status.detail
    assert master.status.keys_buffered == 0 and sink.keys == {}

    kme.pool.fill(A, B, 10)
    kme.pool.unavailable = "QKD link to site B is down"
    await until(lambda: len(retry_delays(caplog)) >= 5, "five failed attempts")
    assert master.status.state == "down"
    assert "QKD link to site B is down" in master.status.detail
    assert "503" in master.status.detail and "retrying in" in master.status.detail
    assert retry_delays(caplog)[:5] == [0.05, 0.1, 0.2, 0.4, 0.4]
    assert sink.keys == {}

    kme.pool.unavailable = None
    await until(lambda: len(sink.keys) == 10, "keys once the KME has them again")
    await until(lambda: master.status.state == "up", "up again")
    # After a recovery the backoff starts over.
    failures = len(retry_delays(caplog))
    kme.pool.fill(A, B, 1)
    kme.pool.unavailable = "again"
    await until(lambda: len(retry_delays(caplog)) > failures, "the next failure")
    assert retry_delays(caplog)[failures] == 0.05


async def test_kme_down_then_up_then_gone(
    nursery: trio.Nursery, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "qkdd.device")
    port = free_port()
    sink = RecordingSink()
    master = make_device(f"https://127.0.0.1:{port}", pki, pki.client_a, "master")
    await nursery.start(master.run, sink)  # returns after the first attempt
    assert master.status.state == "down"
    assert "connection refused" in master.status.detail
    assert f"127.0.0.1:{port}" in master.status.detail
    await until(lambda: len(down_events(caplog)) >= 3, "retries")

    pool = MemoryKeyPool([A, B])
    pool.fill(A, B, 5)
    kme = await start_kme(nursery, pki, pool, port)
    await until(lambda: len(sink.keys) == 5, "keys once the KME is up")
    await until(lambda: master.status.state == "up", "up")

    kme.scope.cancel()
    await until(lambda: master.status.state == "down", "down once the KME is gone")
    assert "connection refused" in master.status.detail


async def test_untrusted_kme_certificate(
    nursery: trio.Nursery, pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "qkdd.device")
    kme = await start_kme(nursery, pki)
    kme.pool.fill(A, B, 5)
    other_ca = tmp_path / "other-ca.crt"
    other_ca.write_bytes(new_ca("not the KME's CA").cert.public_bytes(serialization.Encoding.PEM))
    sink = RecordingSink()
    master = make_device(kme.url, pki, pki.client_a, "master", ca_file=str(other_ca))
    await nursery.start(master.run, sink)
    assert master.status.state == "down"
    assert "KME's certificate is not trusted" in master.status.detail
    assert "ca_file" in master.status.detail
    await until(lambda: len(down_events(caplog)) >= 3, "retries")
    assert sink.keys == {}


@pytest.mark.parametrize(
    ("who", "expected"),
    [
        ("rogue", "refused this client's certificate"),  # from a CA the KME does not trust
        ("stranger", "answered a status request with 401"),  # trusted, but no SAE
    ],
)
async def test_client_certificate_refused(
    nursery: trio.Nursery, pki: Pki, caplog: pytest.LogCaptureFixture, who: str, expected: str
) -> None:
    caplog.set_level(logging.INFO, "qkdd.device")
    kme = await start_kme(nursery, pki)
    kme.pool.fill(A, B, 5)
    master = make_device(kme.url, pki, getattr(pki, who), "master")
    await nursery.start(master.run, RecordingSink())
    assert master.status.state == "down"
    assert expected in master.status.detail
    await until(lambda: len(down_events(caplog)) >= 3, "retries")


async def test_settings_the_kme_contradicts(nursery: trio.Nursery, pki: Pki) -> None:
    kme = await start_kme(nursery, pki)
    kme.pool.fill(A, B, 5)
    wrong_sae = make_device(kme.url, pki, pki.client_a, "master", own_sae_id="SAE-X")
    await nursery.start(wrong_sae.run, RecordingSink())
    assert wrong_sae.status.state == "down"
    assert f"knows this client as SAE {A!r}, but own_sae_id is 'SAE-X'" in wrong_sae.status.detail
    too_small = make_device(kme.url, pki, pki.client_a, "master", key_size_bits=32)
    await nursery.start(too_small.run, RecordingSink())
    assert "serves keys of 64 to 8192 bits; key_size_bits = 32" in too_small.status.detail
    assert kme.pool.pending_key_ids(A, B) == []


async def test_a_non_uuid_key_id_is_refused(nursery: trio.Nursery, pki: Pki) -> None:
    numbers = itertools.count()
    pool = MemoryKeyPool([A, B], new_key_id=lambda: f"key-{next(numbers):04d}")
    pool.fill(A, B, 5)
    kme = await start_kme(nursery, pki, pool)
    sink = RecordingSink()
    master = make_device(kme.url, pki, pki.client_a, "master")
    await nursery.start(master.run, sink)
    await until(lambda: master.status.state == "down", "down")
    assert "key_ID 'key-0000', which is not a UUID" in master.status.detail
    assert sink.keys == {}


async def test_uppercase_key_ids_become_canonical(nursery: trio.Nursery, pki: Pki) -> None:
    pool = MemoryKeyPool([A, B], new_key_id=lambda: str(uuid.uuid4()).upper())
    pool.fill(A, B, 5)
    kme = await start_kme(nursery, pki, pool)
    sink = RecordingSink()
    await nursery.start(make_device(kme.url, pki, pki.client_a, "master").run, sink)
    await until(lambda: len(sink.keys) == 5, "keys")
    assert set(sink.keys) == {key_id.lower() for key_id in pool.pending_key_ids(A, B)}


async def test_keys_taken_are_kept_until_the_sink_stores_them(
    nursery: trio.Nursery, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "qkdd.device")
    kme = await start_kme(nursery, pki)
    kme.pool.fill(A, B, 10)
    sink = RecordingSink(failures=2)
    master = make_device(kme.url, pki, pki.client_a, "master", keys_per_request=10)
    await nursery.start(master.run, sink)
    await until(lambda: len(sink.keys) == 10, "keys stored at the third try")
    assert set(sink.keys) == set(kme.pool.pending_key_ids(A, B))  # none lost
    assert sum("KmeStoreError" in m and "disk full" in m for m in down_events(caplog)) == 2


async def test_no_key_material_in_logs_status_or_errors(
    nursery: trio.Nursery, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    kme = await start_kme(nursery, pki)
    kme.pool.fill(A, B, 20)
    master_sink, slave_sink = RecordingSink(), RecordingSink()
    master = make_device(kme.url, pki, pki.client_a, "master", keys_per_request=7)
    slave = make_device(kme.url, pki, pki.client_b, "slave")
    await nursery.start(master.run, master_sink)
    await nursery.start(slave.run, slave_sink)
    await until(lambda: len(master_sink.keys) == 20, "keys")
    texts = [repr(master), repr(master.status), master.status.detail]
    with pytest.raises(UnknownKeyIdsError) as info:
        await slave.fetch_keys([*master_sink.keys, str(uuid.uuid4())])
    texts.append(str(info.value))
    kme.pool.fill(A, B, 1)
    kme.pool.unavailable = "link down"
    await until(lambda: master.status.state == "down", "down")
    texts += [master.status.detail, repr(slave.status)]
    logged = [r.getMessage() for r in caplog.records if r.name == "qkdd.device"]
    assert any("device.keys" in m for m in logged)  # debug events were captured
    assert all("\n" not in m for m in logged)
    everything = "\n".join(texts + [r.getMessage() for r in caplog.records])
    assert slave_sink.keys == master_sink.keys
    for material in master_sink.keys.values():
        for form in (material.hex(), base64.b64encode(material).decode(), repr(material)[2:-1]):
            assert form not in everything


# -- sans-IO parts ------------------------------------------------------------------------


def test_kme_urls() -> None:
    plain = parse_kme_url("https://kme-a.example")
    assert (plain.host, plain.port, plain.api_path) == ("kme-a.example", 443, "/api/v1/keys/")
    assert plain.target("SAE B/1", "enc_keys") == "/api/v1/keys/SAE%20B%2F1/enc_keys"
    prefixed = parse_kme_url("https://[::1]:8443/gw/kme/")
    assert (prefixed.host, prefixed.port, prefixed.host_header) == ("::1", 8443, "[::1]:8443")
    assert prefixed.api_path == "/gw/kme/api/v1/keys/"
    assert parse_kme_url("https://k:1/api/v1/keys/").api_path == "/api/v1/keys/"
    for bad, words in [
        ("http://kme", "https://"),
        ("https://", "no host"),
        ("https://kme/?a=1", "without user, query"),
        ("https://u:p@kme", "without user, query"),
        ("https://kme:99999", "not valid"),
    ]:
        with pytest.raises(KmeConfigError, match=re.escape(words)):
            parse_kme_url(bad)


def _container(*entries: object) -> bytes:
    import json

    return json.dumps({"keys": list(entries)}).encode()


def test_key_containers() -> None:
    key_id = str(uuid.uuid4())
    material = bytes(range(1, 33))
    encoded = base64.b64encode(material).decode()
    (key,) = parse_key_container(_container({"key_ID": key_id.upper(), "key": encoded}))
    assert key == QkdKey(key_id, material)
    cases: list[tuple[bytes, str]] = [
        (b"not json", "not valid JSON"),
        (b"[]", "not a JSON object"),
        (b'{"keys": []}', "no non-empty 'keys'"),
        (_container("x"), "entry 0"),
        (_container({"key_ID": key_id[:-1], "key": encoded}), "not a UUID"),
        (_container({"key_ID": "{" + key_id + "}", "key": encoded}), "not a UUID"),
        (_container({"key_ID": 7, "key": encoded}), "key_ID 7, which is not a UUID"),
        (_container({"key_ID": key_id, "key": encoded[:-2] + "*="}), "not valid base64"),
        (_container({"key_ID": key_id}), "no 'key' string"),
        (_container({"key_ID": key_id, "key": ""}), "is empty"),
        (
            _container({"key_ID": key_id, "key": encoded}, {"key_ID": key_id, "key": encoded}),
            "twice",
        ),
    ]
    for body, words in cases:
        with pytest.raises(KmeResponseError, match=re.escape(words)) as info:
            parse_key_container(body)
        assert encoded[:8] not in str(info.value)


def test_status_objects() -> None:
    st = parse_status(b'{"key_size": 256, "stored_key_count": 3, "source_KME_ID": "K1"}')
    assert (st.key_size, st.stored_key_count, st.source_kme_id) == (256, 3, "K1")
    assert st.max_key_per_request is None
    for body, words in [
        (b'{"stored_key_count": 3}', "key_size = None"),
        (b'{"key_size": 256, "stored_key_count": -1}', "stored_key_count = -1"),
        (b'{"key_size": 256, "stored_key_count": true}', "stored_key_count = True"),
        (b'{"key_size": 0, "stored_key_count": 1}', "key_size 0"),
    ]:
        with pytest.raises(KmeResponseError, match=re.escape(words)):
            parse_status(body)


def test_http_exchange_without_io() -> None:
    http = Exchange("kme:443", KME)
    wire = http.request("POST", "/api/v1/keys/B/enc_keys", b'{"number": 1}')
    assert wire.startswith(b"POST /api/v1/keys/B/enc_keys HTTP/1.1\r\n")
    assert b"Host: kme:443\r\n" in wire and wire.endswith(b'{"number": 1}')
    answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"
    results = [http.receive(answer[i : i + 1]) for i in range(len(answer))]
    assert results[:-1] == [None] * (len(answer) - 1) and results[-1] == (200, b"{}")
    assert http.next_cycle()
    http.request("GET", "/", None)
    with pytest.raises(KmeUnreachableError, match="the KME closed the connection before answering"):
        http.receive(b"")
    garbage = Exchange("kme", KME)
    garbage.request("GET", "/", None)
    with pytest.raises(KmeResponseError, match="malformed HTTP from the KME"):
        garbage.receive(b"SSH-2.0-OpenSSH\r\n\r\n")


def test_configuration_errors_show_at_construction(pki: Pki, tmp_path: Path) -> None:
    missing = str(tmp_path / "absent.crt")
    with pytest.raises(KmeConfigError, match=re.escape(missing)):
        make_device("https://kme", pki, Credentials(missing, pki.client_a.key), "master")
    with pytest.raises(KmeConfigError, match="key must belong"):
        make_device("https://kme", pki, Credentials(pki.client_a.cert, pki.client_b.key), "master")
    with pytest.raises(KmeConfigError, match="CA file not found"):
        make_device("https://kme", pki, pki.client_a, "master", ca_file=missing)
    with pytest.raises(ValueError, match="role"):
        make_device("https://kme", pki, pki.client_a, "primary")
    with pytest.raises(ValueError, match="two different"):
        make_device("https://kme", pki, pki.client_a, "master", peer_sae_id=A)
