"""Every decoder of outside input, fuzzed: whatever bytes arrive, only the decoder's documented
error classes may escape (anything else is a crash).

One `Decoder` per input surface: the inputs it is fed (random bytes, mutations of genuine
messages, and hand-written known-bad cases), the call that decodes them and the errors it
documents. The default suite runs a few hundred examples per decoder; the campaigns behind
``-m slow`` run many more (QKDD_FUZZ_EXAMPLES, 20,000 per decoder by default).

    decoder                         documented errors
    serial framing                  FrameError (decode_frame); feed() returns them, never raises
    serial device protocol          none: receive_data() reports bad frames as events
    serial messages                 MessageError
    peer handshake, both roles      RemoteProtocolError (PeerAuthenticationError is one)
    peer session frames             RemoteProtocolError
    peer link messages              RemoteProtocolError
    peer calls                      RemoteProtocolError
    ETSI 014 request handler        none: every request gets an ApiResponse
    site config loader              ConfigError
"""

from __future__ import annotations

import base64
import contextlib
import functools
import json
import os
import tempfile
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from timeouts import timeout

from drivers.device_errors import FrameError, MessageError
from drivers.serial.framing import FrameDecoder, decode_frame, encode_frame
from drivers.serial.protocol import DeviceProtocol, HostProtocol
from drivers.serial.serial_messages import LinkState
from drivers.serial.serial_messages import decode_message as decode_serial_message
from qkdd.config import ConfigError, load_config
from qkdd.crypto import SIGNATURE_PUBLIC_KEY_SIZE, SigningKey
from qkdd.crypto.select import select_backend
from qkdd.demo_sites import SITE_A, render
from qkdd.etsi014.handler import RequestHandler
from qkdd.etsi014.memory_pool import MemoryKeyPool
from qkdd.http_server.exchange import ApiRequest, ApiResponse, Caller, Deferred, Streamed
from qkdd.http_server.unix_socket import serve_unix
from qkdd.metrics import SiteMetrics
from qkdd.peer.agreement_messages import (
    BatchAck,
    BatchDecision,
    BatchPurpose,
    CallReply,
    KemOffer,
    KeyBatch,
    PadDemand,
    PeerCall,
    PoolDemand,
    QkdHorizon,
    Resync,
    StoreId,
)
from qkdd.peer.agreement_messages import decode_message as decode_link_message
from qkdd.peer.calls import KeyAssign, KeyAssignment, Protection, SealedMessage, WgInstall
from qkdd.peer.connection import PeerConnection, Role
from qkdd.peer.peer_errors import RemoteProtocolError
from qkdd.peer.wire import FrameType, make_frame

SHORT_RUN = 300
LONG_RUN = int(os.environ.get("QKDD_FUZZ_EXAMPLES", "20000"))


@dataclass(frozen=True)
class Decoder:
    name: str
    inputs: Callable[[], st.SearchStrategy[Any]]
    decode: Callable[[Any], object]
    allowed: tuple[type[BaseException], ...]
    # Known-bad inputs tried on every run, whatever hypothesis draws.
    corpus: Sequence[Any] = ()

    def __str__(self) -> str:
        return self.name

    __repr__ = __str__  # the corpus is long

    def feed(self, value: Any) -> None:
        with contextlib.suppress(self.allowed):
            self.decode(value)


# -- mutation of genuine inputs --------------------------------------------------------


@st.composite
def mutated(draw: st.DrawFn, seeds: Callable[[], Sequence[bytes]]) -> bytes:
    """A genuine input with a few bytes flipped, inserted, cut out, or the tail cut off."""
    data = bytearray(draw(st.sampled_from(list(seeds()))))
    for _ in range(draw(st.integers(0, 6))):
        op = draw(st.integers(0, 3))
        pos = draw(st.integers(0, len(data)))
        if op == 0 and data:
            data[min(pos, len(data) - 1)] ^= draw(st.integers(1, 255))
        elif op == 1:
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == 2:
            del data[pos : pos + draw(st.integers(1, 64))]
        else:
            del data[pos:]
    return bytes(data)


