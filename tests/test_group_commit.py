"""Group commit (``qkdd.durability``): the daemon's store commits without an fsync, and
one fdatasync of its WAL makes every earlier commit durable before anything leaves the
process. Real SQLite stores, the real API server on a Unix socket and two real peer links
over TCP, all in the test's Trio loop; fdatasync is wrapped to count and order the syncs."""

from __future__ import annotations

import base64
import contextlib
import errno
import json
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
import trio.testing
from key_blocks import ids_of, random_block
from link_pair import qkd_keys
from timeouts import timeout

from qkdd import durability
from qkdd.client import KeyClient, KeyServiceUnreachable
from qkdd.config import SiteConfig, load_config
from qkdd.crypto.select import select_backend
from qkdd.demo import prepare_directory
from qkdd.demo_sites import SITE_A, SITE_B
from qkdd.durability import DurabilityLost, GroupCommit
from qkdd.etsi014.hand_outs import GatheredHandOuts
from qkdd.etsi014.handler import RequestHandler
from qkdd.etsi014.key_pool import PoolKey
from qkdd.http_server.unix_socket import serve_unix
from qkdd.identity import load_identity
from qkdd.keystore import KeyStore
from qkdd.peer.calls import WgInstall
from qkdd.peer.connection import PeerConnection
from qkdd.peer_listener import serve_peers
from qkdd.peering import PeerLink, StoreSink
from qkdd.rotation.tunnel_wiring import install_handler
from qkdd.store_pool import StoreKeyPool
from qkdd.wireguard.psk_rotator import PskRotator
from qkdd.wireguard.wireguard_binding import WireGuardBinding
from qkdd.wireguard.wireguard_wiring import WG_INSTALL_CALL

KEK = bytes(range(32))
CALLERS = 64


@dataclass
class Live:
    config: SiteConfig


@dataclass
class Syncs:
    """fdatasync, wrapped: each call and the store's commit count it covers, in order with
    the other events a test records."""

    store: KeyStore | None = None
    events: list[tuple[str, int]] = field(default_factory=list)
    # Called in the worker thread before each real fdatasync (e.g. to hold the first one).
    before: Callable[[int], None] = lambda n: None
    fail: bool = False

    @property
    def count(self) -> int:
        return sum(1 for kind, _ in self.events if kind == "synced")

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        real = os.fdatasync

        def fdatasync(fd: int) -> None:
            # Every commit counted now has written its frames: this sync covers them.
            covered = self.store.commits if self.store is not None else 0
            self.before(self.count)
            if self.fail:
                raise OSError(errno.EIO, "Input/output error")
            real(fd)
            self.events.append(("synced", covered))

        monkeypatch.setattr(os, "fdatasync", fdatasync)


@pytest.fixture
def syncs(monkeypatch: pytest.MonkeyPatch) -> Syncs:
    recorded = Syncs()
    recorded.install(monkeypatch)
    return recorded


def filled_store(path: Path, group_commit: bool | None, keys: int = 500) -> KeyStore:
    store = (
        KeyStore(path, KEK)
        if group_commit is None
        else KeyStore(path, KEK, group_commit=group_commit)
    )
    batch = store.next_batch_id(SITE_B.site_id)
    store.add_batch(SITE_B.site_id, batch, [random_block(keys, SITE_A.sae_id, SITE_B.sae_id)], [])
    store.commit_batch(SITE_B.site_id, batch)
    return store


@dataclass
class Api:
    path: str
    store: KeyStore
    barrier: GroupCommit
    # Per server task: the store's commit count right after its hand-out.
    taken_at: dict[object, int]


@pytest.fixture
async def api(tmp_path: Path, nursery: trio.Nursery, syncs: Syncs) -> AsyncIterator[Api]:
    config = load_config(prepare_directory(tmp_path)[SITE_A.site_id])
    store = filled_store(tmp_path / "keys.sqlite3", group_commit=True)
    syncs.store = store
    # Every sync in a worker thread, so a test can hold one while the loop serves on.
    barrier = GroupCommit(store, inline_when_idle=False)
    pool = StoreKeyPool(Live(config), store, lambda site: None)
    taken_at: dict[object, int] = {}
    take = pool.take_for_master

    def recording_take(master: str, slave: str, number: int, size: int) -> list[PoolKey]:
        keys = take(master, slave, number, size)
        taken_at[trio.lowlevel.current_task()] = store.commits
        return keys

    pool.take_for_master = recording_take  # type: ignore[method-assign,assignment]
    path = str(tmp_path / "api.sock")
    grant = frozenset({SITE_A.sae_id})
    await nursery.start(
        lambda task_status: serve_unix(
            path,
            RequestHandler(pool),
            lambda uid, gid: grant,
            before_send=barrier.durable,
            task_status=task_status,
        )
    )
    yield Api(path, store, barrier, taken_at)
    barrier.close()
    store.close()


