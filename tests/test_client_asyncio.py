"""The asyncio client (`AsyncioKeyClient`) against the real key service: the daemon's HTTP server
on a real Unix socket and its mutual-TLS listener on 127.0.0.1, run by Trio in this process
while the client runs in its own asyncio event loop in a worker thread."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio
from pki import Pki, make_pki
from test_etsi014_server import A, B, start_server
from test_etsi014_tls import start_service
from timeouts import timeout

from qkdd.client import (
    AsyncioKeyClient,
    BadResponse,
    KeyServiceClientError,
    KeyServiceUnreachable,
)
from qkdd.etsi014.handler import RequestHandler
from qkdd.etsi014.memory_pool import MemoryKeyPool
from qkdd.events import EventBus, event_routes
from qkdd.http_server.unix_socket import serve_unix

T = TypeVar("T")


async def in_asyncio(work: Callable[[], Awaitable[T]]) -> T:
    """Run `work()` in a fresh asyncio event loop in a worker thread, bounded in time."""

    async def bounded() -> T:
        async with asyncio.timeout(timeout(30)):
            return await work()

    return await trio.to_thread.run_sync(lambda: asyncio.run(bounded()))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


async def test_keys_status_and_errors_on_the_unix_socket(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    srv = await start_server(nursery, tmp_path)

    async def work() -> None:
        async with (
            AsyncioKeyClient(srv.path, sae_id=A) as master,
            AsyncioKeyClient(srv.path, sae_id=B) as slave,
        ):
            assert (await master.status(B))["stored_key_count"] == 5000
            keys = await master.enc_keys(B, number=3, size=512)
            assert [len(k.material) for k in keys] == [64] * 3
            assert await slave.dec_keys(A, [k.key_id for k in keys]) == keys
            with pytest.raises(KeyServiceClientError) as info:  # each key is handed out once
                await slave.dec_keys(A, [keys[0].key_id])
            assert info.value.status == 400
            with pytest.raises(KeyServiceClientError) as info:
                await master.enc_keys(B, size=12)
            assert info.value.status == 400 and "multiple of 8" in info.value.message
            assert info.value.details == [{"size": 12}]
            # Calls made at once share the kept-alive connection one after another.
            batches = await asyncio.gather(*(master.enc_keys(B, number=2) for _ in range(5)))
            assert len({k.key_id for batch in batches for k in batch}) == 10
            assert (await master.request("PUT", f"/api/v1/keys/{B}/enc_keys", b"{}"))[0] == 405

    await in_asyncio(work)
    # 512-bit keys are made of two of the pool's 256-bit keys each.
    assert srv.pool.status(A, B).stored_key_count == 5000 - 2 * 3 - 10
    assert len(srv.seen) == 2  # one connection per client, kept alive throughout
    srv.cancel.cancel()


async def test_503_carries_the_pool_reason(nursery: trio.Nursery, tmp_path: Path) -> None:
    srv = await start_server(nursery, tmp_path)
    srv.pool.unavailable = "QKD device /dev/ttyQKD0 is down"

    async def work() -> KeyServiceClientError:
        async with AsyncioKeyClient(srv.path, sae_id=A) as client:
            with pytest.raises(KeyServiceClientError) as info:
                await client.enc_keys(B)
            return info.value

    error = await in_asyncio(work)
    assert (error.status, error.message) == (503, "QKD device /dev/ttyQKD0 is down")
    srv.cancel.cancel()


async def test_reconnects_after_the_service_closed_an_idle_connection(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    srv = await start_server(nursery, tmp_path, request_timeout=0.2)

    async def work() -> int:
        async with AsyncioKeyClient(srv.path, sae_id=A) as client:
            await client.status(B)
            await asyncio.sleep(0.5)  # the service closes the idle connection meanwhile
            return len(await client.enc_keys(B, number=2))

    assert await in_asyncio(work) == 2
    assert srv.pool.status(A, B).stored_key_count == 4998
    assert len(srv.seen) == 2
    srv.cancel.cancel()


async def test_one_client_serves_one_event_loop_after_another(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    srv = await start_server(nursery, tmp_path)
    client = AsyncioKeyClient(srv.path, sae_id=A)

    def twice() -> list[int]:
        # Left open by the first loop's program; the second loop connects afresh.
        return [len(asyncio.run(client.enc_keys(B, number=n))) for n in (1, 2)]

    assert await trio.to_thread.run_sync(twice) == [1, 2]
    assert len(srv.seen) == 2
    srv.cancel.cancel()


async def test_missing_and_stale_sockets_are_reported_plainly(tmp_path: Path) -> None:
    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(stale))

    async def work() -> list[str]:
        errors = []
        for path in (tmp_path / "absent.sock", stale):
            with pytest.raises(KeyServiceUnreachable) as info:
                await AsyncioKeyClient(str(path)).status(B)
            errors.append(str(info.value))
        return errors

    missing, refused = await in_asyncio(work)
    assert "no such socket" in missing and "absent.sock" in missing
    assert "refused" in refused


async def junk_server(nursery: trio.Nursery, path: str, reply: bytes | None) -> None:
    """A Unix socket that reads a request and answers `reply` (None: never answers)."""
    sock = trio.socket.socket(socket.AF_UNIX)
    await sock.bind(path)
    sock.listen()

    async def serve(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)
        if reply is None:
            await trio.sleep_forever()
        await stream.send_all(reply)

    await nursery.start(trio.serve_listeners, serve, [trio.SocketListener(sock)])


async def test_garbage_is_a_bad_response_and_silence_a_timeout(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    junk, silent = str(tmp_path / "junk.sock"), str(tmp_path / "silent.sock")
    await junk_server(nursery, junk, b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nnot json!")
    await junk_server(nursery, silent, None)

    async def work() -> str:
        async with AsyncioKeyClient(junk, sae_id=A) as client:
            with pytest.raises(BadResponse):
                await client.enc_keys(B)
        async with AsyncioKeyClient(silent, timeout=0.3) as client:
            with pytest.raises(KeyServiceUnreachable) as info:
                await client.status(B)
            return str(info.value)

    assert "no answer from the key service" in await in_asyncio(work)
    nursery.cancel_scope.cancel()


async def test_events_stream(nursery: trio.Nursery, tmp_path: Path) -> None:
    bus = EventBus()
    pool = MemoryKeyPool([A, B])
    handler = RequestHandler(pool, extensions=event_routes(bus, lambda sae: sae in (A, B)))
    path = str(tmp_path / "api.sock")
    await nursery.start(partial(serve_unix, path, handler, lambda uid, gid: frozenset({A, B})))

    async def work() -> tuple[list[dict[str, Any]], int]:
        async with AsyncioKeyClient(path, sae_id=A) as client:
            got = []
            async for event in client.events(["link_up", "keys_available"]):
                got.append(event)
                if len(got) == 2:
                    break
            with pytest.raises(KeyServiceClientError) as info:
                async for _ in client.events(["no_such_kind"]):
                    pass
            return got, info.value.status

    async def publish_once_subscribed() -> None:
        with trio.fail_after(timeout(10)):
            while bus.subscriber_count == 0:
                await trio.sleep(0.01)
        bus.publish("link_down", peer_site="site-b", details={"reason": "test"})  # not asked
        bus.publish("link_up", peer_site="site-b")
        bus.publish("keys_available", master_sae=A, slave_sae=B, details={"added": 3})

    nursery.start_soon(publish_once_subscribed)
    events, refused = await in_asyncio(work)
    assert [e["event"] for e in events] == ["link_up", "keys_available"]
    assert events[1]["added"] == 3 and events[0]["seq"] < events[1]["seq"]
    assert refused == 400
    nursery.cancel_scope.cancel()


# -- over mutual TLS --------------------------------------------------------------------------


def tls_client(port: int, pki: Pki, who: Any, **kwargs: Any) -> AsyncioKeyClient:
    return AsyncioKeyClient.tls(
        "127.0.0.1", port, cert_file=who.cert, key_file=who.key, ca_file=pki.ca, **kwargs
    )


async def test_keys_over_mutual_tls(nursery: trio.Nursery, pki: Pki, tmp_path: Path) -> None:
    service = await start_service(nursery, pki, tmp_path)

    async def work() -> None:
        async with (
            tls_client(service.port, pki, pki.client_a) as master,
            tls_client(service.port, pki, pki.client_b) as slave,
            AsyncioKeyClient(service.unix_path) as local_b,
        ):
            keys = await master.enc_keys(B, number=3, size=256)
            assert await slave.dec_keys(A, [k.key_id for k in keys[:2]]) == keys[:2]
            assert await local_b.dec_keys(A, [keys[2].key_id]) == keys[2:]
            assert (await master.status(B))["stored_key_count"] == 97

    await in_asyncio(work)
    assert len(service.seen) == 2  # each TLS client connected and was identified once
    nursery.cancel_scope.cancel()


async def test_tls_failures_are_told_plainly(
    nursery: trio.Nursery, pki: Pki, tmp_path: Path
) -> None:
    service = await start_service(nursery, pki, tmp_path)

    async def work() -> tuple[str, str]:
        rogue = tls_client(service.port, pki, pki.rogue)
        async with rogue:
            with pytest.raises(KeyServiceUnreachable) as refused:
                await rogue.enc_keys(B)
        misnamed = tls_client(service.port, pki, pki.client_a, server_hostname="kme.example")
        async with misnamed:
            with pytest.raises(KeyServiceUnreachable) as untrusted:
                await misnamed.status(B)
        return str(refused.value), str(untrusted.value)

    refused, untrusted = await in_asyncio(work)
    assert "refused this client's TLS" in refused
    assert "not trusted" in untrusted
    assert service.pool.status(A, B).stored_key_count == 100
    nursery.cancel_scope.cancel()
