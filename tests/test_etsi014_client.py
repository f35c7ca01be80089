"""The Trio and blocking clients against a real server on a Unix socket."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import trio
from test_client_asyncio import in_asyncio, junk_server
from test_etsi014_server import A, B, start_server
from timeouts import timeout

from qkdd.client import (
    AsyncioKeyClient,
    BadResponse,
    BlockingKeyClient,
    KeyClient,
    KeyServiceClientError,
    KeyServiceUnreachable,
)


async def test_blocking_client_round_trip(nursery: trio.Nursery, tmp_path: Path) -> None:
    srv = await start_server(nursery, tmp_path)

    def work() -> None:
        with (
            BlockingKeyClient(srv.path, sae_id=A) as master,
            BlockingKeyClient(srv.path, sae_id=B) as slave,
        ):
            assert master.status(B)["stored_key_count"] == 5000
            keys = master.enc_keys(B, number=3, size=512)
            assert [len(k.material) for k in keys] == [64] * 3
            assert slave.dec_keys(A, [k.key_id for k in keys]) == keys
            with pytest.raises(KeyServiceClientError) as info:
                master.enc_keys(B, size=12)
            assert info.value.status == 400 and "multiple of 8" in info.value.message
            assert info.value.details == [{"size": 12}]

    await trio.to_thread.run_sync(work)
    srv.cancel.cancel()


async def test_503_carries_the_pool_reason(nursery: trio.Nursery, tmp_path: Path) -> None:
    srv = await start_server(nursery, tmp_path)
    srv.pool.unavailable = "QKD device /dev/ttyQKD0 is down"
    async with KeyClient(srv.path, sae_id=A) as client:
        with pytest.raises(KeyServiceClientError) as info:
            await client.enc_keys(B)
    assert info.value.status == 503
    assert info.value.message == "QKD device /dev/ttyQKD0 is down"
    srv.cancel.cancel()


async def test_clients_reconnect_after_idle_close(nursery: trio.Nursery, tmp_path: Path) -> None:
    srv = await start_server(nursery, tmp_path, request_timeout=0.2)
    async with KeyClient(srv.path, sae_id=A) as client:
        await client.status(B)
        await trio.sleep(0.5)  # the server closes the idle connection meanwhile
        assert len(await client.enc_keys(B, number=2)) == 2

    def blocking() -> int:
        with BlockingKeyClient(srv.path, sae_id=A) as client:
            client.status(B)
            trio.from_thread.run(trio.sleep, 0.5)
            return len(client.enc_keys(B, number=2))

    assert await trio.to_thread.run_sync(blocking) == 2
    assert srv.pool.status(A, B).stored_key_count == 4996
    assert len(srv.seen) == 4  # two connections per client
    srv.cancel.cancel()


async def test_missing_and_stale_sockets_are_reported_plainly(tmp_path: Path) -> None:
    missing = str(tmp_path / "absent.sock")
    with pytest.raises(KeyServiceUnreachable, match="no such socket"):
        BlockingKeyClient(missing).status(B)
    with pytest.raises(KeyServiceUnreachable, match="no such socket"):
        await KeyClient(missing).status(B)
    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(stale))
    with pytest.raises(KeyServiceUnreachable, match="refused"):
        BlockingKeyClient(str(stale)).status(B)


async def test_garbage_from_the_server_is_bad_response(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    path = str(tmp_path / "junk.sock")
    sock = trio.socket.socket(socket.AF_UNIX)
    await sock.bind(path)
    sock.listen()
    listener = trio.SocketListener(sock)

    async def reply(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nnot json!")

    await nursery.start(trio.serve_listeners, reply, [listener])
    async with KeyClient(path, sae_id=A) as client:
        with pytest.raises(BadResponse):
            await client.enc_keys(B)
    with pytest.raises(BadResponse):
        await trio.to_thread.run_sync(lambda: BlockingKeyClient(path).status(B))
    nursery.cancel_scope.cancel()


async def test_silence_is_a_timeout_and_an_ended_stream_is_told(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    silent, ending = str(tmp_path / "silent.sock"), str(tmp_path / "ending.sock")
    await junk_server(nursery, silent, None)
    # One event, then the service closes the stream.
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nConnection: close\r\n\r\n"
    await junk_server(nursery, ending, head + b'{"event":"link_up","seq":1,"at":0}\n')

    def blocking() -> tuple[str, list[str], str]:
        with pytest.raises(KeyServiceUnreachable) as silence:
            BlockingKeyClient(silent, timeout=0.3).status(B)
        got = []
        with pytest.raises(KeyServiceUnreachable) as ended:
            for event in BlockingKeyClient(ending).events():
                got.append(event["event"])
        return str(silence.value), got, str(ended.value)

    async def asyncio_stream() -> tuple[list[str], str]:
        got = []
        with pytest.raises(KeyServiceUnreachable) as ended:
            async for event in AsyncioKeyClient(ending).events():
                got.append(event["event"])
        return got, str(ended.value)

    with trio.fail_after(timeout(30)):
        silence, got, ended = await trio.to_thread.run_sync(blocking, abandon_on_cancel=True)
    assert "no answer from the key service" in silence and "0.3 s" in silence
    assert (got, ended) == (["link_up"], "the key service ended the stream")
    assert await in_asyncio(asyncio_stream) == (["link_up"], "the key service ended the stream")
    with pytest.raises(KeyServiceUnreachable, match="no answer from the key service"):
        await KeyClient(silent, timeout=0.3).status(B)
    got = []
    with trio.fail_after(timeout(30)), pytest.raises(KeyServiceUnreachable, match="ended the"):
        async for event in KeyClient(ending).events():
            got.append(event["event"])
    assert got == ["link_up"]
    nursery.cancel_scope.cancel()