def hold_next_sync_until(syncs: Syncs, commits: int) -> Callable[[int], None]:
    """Hold the next fdatasync (in its worker thread) until the store has counted
    ``commits`` commits, so every other hand-out commits while it runs."""
    store, first = syncs.store, syncs.count
    assert store is not None

    def before(done: int) -> None:
        if done != first:
            return
        give_up = time.monotonic() + timeout(20)
        while store.commits < commits and time.monotonic() < give_up:
            time.sleep(0.001)

    return before


async def enc_keys_from_many(api: Api, callers: int) -> list[str]:
    ids: list[str] = []

    async def caller() -> None:
        async with KeyClient(api.path, sae_id=SITE_A.sae_id) as client:
            ids.extend(key.key_id for key in await client.enc_keys(SITE_B.sae_id, number=1))

    with trio.fail_after(timeout(30)):
        async with trio.open_nursery() as callers_nursery:
            for _ in range(callers):
                callers_nursery.start_soon(caller)
    return ids


async def test_concurrent_hand_outs_share_fdatasyncs(api: Api, syncs: Syncs) -> None:
    await api.barrier.durable()  # the store's own set-up writes
    before = syncs.count
    syncs.before = hold_next_sync_until(syncs, api.store.commits + CALLERS)
    ids = await enc_keys_from_many(api, CALLERS)
    assert len(set(ids)) == CALLERS
    # The first hand-out's sync, then one for the 63 that committed while it ran.
    assert syncs.count - before == 2
    assert api.barrier.syncs == syncs.count


async def test_no_answer_leaves_before_its_hand_out_is_durable(
    api: Api, syncs: Syncs, monkeypatch: pytest.MonkeyPatch
) -> None:
    syncs.before = hold_next_sync_until(syncs, api.store.commits + CALLERS)
    sent: list[tuple[object, int]] = []  # (server task, commit count of its hand-out)
    send_all = trio.SocketStream.send_all

    async def recording_send_all(self: trio.SocketStream, data: bytes) -> None:
        if bytes(data[:9]) == b"HTTP/1.1 ":  # the server answering, not a client asking
            task = trio.lowlevel.current_task()
            taken = api.taken_at.get(task)
            if taken is not None:
                durable_up_to = max((n for kind, n in syncs.events if kind == "synced"), default=0)
                sent.append((task, taken))
                assert taken <= durable_up_to, "an answer left before its commit was synced"
        await send_all(self, data)

    monkeypatch.setattr(trio.SocketStream, "send_all", recording_send_all)
    ids = await enc_keys_from_many(api, CALLERS)
    assert len(ids) == CALLERS and len(sent) == CALLERS


async def test_a_failed_sync_withholds_the_answer_and_every_later_one(
    api: Api, syncs: Syncs
) -> None:
    await api.barrier.durable()
    syncs.fail = True
    with trio.fail_after(timeout(10)):
        async with KeyClient(api.path, sae_id=SITE_A.sae_id) as client:
            with pytest.raises(KeyServiceUnreachable):  # no answer at all
                await client.enc_keys(SITE_B.sae_id, number=1)
    syncs.fail = False  # a sync that now succeeds proves nothing: the pages may be gone
    api.store.allow_bootstrap(SITE_B.site_id)
    with pytest.raises(DurabilityLost):
        await api.barrier.durable()
    with pytest.raises(DurabilityLost), trio.fail_after(timeout(10)):
        await api.barrier.watch()


async def test_barrier_returns_at_once_when_nothing_was_written(
    tmp_path: Path, syncs: Syncs
) -> None:
    store = filled_store(tmp_path / "keys.sqlite3", group_commit=True)
    syncs.store = store
    barrier = GroupCommit(store)
    await barrier.durable()
    assert syncs.count == 1
    with trio.testing.assert_no_checkpoints():  # not even a trip to the worker thread
        for _ in range(3):
            await barrier.durable()
    store.ready_count(SITE_A.sae_id, SITE_B.sae_id)  # reads commit nothing
    await barrier.durable()
    assert syncs.count == 1
    store.take_ready(SITE_A.sae_id, SITE_B.sae_id, 1)
    await barrier.durable()
    assert syncs.count == 2 and syncs.events[-1] == ("synced", store.commits)
    barrier.close()
    store.close()


