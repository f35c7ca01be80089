"""The light client's sans-IO layers on their own: the HTTP/1.1 connection (`qkdd.client.http`)
against hand-written responses and against h11 (an independent HTTP/1.1 implementation) as the
server on both sides of the wire, and the whole-answer and line-stream collectors
(`qkdd.client.roundtrip`, `qkdd.client.api`). Bytes in, events out: no sockets."""

from __future__ import annotations

import json

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qkdd.client import BadResponse, DeliveredKey, KeyServiceClientError, KeyServiceUnreachable
from qkdd.client.api import LineStream, Message, dec_keys, enc_keys
from qkdd.client.endpoint import KEY_SERVICE
from qkdd.client.http import (
    ClientConnection,
    ConnectionClosed,
    Data,
    EndOfMessage,
    Event,
    HttpProtocolError,
    Response,
)
from qkdd.client.roundtrip import Exchange


def feed(conn: ClientConnection, wire: bytes, step: int = 0) -> list[Event]:
    """All of `wire`, in pieces of `step` bytes (0: at once)."""
    events: list[Event] = []
    pieces = [wire[i : i + step] for i in range(0, len(wire), step)] if step else [wire]
    for piece in pieces:
        events += conn.receive(piece)
    return events


def body_of(events: list[Event]) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, Data))


def answer(wire: bytes, method: str = "GET", step: int = 0) -> tuple[ClientConnection, list]:
    conn = ClientConnection("localhost")
    conn.send_request(method, "/x")
    return conn, feed(conn, wire, step)


# -- requests -----------------------------------------------------------------------------


def test_request_bytes_and_h11_reads_them_as_sent() -> None:
    conn = ClientConnection("localhost")
    wire = conn.send_request("POST", "/api/v1/keys/B/enc_keys", [("X-SAE-ID", "A")], b'{"n":1}')
    assert wire == (
        b"POST /api/v1/keys/B/enc_keys HTTP/1.1\r\nHost: localhost\r\nX-SAE-ID: A\r\n"
        b'Content-Length: 7\r\n\r\n{"n":1}'
    )
    server = h11.Connection(h11.SERVER)
    server.receive_data(wire)
    request = server.next_event()
    assert isinstance(request, h11.Request) and request.target == b"/api/v1/keys/B/enc_keys"
    assert (b"x-sae-id", b"A") in list(request.headers)
    assert server.next_event() == h11.Data(data=b'{"n":1}')
    assert isinstance(server.next_event(), h11.EndOfMessage)
    with pytest.raises(RuntimeError):  # one request at a time
        conn.send_request("GET", "/")


@pytest.mark.parametrize(
    ("method", "target", "headers"),
    [
        ("GET", "/a b", []),
        ("GET", "/a\r\nX: y", []),
        ("G T", "/", []),
        ("GET", "", []),
        ("GET", "/", [("X-SAE-ID", "a\r\nInjected: 1")]),
        ("GET", "/", [("X-SAE-ID", "caf\u00e9")]),
        ("GET", "/", [("Bad Name", "x")]),
    ],
)
def test_requests_that_cannot_be_written_are_refused(
    method: str, target: str, headers: list[tuple[str, str]]
) -> None:
    conn = ClientConnection("localhost")
    with pytest.raises(ValueError):
        conn.send_request(method, target, headers)
    assert conn.send_request("GET", "/")  # nothing was half-sent


# -- response framing ----------------------------------------------------------------------