def bytes_like(
    seeds: Callable[[], Sequence[bytes]], max_size: int = 2048
) -> st.SearchStrategy[bytes]:
    return st.one_of(st.binary(max_size=max_size), mutated(seeds), st.sampled_from(list(seeds())))


def chunks_like(seeds: Callable[[], Sequence[bytes]]) -> st.SearchStrategy[list[bytes]]:
    return st.lists(bytes_like(seeds), max_size=5)


# -- serial framing, protocol and messages ----------------------------------------------


@functools.cache
def serial_transcript() -> tuple[bytes, ...]:
    """The bytes of a genuine serial session: HELLOs, STATUS, KEYS, ACK."""
    host, dev = HostProtocol(), DeviceProtocol(window=4)
    host.start()
    wire = [host.data_to_send()]
    dev.receive_data(wire[0])
    dev.send_status(LinkState.UP, 0.02, 1000)
    wire.append(dev.data_to_send())
    host.receive_data(wire[-1])
    dev.add_keys([(uuid.uuid4().bytes, os.urandom(32)) for _ in range(3)])
    dev.poll(0.0)
    wire.append(dev.data_to_send())
    events = host.receive_data(wire[-1])
    key_ids = [k.key_id for e in events for k in getattr(e, "keys", ())]
    host.acknowledge(key_ids)
    wire.append(host.data_to_send())
    return tuple(w for w in wire if w)


def serial_frames() -> Sequence[bytes]:
    return [encode_frame(1, t, 7, os.urandom(20)) for t in range(1, 6)] + list(serial_transcript())


def _feed_framing(chunks: list[bytes]) -> None:
    decoder = FrameDecoder()
    for chunk in chunks:
        decoder.feed(chunk)
        decode_frame(chunk.strip(b"\x00"))


def _feed_serial_framing(chunks: list[bytes]) -> None:
    decoder = FrameDecoder()
    for chunk in chunks:
        decoder.feed(chunk)


def _feed_device_protocol(chunks: list[bytes]) -> None:
    host, dev = HostProtocol(), DeviceProtocol()
    host.start()
    dev.receive_data(host.data_to_send())
    host.receive_data(dev.data_to_send())
    for chunk in chunks:
        host.receive_data(chunk)
        dev.receive_data(chunk)
        host.data_to_send()
        dev.data_to_send()
        dev.poll(1.0)


def _decode_serial_message(item: tuple[int, bytes]) -> None:
    decode_serial_message(*item)


# -- the peer protocol ------------------------------------------------------------------


class _Trust:
    def __init__(self, pins: dict[str, bytes]) -> None:
        self.pins = pins

    def pinned_key(self, site_id: str) -> bytes | None:
        return self.pins.get(site_id)

    def bootstrap_allowed(self, site_id: str) -> bool:
        return True

    def auth_key(self, site_id: str, key_id: str) -> bytes | None:
        return None


@functools.cache
def _identities() -> dict[str, SigningKey]:
    backend = select_backend("cryptography")
    return {site: backend.signing_key_from_seed(os.urandom(32)) for site in ("site-a", "site-b")}


def _peer(role: Role) -> PeerConnection:
    ids = _identities()
    local = "site-a" if role is Role.INITIATOR else "site-b"
    return PeerConnection(
        role,
        backend=select_backend("cryptography"),
        local_site_id=local,
        signing_key=ids[local],
        trust=_Trust({site: key.public_bytes for site, key in ids.items()}),
        expected_peer="site-b" if role is Role.INITIATOR else None,
    )


