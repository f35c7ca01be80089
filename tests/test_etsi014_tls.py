"""The ETSI 014 API over real mutual TLS on 127.0.0.1: certificate checks, SAE mapping, the
shared handler and pool with the Unix socket, the TLS clients and qkdctl --url."""

from __future__ import annotations

import json
import logging
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest
import trio
from cryptography import x509
from pki import Credentials, Issuer, Pki, issue, make_pki, new_ca
from timeouts import timeout

from qkdd.client import (
    BlockingKeyClient,
    KeyClient,
    KeyServiceClientError,
    KeyServiceUnreachable,
)
from qkdd.etsi014.handler import RequestHandler
from qkdd.etsi014.memory_pool import MemoryKeyPool
from qkdd.http_server.tls import (
    TlsConfigError,
    sae_ids_from_certificate,
    serve_tls,
    server_ssl_context,
)
from qkdd.http_server.unix_socket import serve_unix

A, B = "SAE-A", "SAE-B"
# SAE A's application is named by a DNS subjectAltName, SAE B's by its Common Name.
CLIENT_NAMES = {"app-a.example": A, "app-b": B}
STATUS_AB = f"/api/v1/keys/{B}/status"


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


# --- servers -------------------------------------------------------------------------------


@dataclass
class Service:
    port: int
    unix_path: str
    pool: MemoryKeyPool
    seen: list[x509.Certificate]

    def tls_client(self, pki: Pki, who: Credentials, sae_id: str | None = None) -> KeyClient:
        return KeyClient.tls(
            "127.0.0.1",
            self.port,
            cert_file=who.cert,
            key_file=who.key,
            ca_file=pki.ca,
            sae_id=sae_id,
        )


async def start_service(
    nursery: trio.Nursery,
    pki: Pki,
    tmp_path: Path,
    handshake_timeout: float = 5.0,
    request_timeout: float = 5.0,
) -> Service:
    """One handler and one pool behind both a Unix socket (which grants SAE B to every local
    user) and a TLS listener (which grants SAEs by certificate name)."""
    pool = MemoryKeyPool([A, B], max_key_per_request=16)
    pool.fill(A, B, 100)
    handler = RequestHandler(pool)
    seen: list[x509.Certificate] = []

    def identify(cert: x509.Certificate) -> frozenset[str]:
        seen.append(cert)
        return sae_ids_from_certificate(cert, CLIENT_NAMES)

    listeners = await nursery.start(
        partial(
            serve_tls,
            "127.0.0.1",
            0,
            handler,
            identify,
            cert_file=pki.server.cert,
            key_file=pki.server.key,
            client_ca_file=pki.ca,
            request_timeout=request_timeout,
            handshake_timeout=handshake_timeout,
        )
    )
    unix_path = str(tmp_path / "api.sock")
    await nursery.start(partial(serve_unix, unix_path, handler, lambda uid, gid: frozenset({B})))
    return Service(listeners[0].socket.getsockname()[1], unix_path, pool, seen)


@pytest.fixture
async def service(nursery: trio.Nursery, pki: Pki, tmp_path: Path) -> AsyncIterator[Service]:
    yield await start_service(nursery, pki, tmp_path)
    nursery.cancel_scope.cancel()


def client_context(
    pki: Pki, who: Credentials | None, *, max_version: ssl.TLSVersion | None = None
) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=pki.ca)
    if who is not None:
        context.load_cert_chain(who.cert, who.key)
    if max_version is not None:
        context.maximum_version = max_version
    return context


async def raw_tls_exchange(port: int, context: ssl.SSLContext) -> bytes:
    """A status request over TLS with `context`; whatever comes back before the end."""
    with trio.fail_after(timeout(5)):
        stream = await trio.open_ssl_over_tcp_stream(
            "127.0.0.1", port, ssl_context=context, https_compatible=True
        )
        async with stream:
            await stream.send_all(
                f"GET {STATUS_AB} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
            )
            received = bytearray()
            while chunk := await stream.receive_some(65536):
                received += chunk
            return bytes(received)


def handshake_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "qkdd.api"
        and "api_tls_handshake_failed" in r.getMessage()
        and r.levelno >= logging.WARNING
    ]


# --- the certificate → SAE rule ------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> Issuer:
    return new_ca("rule CA")


