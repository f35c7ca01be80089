"""The ETSI 014 server through a real Unix socket: HTTP edge cases, timeouts, peer credentials,
socket-file handling."""

from __future__ import annotations

import base64
import json
import logging
import os
import socket
import stat
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import h11
import pytest
import trio
import trio.testing
from timeouts import timeout

from qkdd.client import KeyClient, KeyServiceClientError
from qkdd.etsi014.handler import RequestHandler
from qkdd.etsi014.memory_pool import MemoryKeyPool
from qkdd.http_server.exchange import ApiResponse
from qkdd.http_server.limits import ConnectionLimits, raise_open_file_limit
from qkdd.http_server.unix_socket import SocketPathError, serve_unix

A, B = "SAE-A", "SAE-B"
BOTH = frozenset({A, B})


@dataclass
class Server:
    path: str
    pool: MemoryKeyPool
    seen: list[tuple[int, int]]
    cancel: trio.CancelScope


async def start_server(
    nursery: trio.Nursery,
    tmp_path: Path,
    *,
    grant: frozenset[str] = BOTH,
    request_timeout: float = 5.0,
    max_body: int = 64 * 1024,
    listener: trio.SocketListener | None = None,
) -> Server:
    pool = MemoryKeyPool([A, B], max_key_per_request=128)
    pool.fill(A, B, 5000)
    seen: list[tuple[int, int]] = []

    def identify(uid: int, gid: int) -> frozenset[str]:
        seen.append((uid, gid))
        return grant

    path = str(tmp_path / "api.sock")
    cancel = trio.CancelScope()

    async def run(task_status: trio.TaskStatus[None]) -> None:
        with cancel:
            await serve_unix(
                path,
                RequestHandler(pool, max_body=max_body),
                identify,
                request_timeout=request_timeout,
                task_status=task_status,
                listener=listener,
            )

    await nursery.start(run)
    return Server(path, pool, seen, cancel)