@functools.cache
def peer_transcript() -> tuple[bytes, ...]:
    """HELLO, RESPONSE, FINISH and two session frames of a genuine bootstrap handshake."""
    initiator, responder = _peer(Role.INITIATOR), _peer(Role.RESPONDER)
    initiator.initiate()
    hello = initiator.data_to_send()
    responder.receive_data(hello)
    response = responder.data_to_send()
    initiator.receive_data(response)
    finish = initiator.data_to_send()
    responder.receive_data(finish)
    initiator.send_message(b"to b")
    initiator.update_send_key()
    session = initiator.data_to_send()
    return hello, response, finish, session


def peer_frames() -> Sequence[bytes]:
    made = [
        make_frame(kind, os.urandom(40))
        for kind in (FrameType.HELLO, FrameType.RESPONSE, FrameType.FINISH, FrameType.DATA)
    ]
    return [f.header + f.body for f in made] + list(peer_transcript())


def _feed_peer(connection: PeerConnection, chunks: list[bytes]) -> None:
    for chunk in chunks:
        connection.receive_data(chunk)
        connection.data_to_send()


def _feed_responder(chunks: list[bytes]) -> None:
    _feed_peer(_peer(Role.RESPONDER), chunks)


def _feed_responder_after_hello(chunks: list[bytes]) -> None:
    responder = _peer(Role.RESPONDER)
    responder.receive_data(peer_transcript()[0])
    _feed_peer(responder, chunks)


def _feed_initiator(chunks: list[bytes]) -> None:
    initiator = _peer(Role.INITIATOR)
    initiator.initiate()
    _feed_peer(initiator, chunks)


@functools.cache
def link_messages() -> tuple[bytes, ...]:
    key = str(uuid.uuid4())
    messages = [
        KemOffer(7, os.urandom(1184)),
        KeyBatch(
            1,
            7,
            BatchPurpose.APPLICATION_KEYS,
            os.urandom(1088),
            "sae-a",
            "sae-b",
            256,
            4096,
            uuid.uuid4().bytes,
            4096,
            os.urandom(32),
        ),
        KeyBatch(
            2,
            8,
            BatchPurpose.PADS,
            os.urandom(1088),
            "sae-a",
            "sae-b",
            8192,
            2,
            uuid.UUID(key).bytes,
            3,
            os.urandom(32),
            (uuid.UUID(key).bytes, os.urandom(16), os.urandom(16)),
        ),
        BatchAck(2, False, "device desync"),
        BatchDecision(3, True),
        PoolDemand((("sae-a", "sae-b", 12),)),
        PadDemand((("sae-a", "sae-b", 2),)),
        Resync((1, 2, 3)),
        StoreId(b"\x07" * 16),
        QkdHorizon((key,)),
        PeerCall(5, 1, b"body"),
        CallReply(5, 0, b"done"),
    ]
    return tuple(m.encode() for m in messages)


@functools.cache
def call_bodies() -> tuple[bytes, ...]:
    key = str(uuid.uuid4())
    return (
        KeyAssign(
            (KeyAssignment(key, 512, "sae-a", ("sae-b", "sae-c"), (str(uuid.uuid4()),)),)
        ).encode(),
        SealedMessage(
            str(uuid.uuid4()), "sae-a", "sae-b", Protection.HYBRID, (key,), b"x" * 40
        ).encode(),
        SealedMessage(
            str(uuid.uuid4()), "sae-a", "sae-b", Protection.OTP, (key, key), b"x"
        ).encode(),
        WgInstall("wg0-peer", key).encode(),
    )


def _decode_calls(body: bytes) -> None:
    for decode in (KeyAssign.decode, SealedMessage.decode, WgInstall.decode):
        with contextlib.suppress(RemoteProtocolError):
            decode(body)


# -- the ETSI 014 request handler --------------------------------------------------------