@pytest.mark.parametrize(
    ("common_name", "dns", "expected"),
    [
        ("app-b", [], {B}),  # Common Name
        ("unrelated", ["app-a.example"], {A}),  # DNS subjectAltName
        (None, ["APP-A.Example"], {A}),  # DNS names ignore case
        ("APP-B", [], set()),  # Common Names do not
        ("app-b", ["app-a.example"], {A, B}),  # every matching name grants its SAE
        ("nobody", ["nothing.example"], set()),
        ("*", ["*.example"], set()),  # wildcards never match, even literally
    ],
)
def test_certificate_names_map_to_sae_ids(
    ca: Issuer, common_name: str | None, dns: list[str], expected: set[str]
) -> None:
    _, cert = issue(ca, common_name, dns=dns)
    allowed = {**CLIENT_NAMES, "*": "SAE-STAR", "*.example": "SAE-STAR"}
    assert sae_ids_from_certificate(cert, allowed) == frozenset(expected)


def test_ip_addresses_are_not_names(ca: Issuer) -> None:
    _, cert = issue(ca, None, ips=["127.0.0.1"])
    assert sae_ids_from_certificate(cert, {"127.0.0.1": A}) == frozenset()


def test_bad_tls_files_are_reported_with_the_path(pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(TlsConfigError, match="absent.crt"):
        server_ssl_context(str(tmp_path / "absent.crt"), pki.server.key, pki.ca)
    with pytest.raises(TlsConfigError, match="key must belong"):
        server_ssl_context(pki.server.cert, pki.client_a.key, pki.ca)
    with pytest.raises(TlsConfigError, match="client CA file not found"):
        server_ssl_context(pki.server.cert, pki.server.key, str(tmp_path / "ca.pem"))
    context = server_ssl_context(pki.server.cert, pki.server.key, pki.ca)
    assert context.minimum_version is ssl.TLSVersion.TLSv1_3
    assert context.verify_mode is ssl.CERT_REQUIRED


# --- the service over TLS ------------------------------------------------------------------


async def test_enc_keys_as_sae_a_and_dec_keys_as_sae_b(service: Service, pki: Pki) -> None:
    async with (
        service.tls_client(pki, pki.client_a) as master,
        service.tls_client(pki, pki.client_b) as slave,
    ):
        status = await master.status(B)
        assert (status["master_SAE_ID"], status["stored_key_count"]) == (A, 100)
        keys = await master.enc_keys(B, number=3, size=256)
        assert [len(k.material) for k in keys] == [32] * 3
        assert await slave.dec_keys(A, [k.key_id for k in keys]) == keys
        # Keep-alive: both connections were made once and identified once each.
        assert len(service.seen) == 2
        with pytest.raises(KeyServiceClientError) as info:  # each key is handed out once
            await slave.dec_keys(A, [keys[0].key_id])
        assert info.value.status == 400
    assert service.pool.status(A, B).stored_key_count == 97


async def test_certificate_cannot_claim_another_sae(service: Service, pki: Pki) -> None:
    async with service.tls_client(pki, pki.client_b, sae_id=A) as client:
        with pytest.raises(KeyServiceClientError) as info:
            await client.enc_keys(B)
        assert info.value.status == 401 and A in info.value.message
    assert service.pool.status(A, B).stored_key_count == 100


async def test_blocking_tls_client(service: Service, pki: Pki) -> None:
    def exchange() -> tuple[list[bytes], list[bytes]]:
        with (
            BlockingKeyClient.tls(
                "localhost",
                service.port,
                cert_file=pki.client_a.cert,
                key_file=pki.client_a.key,
                ca_file=pki.ca,
            ) as master,
            BlockingKeyClient.tls(
                "127.0.0.1",
                service.port,
                cert_file=pki.client_b.cert,
                key_file=pki.client_b.key,
                ca_file=pki.ca,
            ) as slave,
        ):
            keys = master.enc_keys(B, number=2)
            got = slave.dec_keys(A, [k.key_id for k in keys])
            return [k.material for k in keys], [k.material for k in got]

    sent, received = await trio.to_thread.run_sync(exchange)
    assert len(sent) == 2 and sent == received


async def test_key_enc_over_tls_is_dec_over_the_unix_socket(service: Service, pki: Pki) -> None:
    async with (
        service.tls_client(pki, pki.client_a) as master,
        KeyClient(service.unix_path) as local_b,
    ):
        keys = await master.enc_keys(B, number=2)
        assert await local_b.dec_keys(A, [k.key_id for k in keys]) == keys
        # And the pool is one: the TLS side sees what the Unix side took.
        assert (await master.status(B))["stored_key_count"] == 98


async def test_unmapped_certificate_gets_401_with_the_error_object(
    service: Service, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    async with service.tls_client(pki, pki.stranger) as client:
        status, body = await client.request("GET", STATUS_AB, None)
        assert status == 401
        error = json.loads(body)
        assert set(error) == {"message", "details"} and isinstance(error["message"], str)
        with pytest.raises(KeyServiceClientError) as info:
            await client.enc_keys(B)
        assert info.value.status == 401
    assert service.pool.status(A, B).stored_key_count == 100
    # The answer names the certificate and where to map it, not a uid TLS does not have.
    assert "uid" not in error["message"] and "None" not in error["message"], error
    assert "client certificate" in error["message"] and "CN=stranger" in error["message"]
    assert "[api.tls.clients]" in error["message"]
    unmapped = [r.getMessage() for r in caplog.records if "api_tls_unmapped" in r.getMessage()]
    assert len(unmapped) == 1 and "stranger" in unmapped[0] and "x.example" in unmapped[0]


async def test_client_without_certificate_is_refused(
    service: Service, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(trio.BrokenResourceError):
        await raw_tls_exchange(service.port, client_context(pki, None))
    await wait_for_log(caplog, "PEER_DID_NOT_RETURN_A_CERTIFICATE")
    (line,) = handshake_warnings(caplog)
    assert "peer=127.0.0.1:" in line
    assert service.seen == []


async def test_untrusted_ca_is_refused(
    service: Service, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    client = service.tls_client(pki, pki.rogue)
    async with client:
        with pytest.raises(KeyServiceUnreachable, match="refused this client's TLS"):
            await client.enc_keys(B)
    await wait_for_log(caplog, "CERTIFICATE_VERIFY_FAILED")
    (line,) = handshake_warnings(caplog)
    assert "peer=127.0.0.1:" in line and "client CA" in line
    assert service.seen == [] and service.pool.status(A, B).stored_key_count == 100


async def test_tls_1_2_client_is_refused(
    service: Service, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    context = client_context(pki, pki.client_a, max_version=ssl.TLSVersion.TLSv1_2)
    with pytest.raises(trio.BrokenResourceError) as info:
        await raw_tls_exchange(service.port, context)
    assert isinstance(info.value.__cause__, ssl.SSLError)
    await wait_for_log(caplog, "api_tls_handshake_failed")
    (line,) = handshake_warnings(caplog)
    assert "peer=127.0.0.1:" in line and "TLS 1.3" in line


async def test_client_checks_the_service_certificate(
    service: Service, pki: Pki, tmp_path: Path
) -> None:
    # The service's certificate does not carry this name.
    client = KeyClient.tls(
        "127.0.0.1",
        service.port,
        cert_file=pki.client_a.cert,
        key_file=pki.client_a.key,
        ca_file=pki.ca,
        server_hostname="kme.example",
    )
    async with client:
        with pytest.raises(KeyServiceUnreachable, match="not trusted"):
            await client.status(B)
    assert service.seen == []


async def test_failed_and_stalled_handshakes_do_not_disturb_others(
    nursery: trio.Nursery, pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="qkdd.api")
    service = await start_service(nursery, pki, tmp_path, handshake_timeout=0.5)
    async with service.tls_client(pki, pki.client_a) as master:
        await master.status(B)  # connection kept alive across what follows
        stalled = await trio.open_tcp_stream("127.0.0.1", service.port)
        plain = await trio.open_tcp_stream("127.0.0.1", service.port)
        await plain.send_all(f"GET {STATUS_AB} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        with trio.fail_after(timeout(5)):
            assert await plain.receive_some(1024) == b""  # closed without an HTTP answer
            for context in (client_context(pki, None), client_context(pki, pki.rogue)):
                with pytest.raises(trio.BrokenResourceError):
                    await raw_tls_exchange(service.port, context)
            assert await stalled.receive_some(1024) == b""  # closed after the deadline
        await stalled.aclose()
        await plain.aclose()
        assert len(await master.enc_keys(B, number=2)) == 2
    async with service.tls_client(pki, pki.client_b) as slave:
        assert (await slave.status(A))["master_SAE_ID"] == B
    text = caplog.text
    assert "api_tls_handshake_timeout" in text and "plain HTTP" in text
    assert len(service.seen) == 2


async def test_kept_alive_connection_closed_when_idle_is_reopened(
    nursery: trio.Nursery, pki: Pki, tmp_path: Path
) -> None:
    service = await start_service(nursery, pki, tmp_path, request_timeout=0.3)
    async with service.tls_client(pki, pki.client_a) as client:
        await client.status(B)
        await trio.sleep(0.6)  # the service closes the idle connection meanwhile
        assert len(await client.enc_keys(B)) == 1
    assert len(service.seen) == 2


async def test_oversized_request_is_answered_400_over_tls(service: Service, pki: Pki) -> None:
    head = f"POST /api/v1/keys/{B}/enc_keys HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n"
    with trio.fail_after(timeout(5)):
        stream = await trio.open_ssl_over_tcp_stream(
            "127.0.0.1",
            service.port,
            ssl_context=client_context(pki, pki.client_a),
            https_compatible=True,
        )
        async with stream:
            await stream.send_all(head.encode() + b"\r\n" + b"{" * 50000)
            received = bytearray()
            while chunk := await stream.receive_some(65536):
                received += chunk
    assert received.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert service.pool.status(A, B).stored_key_count == 100


async def test_inherited_listener_is_served(pki: Pki) -> None:
    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listener.socket.getsockname()[1]
    pool = MemoryKeyPool([A, B])
    pool.fill(A, B, 3)
    async with trio.open_nursery() as nursery:
        await nursery.start(
            partial(
                serve_tls,
                "ignored",
                0,
                RequestHandler(pool),
                partial(sae_ids_from_certificate, allowed=CLIENT_NAMES),
                cert_file=pki.server.cert,
                key_file=pki.server.key,
                client_ca_file=pki.ca,
                listeners=[listener],
            )
        )
        client = KeyClient.tls(
            "127.0.0.1",
            port,
            cert_file=pki.client_a.cert,
            key_file=pki.client_a.key,
            ca_file=pki.ca,
        )
        async with client:
            assert (await client.status(B))["stored_key_count"] == 3
        nursery.cancel_scope.cancel()


async def test_address_in_use_is_a_config_error(service: Service, pki: Pki) -> None:
    with pytest.raises(TlsConfigError, match=f"127.0.0.1:{service.port}"):
        await serve_tls(
            "127.0.0.1",
            service.port,
            RequestHandler(service.pool),
            lambda cert: frozenset(),
            cert_file=pki.server.cert,
            key_file=pki.server.key,
            client_ca_file=pki.ca,
        )


async def wait_for_log(caplog: pytest.LogCaptureFixture, fragment: str) -> None:
    """The server may log a refused handshake just after the client saw the refusal."""
    with trio.fail_after(timeout(5)):
        while fragment not in caplog.text:
            await trio.sleep(0.01)


# --- qkdctl --url --------------------------------------------------------------------------


async def qkdctl(*args: str) -> subprocess.CompletedProcess[bytes]:
    return await trio.run_process(
        [sys.executable, "-m", "qkdd.ctl", *args],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )


async def test_qkdctl_over_tls(service: Service, pki: Pki) -> None:
    url = f"https://127.0.0.1:{service.port}"

    def tls_args(who: Credentials) -> list[str]:
        return ["--url", url, "--cert", who.cert, "--key", who.key, "--cacert", pki.ca]

    enc = await qkdctl(*tls_args(pki.client_a), "enc-keys", B, "--number", "2")
    assert enc.returncode == 0, enc.stderr
    keys = json.loads(enc.stdout)["keys"]
    assert len(keys) == 2
    dec = await qkdctl(
        *tls_args(pki.client_b), "--compact", "dec-keys", A, *(k["key_ID"] for k in keys)
    )
    assert dec.returncode == 0, dec.stderr
    assert json.loads(dec.stdout)["keys"] == keys

    refused = await qkdctl(*tls_args(pki.stranger), "status", B)
    assert refused.returncode == 1
    assert b"refused (401)" in refused.stderr
    rogue = await qkdctl(*tls_args(pki.rogue), "status", B)
    assert rogue.returncode == 1
    assert b"refused this client's TLS" in rogue.stderr
    assert b"Traceback" not in rogue.stderr


async def test_qkdctl_service_not_listening(pki: Pki) -> None:
    with trio.socket.socket() as sock:  # a port nobody listens on
        await sock.bind(("127.0.0.1", 0))
        url = f"https://127.0.0.1:{sock.getsockname()[1]}"
        done = await qkdctl(
            *("--url", url, "--cert", pki.client_a.cert, "--key", pki.client_a.key),
            *("--cacert", pki.ca, "status", B),
        )
    assert done.returncode == 1
    assert b"connection refused" in done.stderr and url.encode() in done.stderr


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--url", "https://127.0.0.1:1"], "needs --cert"),
        (["--url", "http://127.0.0.1:1", "--cert", "c.pem"], "https://"),
        (["--url", "https://127.0.0.1:1/api", "--cert", "c.pem"], "HOST:PORT"),
        (["--cert", "c.pem"], "only apply with --url"),
        (
            ["--url", "https://127.0.0.1:1", "--socket", "x.sock", "--cert", "c.pem"],
            "not allowed with",
        ),
    ],
)
async def test_qkdctl_tls_usage_errors(args: list[str], fragment: str) -> None:
    done = await qkdctl(*args, "status", B)
    assert done.returncode == 2
    assert fragment.encode() in done.stderr


async def test_qkdctl_unreadable_certificate(tmp_path: Path) -> None:
    done = await qkdctl(
        "--url", "https://127.0.0.1:1", "--cert", str(tmp_path / "no.pem"), "status", B
    )
    assert done.returncode == 1
    assert b"no.pem" in done.stderr and b"Traceback" not in done.stderr
