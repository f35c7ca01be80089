"""The metrics listener of its own ([metrics]): through real TCP and Unix sockets it serves
GET/HEAD /metrics only (404 elsewhere, 405 for other methods), with the daemon's exposition,
under connection caps; a changed [metrics] table is reported as needing a restart."""

from __future__ import annotations

import os
import stat
from functools import partial
from pathlib import Path

import pytest
import trio
from test_config import site_dir  # noqa: F401 - a fixture
from timeouts import timeout

from qkdd.config import MetricsConfig, load_config
from qkdd.daemon import LiveConfig
from qkdd.metrics import SiteMetrics
from qkdd.metrics_listener import MAX_METRICS_CONNECTIONS, MetricsListenerError, serve_metrics


def site_metrics() -> SiteMetrics:
    return SiteMetrics("site-a", "cryptography", ["site-b"])


async def exchange(stream: trio.abc.Stream, request: bytes) -> bytes:
    """Send one request that closes the connection; everything the server sends back."""
    with trio.fail_after(timeout(10)):
        async with stream:
            await stream.send_all(request)
            received = bytearray()
            while chunk := await stream.receive_some(65536):
                received += chunk
            return bytes(received)


def request(method: str, target: str, extra: str = "") -> bytes:
    return f"{method} {target} HTTP/1.1\r\nHost: x\r\n{extra}Connection: close\r\n\r\n".encode()


async def start_tcp(nursery: trio.Nursery) -> int:
    listeners = await nursery.start(
        partial(serve_metrics, MetricsConfig(("127.0.0.1", 0), None), site_metrics().exposition)
    )
    return int(listeners[0].socket.getsockname()[1])


async def test_tcp_listener_serves_metrics_and_nothing_else(nursery: trio.Nursery) -> None:
    port = await start_tcp(nursery)

    def connect() -> trio.abc.Stream:
        return trio.open_tcp_stream("127.0.0.1", port)  # type: ignore[return-value]

    ok = await exchange(await connect(), request("GET", "/metrics"))
    head, body = ok.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"content-type: text/plain; version=0.0.4" in head
    assert b'qkdd_peer_handshakes_total{mode="psk",outcome="ok",peer="site-b"} 0.0' in body
    openmetrics = await exchange(
        await connect(), request("GET", "/metrics", "Accept: application/openmetrics-text\r\n")
    )
    assert b"content-type: application/openmetrics-text" in openmetrics
    assert openmetrics.endswith(b"# EOF\n")
    heads_up = await exchange(await connect(), request("HEAD", "/metrics"))
    assert heads_up.startswith(b"HTTP/1.1 200 OK\r\n") and heads_up.endswith(b"\r\n\r\n")
    # Nothing of the key API: not even its own metrics route.
    for target in ("/api/v1/keys/sae-b/enc_keys", "/qkdd/v1/metrics", "/", "/metrics/x"):
        answer = await exchange(await connect(), request("GET", target))
        assert answer.startswith(b"HTTP/1.1 404 Not Found\r\n"), answer
    refused = await exchange(await connect(), request("POST", "/metrics"))
    assert refused.startswith(b"HTTP/1.1 405 Method Not Allowed\r\n")
    assert b"allow: GET, HEAD" in refused


async def test_unix_socket_listener_has_its_mode_and_goes_away(tmp_path: Path) -> None:
    path = tmp_path / "metrics.sock"
    async with trio.open_nursery() as nursery:
        await nursery.start(
            partial(serve_metrics, MetricsConfig(None, path, 0o640), site_metrics().exposition)
        )
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
        answer = await exchange(await trio.open_unix_socket(str(path)), request("GET", "/metrics"))
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and b"qkdd_peer_handshakes_total" in answer
        nursery.cancel_scope.cancel()
    assert not path.exists()


async def test_connections_are_capped_and_idle_ones_make_room(nursery: trio.Nursery) -> None:
    port = await start_tcp(nursery)
    idle = [
        await trio.open_tcp_stream("127.0.0.1", port) for _ in range(MAX_METRICS_CONNECTIONS + 4)
    ]
    try:
        # Every newcomer beyond the cap had the oldest idle connection closed for it...
        with trio.fail_after(timeout(10)):
            for stream in idle[:4]:
                assert await stream.receive_some(1) == b""
        # ... and a scrape still gets its answer.
        answer = await exchange(
            await trio.open_tcp_stream("127.0.0.1", port), request("GET", "/metrics")
        )
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
    finally:
        for stream in idle:
            await stream.aclose()


async def test_address_in_use_is_a_clear_error(nursery: trio.Nursery) -> None:
    port = await start_tcp(nursery)
    with pytest.raises(
        MetricsListenerError, match=r"127.0.0.1:\d+ for metrics.*\[metrics\] listen"
    ):
        await serve_metrics(MetricsConfig(("127.0.0.1", port), None), site_metrics().exposition)


async def test_socket_path_taken_by_a_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "metrics.sock"
    path.write_text("not a socket")
    with pytest.raises(MetricsListenerError, match=r"not a socket.*\[metrics\] socket"):
        await serve_metrics(MetricsConfig(None, path), site_metrics().exposition)


def test_a_changed_metrics_table_needs_a_restart(site_dir: Path) -> None:  # noqa: F811
    path = site_dir / "site-a.toml"
    text = path.read_text()
    path.write_text(text + '\n[metrics]\nlisten = "127.0.0.1:9447"\n')
    live = LiveConfig(load_config(path))
    path.write_text(text + '\n[metrics]\nlisten = "127.0.0.1:9448"\n')
    assert live.reload() == ([], ["metrics"])
    assert live.config.metrics == MetricsConfig(("127.0.0.1", 9447), None)


def test_socket_in_a_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir" / "metrics.sock"

    async def main() -> None:
        with pytest.raises(MetricsListenerError, match="cannot create metrics socket"):
            await serve_metrics(MetricsConfig(None, missing), site_metrics().exposition)

    trio.run(main)
    assert not missing.parent.exists()