@pytest.mark.parametrize("step", [0, 1, 3])
def test_content_length_body_then_the_next_request(step: int) -> None:
    conn, events = answer(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\n\r\nhello", step=step)
    (response,) = [e for e in events if isinstance(e, Response)]
    assert (response.status, response.reason, response.http_version) == (200, "OK", "1.1")
    assert response.header("x-a") == "1" and response.header("X-A") == "1"
    assert body_of(events) == b"hello" and isinstance(events[-1], EndOfMessage)
    assert conn.next_cycle()
    conn.send_request("GET", "/y")
    events = feed(conn, b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n", step)
    assert [type(e) for e in events] == [Response, EndOfMessage]
    assert conn.next_cycle()


@pytest.mark.parametrize("step", [0, 1, 2, 7])
def test_chunked_body_with_extensions_and_trailers(step: int) -> None:
    wire = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;name=value\r\nhello\r\n1 \r\n,\r\nA\r\n world!!!!\r\n10\r\n0123456789abcdef\r\n"
        b"0\r\nX-Trailer: t\r\n\r\n"
    )
    conn, events = answer(wire, step=step)
    assert body_of(events) == b"hello, world!!!!0123456789abcdef"
    assert isinstance(events[-1], EndOfMessage) and conn.next_cycle()


def test_lf_line_ends_and_empty_lines_before_the_status_line_are_read() -> None:
    conn, events = answer(b"\r\nHTTP/1.1 200 OK\nContent-Length: 2\n\nok")
    assert body_of(events) == b"ok" and conn.next_cycle()


def test_interim_answers_are_skipped() -> None:
    wire = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx"
    _conn, events = answer(wire, step=1)
    assert [e.status for e in events if isinstance(e, Response)] == [200]
    assert body_of(events) == b"x"


@pytest.mark.parametrize(("method", "status"), [("HEAD", 200), ("GET", 204), ("GET", 304)])
def test_answers_without_a_body(method: str, status: int) -> None:
    wire = f"HTTP/1.1 {status} X\r\nContent-Length: 10\r\n\r\n".encode()
    conn, events = answer(wire, method=method)
    assert [type(e) for e in events] == [Response, EndOfMessage] and conn.next_cycle()


def test_body_to_the_end_of_the_connection_is_not_kept_alive() -> None:
    conn, events = answer(b"HTTP/1.1 200 OK\r\n\r\nall of ", step=2)
    assert body_of(events) == b"all of " and not any(isinstance(e, EndOfMessage) for e in events)
    events = conn.receive(b"it") + conn.receive(b"")
    assert body_of(events) == b"it" and isinstance(events[-1], EndOfMessage)
    assert not conn.next_cycle()


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nConnection: keep-alive, Close\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n",
        # Both framings: chunked wins, and the connection is not reused.
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        # More bytes than the answer: not a connection to send on.
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\nHTTP/1.1 200 OK\r\n",
    ],
)
def test_connections_that_must_close(head: bytes) -> None:
    conn, events = answer(head)
    assert isinstance(events[-1], EndOfMessage)
    assert not conn.next_cycle()


