"""API connections cannot starve the daemon of file descriptors: the connection table's caps
and eviction (sans-IO), idle timeouts, eviction and refusal through a real Unix socket,
accept(2) running out of descriptors, and a real daemon under a flood of idle connections
beyond its descriptor limit."""

from __future__ import annotations

import errno
import functools
import resource
import socket
import ssl
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from daemon_process import stop_daemon
from hypothesis import given
from hypothesis import strategies as st
from timeouts import timeout, wait_until

from qkdd.client import BlockingKeyClient, KeyClient
from qkdd.demo import prepare_directory, start_emulator
from qkdd.demo_sites import SITE_B
from qkdd.etsi014.handler import RequestHandler
from qkdd.etsi014.memory_pool import MemoryKeyPool
from qkdd.http_server.exchange import ApiRequest, ApiResponse, Caller, Deferred, Extension
from qkdd.http_server.limits import ConnectionLimits, ConnectionTable
from qkdd.http_server.tls import serve_tls
from qkdd.http_server.unix_socket import serve_unix

A, B = "SAE-A", "SAE-B"

# -- the connection table, without I/O --------------------------------------------------


def table(total: int = 4, per_owner: int = 4, reserve: int = 0, privileged=()) -> ConnectionTable:
    return ConnectionTable(ConnectionLimits(total, per_owner, reserve), privileged)


def test_owner_over_its_cap_gives_up_its_own_oldest_idle_connection() -> None:
    t = table(total=10, per_owner=3)
    for conn in ("a1", "a2", "a3"):
        assert t.admit(conn, "uid-a").admitted
    t.admit("b1", "uid-b")
    t.idle("b1")
    t.idle("a2")
    t.idle("a1")  # a2 has been idle longest
    admission = t.admit("a4", "uid-a")
    assert admission.admitted and admission.evict == "a2"
    assert not t.is_open("a2") and t.open_of("uid-a") == 3
    admission = t.admit("a5", "uid-a")
    assert admission.evict == "a1"  # never b1: another owner's connection
    # Nothing of uid-a is idle any more: a3, a4, a5 have requests in progress.
    assert not t.admit("a6", "uid-a").admitted
    assert t.is_open("b1") and (t.admitted, t.evicted, t.refused) == (6, 2, 1)


def test_full_table_takes_room_from_the_owner_holding_the_most() -> None:
    t = table(total=5, per_owner=4)
    for conn in ("a1", "a2", "a3"):
        t.admit(conn, "uid-a")
        t.idle(conn)
    t.admit("b1", "uid-b")
    t.idle("b1")
    t.admit("c1", "uid-c")
    admission = t.admit("d1", "uid-d")  # full: uid-a holds the most
    assert admission.admitted and admission.evict == "a1"
    assert t.is_open("b1") and t.open_count == 5


def test_busy_connections_are_never_evicted() -> None:
    t = table(total=2, per_owner=2)
    t.admit("a1", "uid-a")
    t.idle("a1")
    t.busy("a1")  # a request arrived
    t.admit("a2", "uid-a")
    assert not t.admit("b1", "uid-b").admitted
    assert t.is_open("a1") and t.idle_count() == 0 and t.open_count == 2


def test_operator_and_daemon_uid_have_a_reserve_beyond_the_caps() -> None:
    t = table(total=2, per_owner=2, reserve=2, privileged={0})
    t.admit("a1", "uid-a")
    t.admit("a2", "uid-a")
    assert not t.admit("b1", "uid-b").admitted  # full, nothing idle
    assert t.admit("root1", 0).admitted and t.admit("root2", 0).admitted
    assert not t.admit("root3", 0).admitted  # the reserve is bounded too
    assert t.open_count == 4


def test_release_is_idempotent_and_forgets_idle_state() -> None:
    t = table()
    t.admit("a1", None)  # a caller without peer credentials is an owner like any other
    t.idle("a1")
    t.release("a1")
    t.release("a1")
    t.idle("a1")  # after release: ignored
    assert (t.open_count, t.open_of(None), t.idle_count()) == (0, 0, 0)


@given(st.integers(16, 1 << 20))
def test_caps_leave_the_daemon_its_reserve_of_descriptors(fd_limit: int) -> None:
    limits = ConnectionLimits.for_fd_limit(fd_limit)
    assert 1 <= limits.max_per_owner <= limits.max_total
    if fd_limit >= 256:
        spare = fd_limit - limits.max_total - limits.privileged_reserve
        assert spare >= 64 and spare >= fd_limit // 8


