"""The API server's fast path (``qkdd.http_server.plain_http``): a plain request is read as h11
reads it, anything else is left to h11, and answers are written byte for byte as h11 writes
them; then the same through the server on a real Unix socket, where requests read either way
share one connection."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import h11
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from test_etsi014_server import BOTH, A, B, parse_responses, raw
from timeouts import timeout

from qkdd.etsi014.handler import RequestHandler
from qkdd.etsi014.memory_pool import MemoryKeyPool
from qkdd.http_server.exchange import ApiRequest, ApiResponse, Caller, Streamed, error_response
from qkdd.http_server.plain_http import PlainResponses, parse_plain, reason
from qkdd.http_server.unix_socket import serve_unix

MAX_HEAD = 8 * 1024


def no_limit(target: str) -> int:
    return 1 << 30


def read_by_h11(data: bytes) -> tuple[str, str, tuple[tuple[str, str], ...], bytes, int]:
    """What h11 reads from ``data``: method, target, headers, body, and the bytes left."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
    conn.receive_data(data)
    request = conn.next_event()
    assert isinstance(request, h11.Request), request
    body = bytearray()
    while not isinstance(event := conn.next_event(), h11.EndOfMessage):
        assert isinstance(event, h11.Data), event
        body += event.data
    return (
        request.method.decode(),
        request.target.decode(),
        tuple((name.decode(), value.decode("latin-1")) for name, value in request.headers),
        bytes(body),
        len(conn.trailing_data[0]),
    )


PLAIN = [
    b"GET /api/v1/keys/SAE-B/status HTTP/1.1\r\nHost: localhost\r\n\r\n",
    b"POST /api/v1/keys/SAE-B/enc_keys HTTP/1.1\r\nhost: x\r\nX-SAE-ID: SAE-A\r\n"
    b'Content-Type: application/json\r\ncontent-length: 13\r\n\r\n{"number": 2}',
    b"GET /api/v1/keys/SAE%20B/enc_keys?number=3&size=256 HTTP/1.1\r\n"
    b"Host:  spaced   \r\nAccept:\r\nX-Odd:\ta \t b\t\r\n\r\n",
    b"DELETE /x HTTP/1.1\r\nHost: h\r\nContent-Length: 0007\r\n\r\nabcdefg",
    # A second request follows the first: only the first is read.
    b"GET /a HTTP/1.1\r\nHost: h\r\n\r\nGET /b HTTP/1.1\r\nHost: h\r\n\r\n",
]


@pytest.mark.parametrize("data", PLAIN)
def test_a_plain_request_is_read_as_h11_reads_it(data: bytes) -> None:
    plain = parse_plain(data, MAX_HEAD, no_limit)
    assert plain is not None
    method, target, headers, body, left = read_by_h11(data)
    assert (plain.method, plain.target, plain.headers, plain.body) == (
        method,
        target,
        headers,
        body,
    )
    assert plain.used == len(data) - left


LEFT_TO_H11 = {
    "incomplete head": b"GET / HTTP/1.1\r\nHost: h\r\n",
    "incomplete body": b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nabc",
    "HTTP/1.0": b"GET / HTTP/1.0\r\nHost: h\r\n\r\n",
    "chunked": b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "100-continue": b"POST / HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\n"
    b"Content-Length: 1\r\n\r\nx",
    "connection header": b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
    "upgrade": b"GET / HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\n\r\n",
    "no host": b"GET / HTTP/1.1\r\nAccept: */*\r\n\r\n",
    "two hosts": b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    "two lengths": b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx",
    "length list": b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1, 1\r\n\r\nx",
    "obsolete fold": b"GET / HTTP/1.1\r\nHost: h\r\nX-A: a\r\n b\r\n\r\n",
    "bare LF": b"GET / HTTP/1.1\nHost: h\n\n",
    "LF inside": b"GET / HTTP/1.1\r\nHost: h\nX: y\r\n\r\n",
    "space before colon": b"GET / HTTP/1.1\r\nHost : h\r\n\r\n",
    "non-ASCII value": "GET / HTTP/1.1\r\nHost: h\r\nX-N: caf\u00e9\r\n\r\n".encode(),
    "non-ASCII target": "GET /caf\u00e9 HTTP/1.1\r\nHost: h\r\n\r\n".encode(),
    "lower-case method": b"get / HTTP/1.1\r\nHost: h\r\n\r\n",
    "leading empty line": b"\r\nGET / HTTP/1.1\r\nHost: h\r\n\r\n",
    "head over the limit": b"GET / HTTP/1.1\r\nHost: h\r\nX: " + b"a" * MAX_HEAD + b"\r\n\r\n",
}