A, B, C = "SAE-A", "SAE-B", "SAE-C"
_TARGET_PARTS = [
    "/api/v1/keys/",
    "/api/v1/keys",
    "SAE-A",
    "SAE-B",
    "SAE-C",
    "/status",
    "/enc_keys",
    "/dec_keys",
    "/",
    "?",
    "&",
    "=",
    "number=",
    "size=",
    "key_ID=",
    "1",
    "256",
    "-3",
    "[",
    "]",
    "::1",
    "//[",
    "http://[",
    "%",
    "%ZZ",
    "%2F",
    "%00",
    "#",
    "//",
    "http://",
    "https://",
    ":",
    "@",
    "/qkdd/",
    "/qkdd/status",
    "\x00",
    " ",
    "é",
    "\U0001f511",
    ";",
    "..",
    str(uuid.UUID(int=1)),
]
_JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False),
    st.text(max_size=20),
)
_JSON = st.recursive(
    _JSON_SCALARS | st.just([]) | st.just({}),
    lambda inner: (
        st.lists(inner, min_size=1, max_size=4)
        | st.dictionaries(st.text(max_size=12), inner, min_size=1, max_size=4)
    ),
    max_leaves=12,
)
_ETSI_KEYS = [
    "number",
    "size",
    "additional_slave_SAE_IDs",
    "extension_mandatory",
    "extension_optional",
    "key_IDs",
    "key_ID",
]


@st.composite
def etsi_requests(draw: st.DrawFn) -> tuple[ApiRequest, Caller]:
    target = draw(
        st.one_of(
            st.lists(st.sampled_from(_TARGET_PARTS), max_size=8).map("".join),
            st.text(max_size=60),
        )
    )
    method = draw(st.sampled_from(["GET", "POST", "HEAD", "PUT", "DELETE", "", "get"]))
    headers = draw(
        st.lists(
            st.tuples(
                st.sampled_from(["x-sae-id", "content-type", "host", "x-other"]),
                st.one_of(st.sampled_from([A, B, C, "", "application/json"]), st.text(max_size=10)),
            ),
            max_size=3,
        )
    )
    body_obj = draw(
        st.one_of(
            _JSON,
            st.dictionaries(st.sampled_from(_ETSI_KEYS), _JSON, max_size=4),
            st.fixed_dictionaries(
                {"key_IDs": st.lists(st.dictionaries(st.just("key_ID"), _JSON), max_size=3)}
            ),
        )
    )
    body = draw(
        st.one_of(
            st.just(json.dumps(body_obj).encode()),
            st.binary(max_size=200),
            st.just(b""),
        )
    )
    caller = Caller(
        draw(st.none() | st.integers(0, 2**32 - 1)),
        draw(st.none() | st.integers(0, 2**32 - 1)),
        frozenset(draw(st.sets(st.sampled_from([A, B, C, "unknown"]), max_size=3))),
    )
    return ApiRequest(method, target, tuple(headers), body), caller


def _etsi_handler() -> RequestHandler:
    pool = MemoryKeyPool([A, B, C], max_key_per_request=16)
    pool.fill(A, B, 64)
    pool.fill(B, A, 64)

    def extension(request: ApiRequest, caller: Caller) -> ApiResponse:
        return ApiResponse(200, (), b"{}")

    return RequestHandler(pool, max_body=1024, extensions={"/qkdd/status": extension})


def _handle_etsi(item: tuple[ApiRequest, Caller]) -> None:
    request, caller = item
    handler = _etsi_handler()
    limit = handler.body_limit(request.target)
    assert isinstance(limit, int) and limit >= 0
    answer = handler.handle(request, caller)
    if isinstance(answer, Deferred):
        answer = trio.run(answer.complete)
    assert isinstance(answer, ApiResponse | Streamed), answer
    assert 200 <= answer.status < 600


def _etsi(target: str, method: str = "GET") -> tuple[ApiRequest, Caller]:
    return ApiRequest(method, target), Caller(1000, 1000, frozenset({A}))


ETSI_BAD_TARGETS = [
    "http://[",
    "//[::1",
    "/api/v1/keys/[x/enc_keys",
    "//[/api/v1/keys/SAE-B/status",
    "http://[::1/api/v1/keys/SAE-B/enc_keys",
    "/qkdd/status?x=[",
    "//]",
    "http://a]b/",
    "//[::1]x/api/v1/keys/SAE-B/status",
]