@pytest.fixture
async def server(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[Server]:
    srv = await start_server(nursery, tmp_path)
    yield srv
    srv.cancel.cancel()


async def raw(path: str, data: bytes, *, seconds: float = 5.0) -> bytes:
    """Send `data`, then read until the server closes the connection."""
    with trio.fail_after(timeout(seconds)):
        stream = await trio.open_unix_socket(path)
        async with stream:
            await stream.send_all(data)
            received = bytearray()
            while chunk := await stream.receive_some(65536):
                received += chunk
            return bytes(received)


def parse_responses(data: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    conn = h11.Connection(h11.CLIENT)
    # h11 needs to have sent requests to accept responses; pretend to pipeline enough of them.
    responses = []
    conn.receive_data(data)
    conn.receive_data(b"")
    while True:
        conn.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
        conn.send(h11.EndOfMessage())
        status, headers, body = 0, {}, bytearray()
        while True:
            event = conn.next_event()
            if isinstance(event, h11.Response):
                status = event.status_code
                headers = {k.decode(): v.decode() for k, v in event.headers}
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                responses.append((status, headers, bytes(body)))
                break
            elif isinstance(event, h11.ConnectionClosed):
                return responses
        if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
            return responses
        conn.start_next_cycle()


def request_bytes(
    method: str, target: str, body: bytes = b"", sae: str = A, extra: str = ""
) -> bytes:
    head = (
        f"{method} {target} HTTP/1.1\r\nHost: localhost\r\nX-SAE-ID: {sae}\r\n{extra}"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def test_master_and_slave_get_the_same_keys(server: Server) -> None:
    async with (
        KeyClient(server.path, sae_id=A) as master,
        KeyClient(server.path, sae_id=B) as slave,
    ):
        status = await master.status(B)
        assert status["master_SAE_ID"] == A and status["stored_key_count"] == 5000
        keys = await master.enc_keys(B, number=5, size=128)
        assert [len(k.material) for k in keys] == [16] * 5
        got = await slave.dec_keys(A, [k.key_id for k in keys])
        assert got == keys
        with pytest.raises(KeyServiceClientError) as info:
            await slave.dec_keys(A, [keys[0].key_id])
        assert info.value.status == 400


async def test_keep_alive_serves_several_requests_on_one_connection(server: Server) -> None:
    data = (
        request_bytes("GET", f"/api/v1/keys/{B}/status")
        + request_bytes("GET", f"/api/v1/keys/{B}/enc_keys?number=2")
        + request_bytes("GET", "/nowhere", extra="Connection: close\r\n")
    )
    responses = parse_responses(await raw(server.path, data))
    assert [r[0] for r in responses] == [200, 200, 404]
    assert len(json.loads(responses[1][2])["keys"]) == 2
    assert len(server.seen) == 1  # one connection, identified once


async def test_peer_credentials_are_passed_to_identify(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    srv = await start_server(nursery, tmp_path, grant=frozenset())
    async with KeyClient(srv.path) as client:
        with pytest.raises(KeyServiceClientError) as info:
            await client.status(B)
    assert info.value.status == 401
    assert str(os.getuid()) in info.value.message
    assert srv.seen == [(os.getuid(), os.getgid())]
    srv.cancel.cancel()


async def test_several_saes_without_header_is_401(server: Server) -> None:
    async with KeyClient(server.path) as client:
        with pytest.raises(KeyServiceClientError) as info:
            await client.enc_keys(B)
    assert info.value.status == 401 and "X-SAE-ID" in info.value.message


async def test_malformed_http_gets_400_and_server_carries_on(server: Server) -> None:
    for junk in (
        b"GARBAGE\r\n\r\n",
        b"GET / HTTP/1.1\r\nno colon here\r\n\r\n",
        b"\x00\xff\x16\x03\x01 binary\r\n\r\n",
    ):
        responses = parse_responses(await raw(server.path, junk))
        assert [r[0] for r in responses] == [400]
        assert set(json.loads(responses[0][2])) == {"message", "details"}
    async with KeyClient(server.path, sae_id=A) as client:
        assert (await client.status(B))["slave_SAE_ID"] == B


async def test_expect_100_continue_is_honoured(server: Server) -> None:
    body = json.dumps({"number": 2}).encode()
    with trio.fail_after(timeout(5)):
        async with await trio.open_unix_socket(server.path) as stream:
            await stream.send_all(
                request_bytes(
                    "POST", f"/api/v1/keys/{B}/enc_keys", b"", extra="Expect: 100-continue\r\n"
                ).replace(b"Content-Length: 0", b"Content-Length: %d" % len(body))
            )
            assert (await stream.receive_some(4096)).startswith(b"HTTP/1.1 100 ")
            await stream.send_all(body)
            await stream.send_eof()
            received = b""
            while chunk := await stream.receive_some(65536):
                received += chunk
    assert received.startswith(b"HTTP/1.1 200 ")
    assert len(json.loads(received.split(b"\r\n\r\n", 1)[1])["keys"]) == 2


async def test_huge_headers_are_refused(server: Server) -> None:
    data = request_bytes("GET", f"/api/v1/keys/{B}/status", extra=f"X-Big: {'a' * 20000}\r\n")
    assert [r[0] for r in parse_responses(await raw(server.path, data))] == [431]


async def test_huge_declared_body_is_400_without_reading_it(server: Server) -> None:
    # ETSI GS QKD 014 lists 200, 400, 401 and 503: an oversized body is a bad request.
    head = request_bytes("POST", f"/api/v1/keys/{B}/enc_keys").replace(
        b"Content-Length: 0", b"Content-Length: 100000000"
    )
    data = await raw(server.path, head)
    assert data.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    responses = parse_responses(data)
    assert [r[0] for r in responses] == [400]
    assert responses[0][1]["connection"] == "close"
    assert "65536 bytes" in json.loads(responses[0][2])["message"]


async def test_huge_chunked_body_is_400(server: Server) -> None:
    chunk = b"a" * 32768
    head = (
        f"POST /api/v1/keys/{B}/enc_keys HTTP/1.1\r\nHost: x\r\nX-SAE-ID: {A}\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    ).encode()
    body = (b"%x\r\n" % len(chunk) + chunk + b"\r\n") * 3  # 96 KiB > 64 KiB, never ends
    assert [r[0] for r in parse_responses(await raw(server.path, head + body))] == [400]


async def test_huge_body_on_the_daemons_own_routes_is_413(server: Server) -> None:
    head = request_bytes("POST", "/qkdd/v1/messages/x").replace(
        b"Content-Length: 0", b"Content-Length: 100000000"
    )
    assert (await raw(server.path, head)).startswith(b"HTTP/1.1 413 ")


@pytest.mark.parametrize(
    ("target", "status_line"),
    [
        (f"/api/v1/keys/{B}/status", b"HTTP/1.1 200 OK\r\n"),
        ("/nowhere", b"HTTP/1.1 404 Not Found\r\n"),
        (f"/api/v1/keys/{B}/enc_keys?number=0", b"HTTP/1.1 400 Bad Request\r\n"),
    ],
)
async def test_status_lines_carry_the_standard_reason_phrase(
    server: Server, target: str, status_line: bytes
) -> None:
    data = request_bytes("GET", target, extra="Connection: close\r\n")
    assert (await raw(server.path, data)).startswith(status_line)


BURST = 500


def burst_fits_this_machine() -> str | None:
    """Why a burst of BURST connections cannot be queued and served here, if it cannot."""
    somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
    if somaxconn < BURST:
        return f"net.core.somaxconn is {somaxconn}, below {BURST}"
    caps = ConnectionLimits.for_fd_limit(raise_open_file_limit())
    if caps.max_per_owner < BURST:
        return f"the open-file limit allows {caps.max_per_owner} API connections per uid"
    return None


async def test_a_burst_of_500_connections_is_queued_not_refused(server: Server) -> None:
    """500 clients connecting at once, before the server accepts any (this task does not
    yield meanwhile), all find room in the listen queue instead of EAGAIN."""
    unfit = burst_fits_this_machine()
    if unfit is not None:
        pytest.skip(unfit)
    burst: list[socket.socket] = []
    refused = 0
    try:
        for _ in range(BURST):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            burst.append(sock)
            try:
                sock.connect(server.path)
            except BlockingIOError:
                refused += 1
        assert refused == 0
        # Once the server runs again, every queued connection is served.
        last = burst[-1]
        last.setblocking(True)
        last.settimeout(timeout(30))
        await trio.to_thread.run_sync(
            last.sendall,
            request_bytes("GET", f"/api/v1/keys/{B}/status", extra="Connection: close\r\n"),
        )
        assert (await trio.to_thread.run_sync(last.recv, 64)).startswith(b"HTTP/1.1 200 OK")
    finally:
        for sock in burst:
            sock.close()


async def test_slow_client_times_out_without_holding_others(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    srv = await start_server(nursery, tmp_path, request_timeout=0.3)
    slow = await trio.open_unix_socket(srv.path)
    silent = await trio.open_unix_socket(srv.path)
    await slow.send_all(b"GET /api/v1/keys/SAE-B/status HTTP/1.1\r\nHost: x\r\n")
    # Meanwhile, others are served at once.
    async with KeyClient(srv.path, sae_id=A) as client:
        for _ in range(3):
            assert (await client.status(B))["slave_SAE_ID"] == B
    with trio.fail_after(timeout(3)):
        received = bytearray()
        while chunk := await slow.receive_some(4096):
            received += chunk
        # A connection that never sent a byte is closed without a response.
        assert await silent.receive_some(4096) == b""
    assert [r[0] for r in parse_responses(bytes(received))] == [408]
    await slow.aclose()
    await silent.aclose()
    srv.cancel.cancel()


async def test_an_answer_the_client_does_not_read_times_out_without_holding_others(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "qkdd.api")
    pool = MemoryKeyPool([A, B])
    pool.fill(A, B, 10)

    def huge(request: object, caller: object) -> ApiResponse:
        return ApiResponse(200, (("content-type", "text/plain"),), bytes(16 * 1024 * 1024))

    path = str(tmp_path / "api.sock")
    cancel = trio.CancelScope()

    async def run(task_status: trio.TaskStatus[None]) -> None:
        with cancel:
            await serve_unix(
                path,
                RequestHandler(pool, extensions={"/qkdd/v1/huge": huge}),
                lambda uid, gid: BOTH,
                request_timeout=0.3,
                task_status=task_status,
            )

    await nursery.start(run)
    async with await trio.open_unix_socket(path) as stuck:
        await stuck.send_all(request_bytes("GET", "/qkdd/v1/huge"))  # and never reads
        with trio.fail_after(timeout(5)):
            async with KeyClient(path, sae_id=A) as client:
                while "event=api_send_timeout" not in caplog.text:
                    assert (await client.status(B))["slave_SAE_ID"] == B
                    await trio.sleep(0.05)
            # The server closed the stuck connection: what is left of the answer, then EOF.
            while await stuck.receive_some(1 << 20):
                pass
    cancel.cancel()


async def test_concurrent_callers_get_distinct_keys(server: Server) -> None:
    results: list[list[str]] = []

    async def caller() -> None:
        async with KeyClient(server.path, sae_id=A) as client:
            for _ in range(5):
                results.append([k.key_id for k in await client.enc_keys(B, number=4)])

    async with trio.open_nursery() as n:
        for _ in range(20):
            n.start_soon(caller)
    ids = [i for batch in results for i in batch]
    assert len(ids) == 400 and len(set(ids)) == 400
    assert server.pool.status(A, B).stored_key_count == 4600


async def test_client_leaving_mid_response_does_not_disturb_others(server: Server) -> None:
    for _ in range(10):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(server.path)
            sock.sendall(request_bytes("GET", f"/api/v1/keys/{B}/enc_keys?number=128&size=8192"))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    async with KeyClient(server.path, sae_id=A) as client:
        assert len(await client.enc_keys(B, number=3)) == 3


async def test_internal_errors_are_503_and_logged(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    def explode(*_: object) -> None:
        raise RuntimeError("disk on fire")

    server.pool.take_for_master = explode  # type: ignore[method-assign]
    async with KeyClient(server.path, sae_id=A) as client:
        with pytest.raises(KeyServiceClientError) as info:
            await client.enc_keys(B)
        assert info.value.status == 503
        assert (await client.status(B))["master_SAE_ID"] == A
    assert "disk on fire" in caplog.text


async def test_log_has_key_ids_but_no_material(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="qkdd.api")
    async with (
        KeyClient(server.path, sae_id=A) as master,
        KeyClient(server.path, sae_id=B) as slave,
    ):
        keys = await master.enc_keys(B, number=3)
        await slave.dec_keys(A, [k.key_id for k in keys])
    api_lines = [r.getMessage() for r in caplog.records if r.name == "qkdd.api"]
    text = "\n".join(api_lines)
    for key in keys:
        assert text.count(key.key_id) >= 2  # handed out and collected
        assert key.material.hex() not in text
        assert repr(key.material)[2:-1] not in text
        assert base64.b64encode(key.material).decode() not in text
    assert all("\n" not in line for line in api_lines)


async def test_socket_mode_and_cleanup(nursery: trio.Nursery, tmp_path: Path) -> None:
    srv = await start_server(nursery, tmp_path)
    st = os.lstat(srv.path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660
    assert sorted(os.listdir(tmp_path)) == ["api.sock"]  # no temporary names left
    srv.cancel.cancel()
    await trio.testing.wait_all_tasks_blocked()
    assert not os.path.exists(srv.path)


async def test_stale_socket_file_is_replaced(nursery: trio.Nursery, tmp_path: Path) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(tmp_path / "api.sock"))
    stale.close()  # the name stays behind, nobody listens
    srv = await start_server(nursery, tmp_path)
    async with KeyClient(srv.path, sae_id=A) as client:
        assert (await client.status(B))["master_SAE_ID"] == A
    srv.cancel.cancel()


async def test_refuses_to_replace_a_regular_file(tmp_path: Path) -> None:
    path = tmp_path / "api.sock"
    path.write_text("precious")
    handler = RequestHandler(MemoryKeyPool([A, B]))
    with pytest.raises(SocketPathError, match="not a socket"):
        await serve_unix(str(path), handler, lambda uid, gid: BOTH)
    assert path.read_text() == "precious"


async def test_refuses_to_replace_a_live_socket(server: Server) -> None:
    handler = RequestHandler(MemoryKeyPool([A, B]))
    with pytest.raises(SocketPathError, match="another process"):
        await serve_unix(server.path, handler, lambda uid, gid: BOTH)
    async with KeyClient(server.path, sae_id=A) as client:
        assert (await client.status(B))["master_SAE_ID"] == A


async def test_serves_a_listener_made_elsewhere(nursery: trio.Nursery, tmp_path: Path) -> None:
    path = str(tmp_path / "activated.sock")
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(path)
    sock.listen()
    listener = trio.SocketListener(sock)
    srv = await start_server(nursery, tmp_path, listener=listener)
    async with KeyClient(path, sae_id=A) as client:
        assert len(await client.enc_keys(B, number=2)) == 2
    srv.cancel.cancel()
    await trio.testing.wait_all_tasks_blocked()
    assert os.path.exists(path)  # not ours to remove
    await listener.aclose()