@pytest.mark.parametrize("data", LEFT_TO_H11.values(), ids=LEFT_TO_H11.keys())
def test_anything_else_is_left_to_h11(data: bytes) -> None:
    assert parse_plain(data, MAX_HEAD, no_limit) is None


def test_a_body_over_the_routes_limit_is_left_to_h11() -> None:
    data = b"POST /big HTTP/1.1\r\nHost: h\r\nContent-Length: 11\r\n\r\nhello world"
    assert parse_plain(data, MAX_HEAD, lambda target: 10) is None
    assert parse_plain(data, MAX_HEAD, lambda target: 11) is not None
    assert parse_plain(data, MAX_HEAD, lambda target: 10) is None  # a head read before too


def test_a_head_read_before_is_read_again_with_its_own_body() -> None:
    head = b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\n"
    for body in (b"abc", b"xyz"):
        plain = parse_plain(head + body + b"GET", MAX_HEAD, no_limit)
        assert plain is not None and plain.body == body and plain.used == len(head) + 3
    assert parse_plain(head + b"ab", MAX_HEAD, no_limit) is None  # the body is not all there


HEADER_TEXT = st.text(alphabet=" \t:-aZ09\r\n\x00\x7f\u00e9,;=", max_size=12)


@settings(max_examples=400, deadline=None)
@given(
    method=st.sampled_from(["GET", "POST", "get", "PUT", "G ET"]),
    target=st.text(alphabet="/a%?=& \x00\u00e9", min_size=1, max_size=8),
    version=st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/2"]),
    headers=st.lists(st.tuples(HEADER_TEXT, HEADER_TEXT), max_size=5),
    host=st.integers(0, 2),
    body=st.binary(max_size=4),
    length=st.sampled_from([None, "exact", "0", "99", "1, 1", "-1"]),
)
def test_whatever_is_read_plainly_h11_reads_the_same(
    method: str,
    target: str,
    version: str,
    headers: list[tuple[str, str]],
    host: int,
    body: bytes,
    length: str | None,
) -> None:
    lines = [f"{method} {target} {version}"]
    lines += ["Host: h"] * host
    lines += [f"{name}:{value}" for name, value in headers]
    if length is not None:
        lines.append(f"Content-Length: {len(body) if length == 'exact' else length}")
    data = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8") + body
    plain = parse_plain(data, MAX_HEAD, no_limit)
    if plain is None:
        return
    method_, target_, headers_, body_, left = read_by_h11(data)
    assert (plain.method, plain.target, plain.headers, plain.body) == (
        method_,
        target_,
        headers_,
        body_,
    )
    assert plain.used == len(data) - left


def written_by_h11(status: int, headers: list[tuple[str, str]], body: bytes, method: str) -> bytes:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(f"{method} / HTTP/1.1\r\nHost: h\r\n\r\n".encode())
    assert isinstance(conn.next_event(), h11.Request)
    assert isinstance(conn.next_event(), h11.EndOfMessage)
    data = conn.send(
        h11.Response(
            status_code=status,
            headers=[*headers, ("content-length", str(len(body)))],
            reason=reason(status),
        )
    )
    assert data is not None
    if body and method != "HEAD":
        data += conn.send(h11.Data(data=body)) or b""
    return data + (conn.send(h11.EndOfMessage()) or b"")


ANSWERS = [
    (200, [("content-type", "application/json")], b'{"keys":[]}', "POST"),
    (400, [("content-type", "application/json")], b'{"message":"no"}', "GET"),
    (405, [("content-type", "application/json"), ("allow", "GET, POST")], b"{}", "PUT"),
    (503, [], b"", "GET"),
    (200, [("Content-Type", "text/plain; version=0.0.4")], b"x 1\n", "HEAD"),
    (299, [("x-a", "b \t c")], b"z", "GET"),
]


@pytest.mark.parametrize(("status", "headers", "body", "method"), ANSWERS)
def test_answers_are_written_as_h11_writes_them(
    status: int, headers: list[tuple[str, str]], body: bytes, method: str
) -> None:
    responses = PlainResponses()
    for _ in range(2):  # written, then reused
        head = responses.head(status, tuple(headers), len(body))
        assert head is not None
        written = head + (body if method != "HEAD" else b"")
        assert written == written_by_h11(status, headers, body, method)