# -- the site config loader -------------------------------------------------------------


@functools.cache
def config_dir() -> Path:
    # One directory for the whole run; each example overwrites the same file.
    return Path(tempfile.mkdtemp(prefix="qkdd-fuzz-config-"))


@functools.cache
def genuine_config() -> bytes:
    """Site A's demo config with the peer's key inline, so that it loads in full and the
    fuzzer reaches every key."""
    key = base64.b64encode(os.urandom(SIGNATURE_PUBLIC_KEY_SIZE)).decode()
    text = render(SITE_A).replace(
        'public_key_file = "site-b/identity.pub"', f'public_key = "{key}"'
    )
    return text.encode()


def config_seeds() -> Sequence[bytes]:
    text = genuine_config()
    return [
        text,
        text.replace(b"site-a", b"site-\xff"),
        b"\xef\xbb\xbf" + text,  # a UTF-8 byte-order mark
        text.decode().encode("utf-16"),
        text.decode().encode("latin-1") + "site_id = 'é'".encode("latin-1"),
    ]


_TOML_SCALARS = st.one_of(
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(),
    st.text(max_size=30),
    st.sampled_from(["127.0.0.1:0", "host:³", "[::1]:1", ":", "\x00", "/dev/null", "credential:"]),
)
_TOML_VALUES = st.recursive(
    _TOML_SCALARS | st.just([]) | st.just({}),
    lambda inner: (
        st.lists(inner, min_size=1, max_size=3)
        | st.dictionaries(st.text(max_size=10), inner, min_size=1, max_size=3)
    ),
    max_leaves=8,
)