def test_a_request_asking_to_close_is_not_kept_alive() -> None:
    conn = ClientConnection("localhost")
    conn.send_request("GET", "/", [("Connection", "close")])
    conn.receive(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert not conn.next_cycle()


@pytest.mark.parametrize(
    "wire",
    [
        b"",
        b"HTTP/1.1 200 OK\r\nContent-Le",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhel",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n",
    ],
)
def test_the_end_of_the_connection_before_the_whole_answer(wire: bytes) -> None:
    conn, events = answer(wire)
    events += conn.receive(b"")
    assert isinstance(events[-1], ConnectionClosed)
    assert not any(isinstance(e, EndOfMessage) for e in events)
    assert conn.receive(b"more") == [] and not conn.next_cycle()


@pytest.mark.parametrize(
    ("wire", "words"),
    [
        (b"HTTP/1.1 2000 OK\r\n\r\n", "status line"),
        (b"HTTP/2.0 200 OK\r\n\r\n", "not HTTP/1"),
        (b"SSH-2.0-OpenSSH\r\n\r\n", "status line"),
        (b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\n\r\n", "obs-fold"),
        (b"HTTP/1.1 200 OK\r\nX : a\r\n\r\n", "header line"),
        (b"HTTP/1.1 200 OK\r\nX: a\x00b\r\n\r\n", "header line"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1, 2\r\n\r\n", "Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", "Content-Length"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", "transfer coding"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "chunk-size"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nab\r\n", "longer"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"1" * 2000, "chunk-size"),
        (b"HTTP/1.1 101 Switching Protocols\r\n\r\n", "101"),
        (b"HTTP/1.1 200 OK\r\n" + b"X: " + b"a" * 70000 + b"\r\n\r\n", "head is over"),
    ],
)
def test_malformed_answers_are_protocol_errors(wire: bytes, words: str) -> None:
    conn = ClientConnection("localhost")
    conn.send_request("GET", "/")
    with pytest.raises(HttpProtocolError, match=words):
        feed(conn, wire)
    exchange = Exchange("localhost", KEY_SERVICE)  # and the client tells it as a bad response
    exchange.request("GET", "/", None)
    with pytest.raises(BadResponse, match="malformed HTTP"):
        exchange.receive(wire)


def test_an_endless_head_is_refused_at_the_limit_not_buffered() -> None:
    conn = ClientConnection("localhost", max_head_bytes=1024)
    conn.send_request("GET", "/")
    conn.receive(b"HTTP/1.1 200 OK\r\n")
    with pytest.raises(HttpProtocolError, match="head is over 1024"):
        for _ in range(100):
            conn.receive(b"X-Filler: " + b"y" * 50 + b"\r\n")


# -- against h11 as the server ----------------------------------------------------------------

bodies = st.binary(max_size=3000)
splits = st.lists(st.integers(min_value=1, max_value=700), min_size=1, max_size=6)


def h11_answer(body: bytes, chunks: list[int], framing: str, status: int = 200) -> bytes:
    """The bytes h11 (as a server) sends for `body`, written in pieces of `chunks` sizes."""
    server = h11.Connection(h11.SERVER)
    server.receive_data(b"GET /x HTTP/1.1\r\nHost: localhost\r\n\r\n")
    server.next_event()
    server.next_event()
    headers = [("content-length", str(len(body)))] if framing == "length" else []
    if framing == "chunked":
        headers = [("transfer-encoding", "chunked")]
    wire = server.send(h11.Response(status_code=status, headers=headers)) or b""
    rest, sizes = body, iter(chunks * (len(body) + 1))
    while rest:
        size = next(sizes)
        wire += server.send(h11.Data(data=rest[:size])) or b""
        rest = rest[size:]
    return wire + (server.send(h11.EndOfMessage()) or b"")


@settings(max_examples=150, deadline=None)
@given(
    bodies,
    splits,
    st.sampled_from(["length", "chunked"]),
    st.integers(min_value=1, max_value=64),
)
def test_any_answer_h11_writes_is_read_whole_in_any_pieces(
    body: bytes, chunks: list[int], framing: str, step: int
) -> None:
    conn = ClientConnection("localhost")
    for round_ in range(2):  # and again on the same, kept-alive connection
        conn.send_request("GET", "/x")
        events = feed(conn, h11_answer(body, chunks, framing, 200 + round_), step)
        assert [e.status for e in events if isinstance(e, Response)] == [200 + round_]
        assert body_of(events) == body
        assert isinstance(events[-1], EndOfMessage)
        assert conn.next_cycle()


# -- whole answers and streams ---------------------------------------------------------------


def exchange_answer(wire: bytes, max_body: int = 1 << 20) -> tuple[int, bytes] | None:
    exchange = Exchange("localhost", KEY_SERVICE, max_body=max_body)
    exchange.request("GET", "/x", None, [("X-SAE-ID", "A")])
    return exchange.receive(wire)


def test_exchange_collects_the_status_and_body() -> None:
    wire = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 4\r\n\r\n{}\r\n"
    assert exchange_answer(wire) == (400, b"{}\r\n")
    assert exchange_answer(wire[:-1]) is None


def test_exchange_refuses_an_answer_over_its_limit() -> None:
    with pytest.raises(BadResponse, match="over 10 bytes"):
        exchange_answer(b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n" + b"x" * 11, 10)


def test_exchange_says_when_the_service_closed_without_answering() -> None:
    exchange = Exchange("localhost", KEY_SERVICE)
    exchange.request("GET", "/x", None)
    with pytest.raises(KeyServiceUnreachable, match="before answering"):
        exchange.receive(b"")


def stream_of(sae_id: str | None = None) -> LineStream:
    stream = LineStream("localhost")
    wire = stream.request("/qkdd/v1/events", sae_id)
    assert wire.startswith(b"GET /qkdd/v1/events HTTP/1.1\r\n")
    return stream


def chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def test_line_stream_yields_objects_across_chunk_boundaries() -> None:
    stream = stream_of("A")
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    assert stream.receive(head + chunk(b'{"event":"a",')) == []
    assert stream.receive(chunk(b'"seq":1}\n\n{"event":"b","seq":2}\n{"ev')) == [
        {"event": "a", "seq": 1},
        {"event": "b", "seq": 2},
    ]
    assert stream.receive(chunk(b'ent":"c"}\n') + b"0\r\n\r\n") == [{"event": "c"}]
    assert stream.ended


def test_line_stream_raises_the_services_error_object() -> None:
    stream = stream_of()
    body = json.dumps({"message": "kinds must be ...", "details": [{"kinds": "x"}]}).encode()
    wire = f"HTTP/1.1 400 Bad Request\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
    with pytest.raises(KeyServiceClientError) as info:
        stream.receive(wire)
    assert info.value.status == 400 and info.value.details == [{"kinds": "x"}]


@pytest.mark.parametrize("line", [b"[1, 2]\n", b"{not json\n"])
def test_line_stream_refuses_lines_that_are_not_objects(line: bytes) -> None:
    stream = stream_of()
    with pytest.raises(BadResponse):
        stream.receive(b"HTTP/1.1 200 OK\r\n\r\n" + line)


# -- calls and values ------------------------------------------------------------------------


def test_key_container_decodes_and_keeps_material_out_of_reprs() -> None:
    call = enc_keys("SAE B/1", 2, 512, ["C"])
    assert (call.method, call.target) == ("POST", "/api/v1/keys/SAE%20B%2F1/enc_keys")
    assert json.loads(call.body or b"") == {
        "number": 2,
        "size": 512,
        "additional_slave_SAE_IDs": ["C"],
    }
    body = b'{"keys": [{"key_ID": "k1", "key": "c2VjcmV0LWtleS1tYXRlcmlhbA=="}]}'
    (key,) = call.decode(200, body)
    assert key == DeliveredKey("k1", b"secret-key-material")
    assert key != DeliveredKey("k1", b"secret-key-materiaL")
    assert key != DeliveredKey("k2", b"secret-key-material")
    assert "secret" not in repr(key) and "c2Vj" not in repr(key)
    assert "secret" not in repr(Data(b"secret")) and "secret" not in repr(call)
    message = Message("m", 1, "A", "site-a", "hybrid", 0.0, b"secret body")
    assert "secret" not in repr(message)


@pytest.mark.parametrize(
    "body",
    [b'{"keys": [{"key_ID": "k1", "key": "not base64!"}]}', b'{"keys": [{"key": "AA=="}]}'],
)
def test_malformed_key_containers_are_bad_responses_that_show_no_material(body: bytes) -> None:
    with pytest.raises(BadResponse) as info:
        dec_keys("A", ["k1"]).decode(200, body)
    assert "not base64" not in str(info.value) and "AA==" not in str(info.value)


def test_dec_keys_wants_a_list_of_ids() -> None:
    with pytest.raises(TypeError):
        dec_keys("A", "one-id")