# -- the server, through a real Unix socket ---------------------------------------------


async def start(
    nursery: trio.Nursery,
    tmp_path: Path,
    *,
    connections: ConnectionTable | None = None,
    idle_timeout: float | None = None,
    request_timeout: float = 30.0,
    extensions: dict[str, Extension] | None = None,
) -> tuple[str, trio.CancelScope]:
    pool = MemoryKeyPool([A, B], max_key_per_request=16)
    pool.fill(A, B, 100)
    path = str(tmp_path / "api.sock")
    cancel = trio.CancelScope()

    async def run(task_status: trio.TaskStatus[None]) -> None:
        with cancel:
            await serve_unix(
                path,
                RequestHandler(pool, extensions=extensions or {}),
                lambda uid, gid: frozenset({A}),
                request_timeout=timeout(request_timeout),
                idle_timeout=idle_timeout,
                connections=connections,
                task_status=task_status,
            )

    await nursery.start(run)
    return path, cancel


async def until_closed(stream: trio.SocketStream) -> bytes:
    """Everything the server sends until it closes the connection."""
    received = bytearray()
    with trio.fail_after(timeout(10)):
        while chunk := await stream.receive_some(4096):
            received += chunk
    return bytes(received)


async def test_idle_connection_is_closed_but_a_request_in_progress_is_not(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    path, cancel = await start(nursery, tmp_path, idle_timeout=0.2)
    slow = await trio.open_unix_socket(path)
    await slow.send_all(f"GET /api/v1/keys/{B}/status HTTP/1.1\r\nHost: x\r\n".encode())
    idle = await trio.open_unix_socket(path)
    assert await until_closed(idle) == b""  # closed without a word
    # The slow request is still being received (request_timeout is long): finish it.
    await slow.send_all(b"\r\n")
    # Answered; then idle again, and closed like any idle connection.
    answer = await until_closed(slow)
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.count(b"HTTP/1.1 ") == 1
    await slow.aclose()
    await idle.aclose()
    cancel.cancel()


async def test_over_the_cap_the_oldest_idle_connection_makes_room(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    connections = ConnectionTable(ConnectionLimits(4, 4, 0))
    path, cancel = await start(nursery, tmp_path, connections=connections)
    idle = []
    for _ in range(4):
        idle.append(await trio.open_unix_socket(path))
    with trio.fail_after(timeout(10)):
        while connections.idle_count() < 4:
            await trio.sleep(0.01)
    async with KeyClient(path, sae_id=A) as client:
        assert (await client.status(B))["stored_key_count"] == 100
    assert await until_closed(idle[0]) == b""
    assert connections.evicted == 1 and connections.refused == 0
    for stream in idle:
        await stream.aclose()
    cancel.cancel()


async def test_when_nothing_is_idle_a_newcomer_is_refused_with_503(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    in_handler = 0
    release = trio.Event()

    def slow_route(request: ApiRequest, caller: Caller) -> Deferred:
        async def answer() -> ApiResponse:
            nonlocal in_handler
            in_handler += 1
            await release.wait()
            return ApiResponse(200, (), b"{}")

        return Deferred(answer, shielded=False)

    connections = ConnectionTable(ConnectionLimits(2, 2, 0))
    path, cancel = await start(
        nursery, tmp_path, connections=connections, extensions={"/qkdd/slow": slow_route}
    )
    busy = []
    for _ in range(2):
        stream = await trio.open_unix_socket(path)
        await stream.send_all(b"GET /qkdd/slow HTTP/1.1\r\nHost: x\r\n\r\n")
        busy.append(stream)
    with trio.fail_after(timeout(10)):
        while in_handler < 2:  # both requests are in progress
            await trio.sleep(0.01)
    refused = await trio.open_unix_socket(path)
    answer = await until_closed(refused)
    assert answer.startswith(b"HTTP/1.1 503 ") and b"too many API connections" in answer
    assert connections.refused == 1 and connections.evicted == 0
    release.set()
    for stream in busy:
        with trio.fail_after(timeout(10)):
            assert (await stream.receive_some(4096)).startswith(b"HTTP/1.1 200 ")
    assert "event=api_connection_limit" in caplog.text and "outcome=refused" in caplog.text
    assert "Traceback" not in caplog.text
    for stream in [*busy, refused]:
        await stream.aclose()
    cancel.cancel()


async def test_tls_listener_applies_the_same_caps(nursery: trio.Nursery, tmp_path: Path) -> None:
    from pki import make_pki

    pki = make_pki(tmp_path)
    pool = MemoryKeyPool([A, B], max_key_per_request=16)
    pool.fill(A, B, 100)
    connections = ConnectionTable(ConnectionLimits(2, 2, 0))
    listeners = await nursery.start(
        functools.partial(
            serve_tls,
            "127.0.0.1",
            0,
            RequestHandler(pool),
            lambda cert: frozenset({A}),
            cert_file=pki.server.cert,
            key_file=pki.server.key,
            client_ca_file=pki.ca,
            request_timeout=timeout(30),
            handshake_timeout=timeout(30),
            connections=connections,
        )
    )
    port = listeners[0].socket.getsockname()[1]
    context = ssl.create_default_context(cafile=pki.ca)
    context.load_cert_chain(pki.client_a.cert, pki.client_a.key)
    # Two TCP connections that never start their handshake: in progress, not idle.
    stalled = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(2)]
    with trio.fail_after(timeout(10)):
        while connections.open_count < 2:
            await trio.sleep(0.01)
    refused = await trio.open_tcp_stream("127.0.0.1", port)
    assert await until_closed(refused) == b""  # closed before any TLS
    assert connections.refused == 1
    for stream in stalled:
        await stream.aclose()
    with trio.fail_after(timeout(10)):
        while connections.open_count:
            await trio.sleep(0.01)
    # Two TLS connections that shook hands and sit idle make room for a third caller.
    idle = []
    for _ in range(2):
        stream = trio.SSLStream(
            await trio.open_tcp_stream("127.0.0.1", port), context, server_hostname="localhost"
        )
        await stream.do_handshake()
        idle.append(stream)
    with trio.fail_after(timeout(10)):
        while connections.idle_count() < 2:
            await trio.sleep(0.01)
    async with KeyClient.tls(
        "127.0.0.1", port, cert_file=pki.client_a.cert, key_file=pki.client_a.key, ca_file=pki.ca
    ) as client:
        assert (await client.status(B))["stored_key_count"] == 100
    assert connections.evicted == 1
    for stream in idle:
        await trio.aclose_forcefully(stream)
    nursery.cancel_scope.cancel()


# -- accept(2) without descriptors ------------------------------------------------------

EMFILE_SERVER = textwrap.dedent(
    """
    import logging, os, resource, sys, trio
    from qkdd.etsi014.handler import RequestHandler
    from qkdd.http_server.limits import ConnectionLimits, ConnectionTable
    from qkdd.etsi014.memory_pool import MemoryKeyPool
    from qkdd.http_server.unix_socket import serve_unix

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    path, hog_fds = sys.argv[1], int(sys.argv[2])

    async def main():
        pool = MemoryKeyPool(["SAE-A", "SAE-B"])
        pool.fill("SAE-A", "SAE-B", 10)
        # Caps far above the descriptor limit: accept(2) itself runs out.
        table = ConnectionTable(ConnectionLimits(10_000, 10_000, 0))
        async with trio.open_nursery() as nursery:
            await nursery.start(lambda task_status: serve_unix(
                path, RequestHandler(pool), lambda uid, gid: frozenset({"SAE-A"}),
                request_timeout=600, connections=table, task_status=task_status))
            hog = []
            try:
                while True:
                    hog.append(os.open(os.devnull, os.O_RDONLY))
            except OSError:
                pass
            print("ready", flush=True)
            await trio.to_thread.run_sync(sys.stdin.readline)  # the test says when to free fds
            for fd in hog[: hog_fds]:
                os.close(fd)
            print("freed", flush=True)
            await trio.to_thread.run_sync(sys.stdin.readline)
            nursery.cancel_scope.cancel()

    trio.run(main)
    """
)


def test_accept_without_descriptors_warns_once_backs_off_and_recovers(tmp_path: Path) -> None:
    path = str(tmp_path / "api.sock")
    log = tmp_path / "server.log"
    with open(log, "wb") as stderr:
        server = subprocess.Popen(
            [sys.executable, "-c", EMFILE_SERVER, path, "8"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
        )
    waiting: list[socket.socket] = []
    try:
        assert server.stdout is not None and server.stdin is not None
        assert server.stdout.readline() == b"ready\n", log.read_text()
        # Every descriptor is taken: these connections wait in the listen queue while
        # accept(2) fails with EMFILE.
        for _ in range(3):
            waiting.append(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
            waiting[-1].connect(path)
        wait_until(
            lambda: "event=api_accept_failed" in log.read_text(),
            "event=api_accept_failed",
            20,
            log.read_text,
        )
        server.stdin.write(b"free\n")
        server.stdin.flush()
        assert server.stdout.readline() == b"freed\n"
        with BlockingKeyClient(path, sae_id=A, timeout=timeout(30)) as client:
            assert client.status(B)["stored_key_count"] == 10
        server.stdin.write(b"stop\n")
        server.stdin.flush()
        assert server.wait(timeout=timeout(30)) == 0, log.read_text()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        for sock in waiting:
            sock.close()
    text = log.read_text()
    assert "Traceback" not in text, text
    warnings = [line for line in text.splitlines() if "event=api_accept_failed" in line]
    # Throttled: a warning at once, then (if it lasts) one now and then that counts the
    # retries held back, never one per retry.
    assert warnings and all("reason=EMFILE" in line for line in warnings), warnings
    assert "since_last=0 " in warnings[0]
    assert all("since_last=0 " not in line for line in warnings[1:]), warnings


# -- a real daemon flooded beyond its descriptor limit ----------------------------------

DAEMON_FD_LIMIT = 256
FLOOD = 1100


def ensure_own_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.skip(f"this test opens {needed} sockets; the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def low_fd_limit() -> Callable[[], None]:
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (DAEMON_FD_LIMIT, DAEMON_FD_LIMIT))

    return apply


def open_idle_connections(path: str, count: int) -> list[socket.socket]:
    """Up to `count` connections that never send a byte (fewer if the daemon stops taking
    them before the deadline)."""
    opened: list[socket.socket] = []
    deadline = time.monotonic() + timeout(60)
    while len(opened) < count and time.monotonic() < deadline:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        while time.monotonic() < deadline:
            try:
                sock.connect(path)
            except BlockingIOError:  # the listen queue is full: the daemon is behind
                time.sleep(0.01)
                continue
            opened.append(sock)
            break
        else:
            sock.close()
    return opened


def closed_by_peer(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError as exc:
        return exc.errno == errno.ECONNRESET


def test_idle_flood_beyond_the_fd_limit_does_not_stop_the_key_service(tmp_path: Path) -> None:
    ensure_own_fd_limit(FLOOD + 200)
    configs = prepare_directory(tmp_path)
    emulator = start_emulator(tmp_path)
    log = tmp_path / "a.log"
    with open(log, "wb") as stderr:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "qkdd", "run", "--config", str(configs["site-a"])],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            preexec_fn=low_fd_limit(),
        )
    flood: list[socket.socket] = []
    try:

        def ready() -> bool:
            assert daemon.poll() is None, log.read_text()
            return "event=ready" in log.read_text()

        wait_until(ready, "event=ready", 60, log.read_text)
        path = str(tmp_path / "site-a" / "api.sock")
        flood = open_idle_connections(path, FLOOD)
        # While the flood holds every connection it could get, a valid request is answered.
        with BlockingKeyClient(path, timeout=timeout(60)) as client:
            assert client.status(SITE_B.sae_id)["master_SAE_ID"] == "sae-a"
        still_open = [sock for sock in flood if not closed_by_peer(sock)]
        assert daemon.poll() is None
        # The daemon let idle connections go to stay under its descriptor limit.
        assert len(flood) == FLOOD and len(still_open) < DAEMON_FD_LIMIT
    finally:
        for sock in flood:
            sock.close()
        try:
            stop_daemon(daemon)
        finally:
            emulator.terminate()
            emulator.wait(timeout=timeout(10))
    text = log.read_text()
    assert daemon.returncode == 0, text[-3000:]
    assert "Traceback" not in text and "EMFILE" not in text, text[-3000:]
    assert "event=api_connection_limit" in text