def _toml_literal(value: Any) -> str:
    """`value` as an inline TOML value (enough of TOML for what _TOML_VALUES makes)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return {"inf": "inf", "-inf": "-inf", "nan": "nan"}.get(str(value), repr(value))
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string is a JSON string, escapes included
    if isinstance(value, list):
        return "[" + ", ".join(_toml_literal(v) for v in value) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {_toml_literal(v)}" for k, v in value.items()) + "}"


@st.composite
def config_with_a_value_replaced(draw: st.DrawFn) -> bytes:
    """The genuine config with one `key = value` line given another value, or one line
    dropped: a well-formed file whose content is wrong somewhere."""
    lines = genuine_config().decode().splitlines()
    assignments = [i for i, line in enumerate(lines) if "=" in line and not line.startswith("#")]
    index = draw(st.sampled_from(assignments))
    if draw(st.booleans()):
        key = lines[index].split("=", 1)[0].strip()
        lines[index] = f"{key} = {_toml_literal(draw(_TOML_VALUES))}"
    else:
        del lines[index]
    return "\n".join(lines).encode()


def _load_config_bytes(data: bytes) -> None:
    path = config_dir() / "site.toml"
    path.write_bytes(data)
    load_config(path)


CONFIG_CORPUS = [
    b"\xff\xfe\x00",
    b'site_id = "\xc3\x28"',
    b"\x80" * 10,
    b"site_id = ",
    b"a = " + b"[" * 5000,
    b"a = " + b"{b=" * 5000,
    b"\x00",
    b"",
]


DECODERS = [
    Decoder("serial-framing", lambda: chunks_like(serial_frames), _feed_serial_framing, ()),
    Decoder(
        "serial-decode-frame",
        lambda: bytes_like(serial_frames).map(lambda b: b.strip(b"\x00")),
        decode_frame,
        (FrameError,),
    ),
    Decoder(
        "serial-device-protocol", lambda: chunks_like(serial_frames), _feed_device_protocol, ()
    ),
    Decoder(
        "serial-messages",
        lambda: st.tuples(st.integers(0, 15), st.binary(max_size=1200)),
        _decode_serial_message,
        (MessageError,),
    ),
    Decoder(
        "peer-responder", lambda: chunks_like(peer_frames), _feed_responder, (RemoteProtocolError,)
    ),
    Decoder(
        "peer-responder-after-hello",
        lambda: chunks_like(peer_frames),
        _feed_responder_after_hello,
        (RemoteProtocolError,),
    ),
    Decoder(
        "peer-initiator", lambda: chunks_like(peer_frames), _feed_initiator, (RemoteProtocolError,)
    ),
    Decoder(
        "peer-link-messages",
        lambda: bytes_like(link_messages),
        decode_link_message,
        (RemoteProtocolError,),
    ),
    Decoder("peer-calls", lambda: bytes_like(call_bodies), _decode_calls, ()),
    Decoder(
        "etsi014-handler",
        etsi_requests,
        _handle_etsi,
        (),
        corpus=[_etsi(t) for t in ETSI_BAD_TARGETS] + [_etsi(t, "POST") for t in ETSI_BAD_TARGETS],
    ),
    Decoder(
        "config-loader",
        lambda: st.one_of(bytes_like(config_seeds, 4096), config_with_a_value_replaced()),
        _load_config_bytes,
        (ConfigError,),
        corpus=CONFIG_CORPUS,
    ),
]


@pytest.mark.parametrize(
    ("decoder", "value"),
    [(d, v) for d in DECODERS for v in d.corpus],
    ids=[f"{d}-{i}" for d in DECODERS for i in range(len(d.corpus))],
)
def test_known_bad_inputs(decoder: Decoder, value: Any) -> None:
    decoder.feed(value)


@pytest.mark.parametrize("decoder", DECODERS, ids=str)
@settings(max_examples=SHORT_RUN, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz(decoder: Decoder, data: st.DataObject) -> None:
    decoder.feed(data.draw(decoder.inputs()))


@pytest.mark.slow
@pytest.mark.parametrize("decoder", DECODERS, ids=str)
@settings(max_examples=LONG_RUN, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzz_campaign(decoder: Decoder, data: st.DataObject) -> None:
    decoder.feed(data.draw(decoder.inputs()))


@pytest.mark.parametrize("target", ETSI_BAD_TARGETS)
def test_malformed_request_target_is_400(target: str) -> None:
    request, caller = _etsi(target)
    handler = _etsi_handler()
    answer = handler.handle(request, caller)
    assert isinstance(answer, ApiResponse)
    assert answer.status in (400, 404), answer
    assert "message" in json.loads(answer.body)
    assert handler.body_limit(target) == handler.max_body


def test_genuine_inputs_decode() -> None:
    """The seeds are genuine: the mutations start from inputs the decoders accept."""
    _load_config_bytes(genuine_config())
    for body in link_messages():
        decode_link_message(body)
    KeyAssign.decode(call_bodies()[0])
    assert len(peer_transcript()) == 4 and len(serial_transcript()) == 4


async def test_malformed_target_through_the_server_is_400_without_a_traceback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The whole path a target takes in the daemon: h11, the body limit, the handler and the
    request metrics."""
    metrics = SiteMetrics("site-a", "cryptography", ())
    path = str(tmp_path / "api.sock")
    async with trio.open_nursery() as nursery:
        await nursery.start(
            functools.partial(
                serve_unix,
                path,
                _etsi_handler(),
                lambda uid, gid: frozenset({A}),
                observe=metrics.observe_request,
            )
        )
        for target in ("http://[", "//[::1", "/api/v1/keys/[x/enc_keys"):
            with trio.fail_after(timeout(10)):
                stream = await trio.open_unix_socket(path)
                async with stream:
                    request = f"POST {target} HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
                    await stream.send_all(request.encode() + b"Connection: close\r\n\r\n{}")
                    answer = bytearray()
                    while chunk := await stream.receive_some(4096):
                        answer += chunk
            assert answer.startswith(b"HTTP/1.1 400 "), (target, bytes(answer))
        nursery.cancel_scope.cancel()
    assert "Traceback" not in caplog.text and "api_observe_failed" not in caplog.text