async def test_a_lone_callers_sync_skips_the_worker_thread(
    tmp_path: Path, syncs: Syncs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no other task ready to run, the loop would only wait for the thread: the
    sync runs in the loop's own thread instead (two wake-ups fewer per lone hand-out)."""
    store = filled_store(tmp_path / "keys.sqlite3", group_commit=True)
    syncs.store = store
    barrier = GroupCommit(store)
    await barrier.durable()

    async def no_thread(*args: object, **kwargs: object) -> None:
        raise AssertionError("a lone sync went to a worker thread")

    monkeypatch.setattr(trio.to_thread, "run_sync", no_thread)
    store.take_ready(SITE_A.sae_id, SITE_B.sae_id, 1)
    await barrier.durable()
    assert syncs.events[-1] == ("synced", store.commits)
    barrier.close()
    store.close()


@pytest.fixture
async def gathered_api(
    tmp_path: Path, nursery: trio.Nursery, syncs: Syncs
) -> AsyncIterator[tuple[Api, GatheredHandOuts, dict[str, int]]]:
    """The API as the daemon serves it: enc_keys hand-outs gathered into blocks. Also: for
    each key handed out, the store's commit count once its block committed."""
    config = load_config(prepare_directory(tmp_path)[SITE_A.site_id])
    store = filled_store(tmp_path / "keys.sqlite3", group_commit=True)
    syncs.store = store
    barrier = GroupCommit(store, inline_when_idle=False)
    pool = StoreKeyPool(Live(config), store, lambda site: None)
    committed_in: dict[str, int] = {}
    in_block: list[str] = []
    take = pool.take_for_master

    def recording_take(master: str, slave: str, number: int, size: int) -> list[PoolKey]:
        keys = take(master, slave, number, size)
        in_block.extend(key.key_id for key in keys)
        return keys

    @contextlib.contextmanager
    def recording_block() -> Iterator[None]:
        with store.handing_out():
            yield
        committed_in.update(dict.fromkeys(in_block, store.commits))
        in_block.clear()

    pool.take_for_master = recording_take  # type: ignore[method-assign,assignment]
    hand_outs = GatheredHandOuts(recording_block, barrier)
    path = str(tmp_path / "api.sock")
    grant = frozenset({SITE_A.sae_id})
    await nursery.start(
        lambda task_status: serve_unix(
            path,
            RequestHandler(pool, hand_outs=hand_outs),
            lambda uid, gid: grant,
            before_send=barrier.durable,
            task_status=task_status,
        )
    )
    yield Api(path, store, barrier, {}), hand_outs, committed_in
    barrier.close()
    store.close()


async def test_gathered_hand_outs_are_durable_before_any_answer_and_share_syncs(
    gathered_api: tuple[Api, GatheredHandOuts, dict[str, int]],
    syncs: Syncs,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    api, hand_outs, committed_in = gathered_api
    await api.barrier.durable()  # the store's own set-up writes
    before = syncs.count

    def hold(done: int) -> None:
        """The first sync waits until every other caller waits for its keys."""
        give_up = time.monotonic() + timeout(20)
        while (
            done == before
            and len(committed_in) + hand_outs.waiting < CALLERS
            and time.monotonic() < give_up
        ):
            time.sleep(0.001)

    syncs.before = hold
    answered: list[str] = []
    send_all = trio.SocketStream.send_all

    async def recording_send_all(self: trio.SocketStream, data: bytes) -> None:
        if bytes(data[:13]) == b"HTTP/1.1 200 ":  # the server answering with keys
            body = bytes(data).split(b"\r\n\r\n", 1)[1]
            ids = [key["key_ID"] for key in json.loads(body)["keys"]]
            durable_up_to = max((n for kind, n in syncs.events if kind == "synced"), default=0)
            for key_id in ids:
                assert committed_in[key_id] <= durable_up_to, "an answer left before its sync"
            answered.extend(ids)
        await send_all(self, data)

    monkeypatch.setattr(trio.SocketStream, "send_all", recording_send_all)
    ids = await enc_keys_from_many(api, CALLERS)
    assert len(set(ids)) == CALLERS and sorted(answered) == sorted(ids)
    # The first block's sync, then one for all the others, handed out in one block while
    # it ran.
    assert syncs.count - before == 2
    assert hand_outs.hand_outs == CALLERS and hand_outs.blocks == 2


async def test_a_sync_asked_for_inline_stays_in_the_loops_thread_while_syncs_are_fast(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With other tasks ready to run, a sync goes to a worker thread, unless its caller
    asks for it inline and syncs have lately been fast. (fdatasync is replaced by a wait
    of a set length: how fast the real disk is cannot be set.)"""
    store = filled_store(tmp_path / "keys.sqlite3", group_commit=True)
    barrier = GroupCommit(store)
    to_thread = trio.to_thread.run_sync
    threaded: list[int] = []

    async def counting(fn: Callable[[], int], **kwargs: object) -> int:
        threaded.append(barrier.syncs)
        return await to_thread(fn)

    monkeypatch.setattr(trio.to_thread, "run_sync", counting)
    # A sync "takes" what the test says on a clock of its own: measured on the real clock,
    # a loaded machine would make a no-op sync look slow.
    takes = [0.0]
    clock = [0.0]

    def timed_fdatasync(fd: int) -> None:
        clock[0] += takes[0]

    monkeypatch.setattr(os, "fdatasync", timed_fdatasync)
    monkeypatch.setattr(durability, "_sync_clock", lambda: clock[0])

    async def sync_with_others_ready(inline: bool = True) -> None:
        store.take_ready(SITE_A.sae_id, SITE_B.sae_id, 1)
        async with trio.open_nursery() as nursery:
            for _ in range(3):  # keep the run queue busy while the barrier decides
                nursery.start_soon(trio.lowlevel.checkpoint)
            await barrier.durable(inline=inline)

    await sync_with_others_ready(inline=False)  # 0: in a worker, as always
    await sync_with_others_ready()  # 1: fast, in the loop's thread
    takes[0] = 0.02
    await sync_with_others_ready()  # 2: still in the loop's: the last syncs were fast
    await sync_with_others_ready()  # 3: now in a worker
    takes[0] = 0.0
    for _ in range(8):  # fast again: back in the loop's thread once the average is down
        await sync_with_others_ready()
    assert barrier.syncs == 12
    assert threaded[:2] == [0, 3] and threaded[-1] < 11
    barrier.close()
    store.close()


async def test_without_group_commit_every_commit_syncs_itself(tmp_path: Path, syncs: Syncs) -> None:
    store = filled_store(tmp_path / "keys.sqlite3", group_commit=None)  # as the CLI opens it
    assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL, as before
    barrier = GroupCommit(store)
    assert store.take_ready(SITE_A.sae_id, SITE_B.sae_id, 1)
    await barrier.durable()
    assert syncs.count == 0  # SQLite synced the commit itself
    barrier.close()
    store.close()
    daemon_like = KeyStore(tmp_path / "daemon.sqlite3", KEK, group_commit=True)
    assert daemon_like._db.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    daemon_like.close()


async def test_device_keys_are_durable_before_the_driver_acknowledges_them(
    tmp_path: Path, syncs: Syncs
) -> None:
    store = KeyStore(tmp_path / "keys.sqlite3", KEK, group_commit=True)
    syncs.store = store
    barrier = GroupCommit(store)
    sink = StoreSink(store, SITE_B.site_id, durable=barrier.durable)
    keys = qkd_keys(8)
    await sink.store_qkd_keys(keys)  # type: ignore[arg-type]
    # Returning is the driver's cue to acknowledge: by then the keys were synced.
    assert syncs.events and syncs.events[-1] == ("synced", store.commits)
    assert store.qkd_key_count(SITE_B.site_id) == 8
    barrier.close()
    store.close()


async def test_nothing_reaches_the_peer_before_the_writes_it_reports_are_durable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two sites' links over TCP agree keys from the same QKD keys: at every send to the
    peer (handshake and session), whatever that site's store committed is synced."""
    configs = prepare_directory(tmp_path)
    backend = select_backend("cryptography")
    stores: list[KeyStore] = []
    links: dict[str, PeerLink] = {}
    barriers: dict[str, GroupCommit] = {}
    shared = qkd_keys(600)
    for site in (SITE_A, SITE_B):
        config = load_config(configs[site.site_id])
        store = KeyStore(tmp_path / f"{site.site_id}.sqlite3", KEK, group_commit=True)
        store.store_qkd_keys(config.peers[0].site_id, shared)
        barriers[site.site_id] = barrier = GroupCommit(store)
        stores.append(store)
        links[site.site_id] = PeerLink(
            config,
            config.peers[0],
            store=store,
            backend=backend,
            signing_key=load_identity(config.identity_key, backend),
            durable=barrier.durable,
        )
    config_b = links[SITE_B.site_id].config
    slave_port = config_b.listen[1]
    synced_up_to: dict[int, int] = {id(barrier): 0 for barrier in barriers.values()}
    real_fdatasync = os.fdatasync
    lock = threading.Lock()

    def recording_fdatasync(fd: int) -> None:
        barrier = next(b for b in barriers.values() if b._wal_fd == fd)
        covered = barrier._store.commits  # commits counted now are written: the sync has them
        real_fdatasync(fd)
        with lock:
            synced_up_to[id(barrier)] = max(synced_up_to[id(barrier)], covered)

    monkeypatch.setattr(os, "fdatasync", recording_fdatasync)
    # What each store had committed when a task took bytes to send from its connection:
    # the bytes may tell the peer of any of it (later commits are other tasks' business).
    produced_at: dict[object, dict[int, int]] = {}
    data_to_send = PeerConnection.data_to_send

    def recording_data_to_send(self: PeerConnection) -> bytes:
        produced_at[trio.lowlevel.current_task()] = {
            id(barrier): barrier._store.commits for barrier in barriers.values()
        }
        return data_to_send(self)

    monkeypatch.setattr(PeerConnection, "data_to_send", recording_data_to_send)
    sends = {"master": 0, "slave": 0}
    send_all = trio.SocketStream.send_all

    async def checked_send_all(self: trio.SocketStream, data: bytes) -> None:
        port = self.socket.getsockname()[1]
        side = "slave" if port == slave_port else "master"
        barrier = barriers[SITE_B.site_id if side == "slave" else SITE_A.site_id]
        committed = produced_at[trio.lowlevel.current_task()][id(barrier)]
        assert committed <= synced_up_to[id(barrier)], f"the {side} sent before a sync"
        sends[side] += 1
        await send_all(self, data)

    monkeypatch.setattr(trio.SocketStream, "send_all", checked_send_all)
    master, slave = links[SITE_A.site_id], links[SITE_B.site_id]
    with trio.fail_after(timeout(60)):
        async with trio.open_nursery() as nursery:
            await nursery.start(
                lambda task_status: serve_peers(
                    config_b,
                    {SITE_A.site_id: slave},
                    backend,
                    load_identity(config_b.identity_key, backend),
                    durable=barriers[SITE_B.site_id].durable,
                    task_status=task_status,
                )
            )
            nursery.start_soon(master.dial_forever)
            # Until both sites hold ready keys: batches stored, acknowledged, committed.
            while not all(store.ready_count(SITE_A.sae_id, SITE_B.sae_id) for store in stores):
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    assert sends["master"] > 2 and sends["slave"] > 2
    for barrier in barriers.values():
        barrier.close()
    for store in stores:
        store.close()


async def test_a_psk_is_installed_only_once_its_taking_is_durable(
    tmp_path: Path, syncs: Syncs
) -> None:
    """At the link slave a WG_INSTALL call takes the named key (erasing it) and installs
    it: the erasure is synced before ``wg`` sees the key."""
    store = KeyStore(tmp_path / "keys.sqlite3", KEK, group_commit=True)
    syncs.store = store
    block = random_block(4, "wg-a", "wg-b")
    store.add_batch("site-a", 1, [block], [])
    store.commit_batch("site-a", 1)
    barrier = GroupCommit(store)
    installed: list[tuple[int, int]] = []  # (commits at install, commits synced by then)

    class Installer:
        async def install(self, interface: str, peer_public_key: str, psk: bytes) -> None:
            synced = max((n for kind, n in syncs.events if kind == "synced"), default=0)
            installed.append((store.commits, synced))

        async def install_ending_session(
            self, interface: str, peer_public_key: str, psk: bytes
        ) -> None:
            raise AssertionError("not a fail-closed install")

    binding = WireGuardBinding(
        name="tunnel",
        interface="wg-b",
        peer_public_key=base64.b64encode(bytes(32)).decode(),
        peer_site="site-a",
        local_sae="wg-b",
        remote_sae="wg-a",
    )
    rotator = PskRotator(binding, installer=Installer())
    handle = install_handler(WG_INSTALL_CALL, "site-a", store, {"tunnel": rotator}, barrier.durable)
    await handle(WgInstall("tunnel", ids_of(block)[0]).encode())
    assert len(installed) == 1
    at_install, synced = installed[0]
    assert at_install <= synced, "the PSK was installed before its taking was synced"
    barrier.close()
    store.close()