@pytest.mark.parametrize(
    ("status", "headers"),
    [
        (200, (("x-a", "b\r\nx-injected: 1"),)),
        (200, (("x a", "b"),)),
        (200, (("x-a", " leading space"),)),
        (200, (("content-length", "3"),)),
        (200, (("Connection", "close"),)),
        (200, (("x-a", "caf\u00e9"),)),
        (204, ()),
        (101, ()),
    ],
)
def test_answers_that_are_not_plain_are_left_to_h11(
    status: int, headers: tuple[tuple[str, str], ...]
) -> None:
    assert PlainResponses().head(status, headers, 0) is None


# -- through the server --


def _events(request: ApiRequest, caller: Caller) -> Streamed:
    async def chunks() -> AsyncIterator[bytes]:
        for n in range(3):
            yield b"%d\n" % n

    return Streamed(200, (("content-type", "text/plain"),), chunks)


def _no_content(request: ApiRequest, caller: Caller) -> ApiResponse:
    return ApiResponse(204, (), b"")


async def start(nursery: trio.Nursery, tmp_path: Path) -> str:
    pool = MemoryKeyPool([A, B], max_key_per_request=128)
    pool.fill(A, B, 100)
    handler = RequestHandler(
        pool,
        extensions={"/qkdd/v1/events": _events, "/qkdd/v1/nothing": _no_content},
    )
    path = str(tmp_path / "api.sock")
    await nursery.start(
        lambda task_status: serve_unix(path, handler, lambda u, g: BOTH, task_status=task_status)
    )
    return path


def enc(number: int) -> bytes:
    body = json.dumps({"number": number}).encode()
    return (
        f"POST /api/v1/keys/{B}/enc_keys HTTP/1.1\r\nHost: h\r\nX-SAE-ID: {A}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


CHUNKED_ENC = (
    f"POST /api/v1/keys/{B}/enc_keys HTTP/1.1\r\nHost: h\r\nX-SAE-ID: {A}\r\n"
    'Transfer-Encoding: chunked\r\n\r\nd\r\n{"number": 3}\r\n0\r\n\r\n'
).encode()
CLOSE = (
    f"GET /api/v1/keys/{B}/status HTTP/1.1\r\nHost: h\r\nX-SAE-ID: {A}\r\nConnection: close\r\n\r\n"
).encode()


async def test_plain_and_h11_requests_take_turns_on_one_connection(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    path = await start(nursery, tmp_path)
    # Pipelined in one write: plain, chunked (h11), plain, plain, then one that closes.
    answers = parse_responses(await raw(path, enc(1) + CHUNKED_ENC + enc(2) + enc(4) + CLOSE))
    assert [status for status, _, _ in answers] == [200] * 5
    counts = [len(json.loads(body).get("keys", [])) for _, _, body in answers[:4]]
    assert counts == [1, 3, 2, 4]
    assert "stored_key_count" in json.loads(answers[4][2])
    ids = [k["key_ID"] for _, _, body in answers[:4] for k in json.loads(body)["keys"]]
    assert len(set(ids)) == 10


async def test_a_request_read_plainly_may_still_get_an_answer_h11_writes(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    path = await start(nursery, tmp_path)
    nothing = f"GET /qkdd/v1/nothing HTTP/1.1\r\nHost: h\r\nX-SAE-ID: {A}\r\n\r\n".encode()
    events = f"GET /qkdd/v1/events HTTP/1.1\r\nHost: h\r\nX-SAE-ID: {A}\r\n\r\n".encode()
    # 204 (h11 frames it), then a plain answer, then a streamed one (which ends the connection).
    data = await raw(path, nothing + enc(1) + events)
    assert data.startswith(b"HTTP/1.1 204 No Content\r\n")
    answers = parse_responses(data)
    assert [status for status, _, _ in answers] == [204, 200, 200]
    assert answers[2][1]["transfer-encoding"] == "chunked" and answers[2][2] == b"0\n1\n2\n"


async def test_a_plain_request_split_over_reads_is_served(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    path = await start(nursery, tmp_path)
    with trio.fail_after(timeout(5)):
        stream = await trio.open_unix_socket(path)
        async with stream:
            request = enc(2)
            for i in range(0, len(request), 7):
                await stream.send_all(request[i : i + 7])
                await trio.sleep(0.005)
            await stream.send_all(CLOSE)
            received = bytearray()
            while chunk := await stream.receive_some(65536):
                received += chunk
    answers = parse_responses(bytes(received))
    assert [status for status, _, _ in answers] == [200, 200]
    assert len(json.loads(answers[0][2])["keys"]) == 2


def test_error_answers_are_plain() -> None:
    # Every error the handler writes can take the fast path.
    response = error_response(405, "no", headers=(("allow", "GET, POST"),))
    assert PlainResponses().head(response.status, response.headers, len(response.body))
