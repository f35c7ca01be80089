"""The SKIP key provider without I/O: the Secure Key Integration Protocol (IETF
draft-cisco-skip) as routers and switches speak it, answered from the daemon's key pool.

Owns SKIP's routes and message formats, the mapping of SKIP's system IDs to SAE IDs and of
SKIP key IDs to qkdd's key IDs, the checks of query parameters, and which HTTP status each
failure gets. An `ApiRequest` and the `Caller` behind it (a verified client certificate,
granted its local system ID by the listener) go in; an `ApiResponse`, or a `Deferred` one
for a key that the peer site must confirm first, comes out. Sockets, TLS and HTTP framing
belong to `qkdd.skip.listener` and `qkdd.http_server`.

Routes (GET only; every answer is a JSON object):

    GET /capabilities                        {"entropy", "key", "algorithm",
                                              "localSystemID", "remoteSystemID": [...]}
    GET /key?remoteSystemID=R[&size=BITS]    {"keyId", "key"}: a new key for R
    GET /key/{keyId}?remoteSystemID=R        {"keyId", "key"}: the key R's router was given
    GET /entropy[?minentropy=BITS]           {"randomStr", "minentropy"}

Systems: the caller's local system ID is the SAE ID of a local consumer, and each
remoteSystemID the operator lists names an SAE at a peer site. ``GET /key`` is the ETSI
enc_keys of that pair (the local SAE is master), ``GET /key/{keyId}`` its dec_keys (the
remote SAE is master): the same pools, each key handed out once at each site.

Key IDs: a SKIP keyId is qkdd's key ID (a UUID) as 32 lower-case hexadecimal digits, the
UUID's 128 bits without dashes; the far site turns it back into the same UUID. Keys and
entropy are hexadecimal (keys lower case; randomStr upper case, as in the draft's example).

Errors are ``{"message": "..."}`` (the body is qkdd's; the draft defines none) with the
draft's status codes: 400 for a malformed request, an unknown remoteSystemID, keyId or
size, and a key that is not held (never made, or already fetched); 404 for an unknown
path; 405 for a method other than GET; 500 for a failure of the key service; 503 when
entropy is not served. Beyond the draft: 503 when no key is ready now (retry later), and
401 for a certificate that maps to no local system (or to several), as on the ETSI
listener (the draft leaves authorisation to TLS).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Final, NoReturn
from urllib.parse import parse_qs, unquote

from qkdd.etsi014.handler import pool_failure, take_new_keys
from qkdd.etsi014.key_pool import KeyPool, PoolKey, UnknownKeys
from qkdd.http_server.exchange import (
    Answer,
    ApiRequest,
    ApiResponse,
    Caller,
    Deferred,
    answer_or_error,
)

__all__ = [
    "ALGORITHM",
    "DEFAULT_ENTROPY_BITS",
    "DEFAULT_KEY_BITS",
    "MAX_ENTROPY_BITS",
    "SkipProvider",
    "key_id_from_skip",
    "skip_key_id",
]

# What `algorithm` in the capabilities names: how the keys are made.
ALGORITHM: Final = "qkdd-hybrid-QKD-ML-KEM-768"
# The size of a key and of entropy when the request names none (the draft's default).
DEFAULT_KEY_BITS: Final = 256
DEFAULT_ENTROPY_BITS: Final = 256
MAX_ENTROPY_BITS: Final = 8192
# A SKIP request is a GET without a body; anything larger is not one.
MAX_BODY: Final = 1024

_HEADERS: Final = (("content-type", "application/json"), ("cache-control", "no-store"))
_SKIP_KEY_ID: Final = re.compile(r"[0-9A-Fa-f]{32}")
# What a request target may hold (RFC 3986 pchar, "/" and "?").
_TARGET_CHARS: Final = re.compile(r"(?:[A-Za-z0-9\-._~!$&'()*+,;=:@/?]|%[0-9A-Fa-f]{2})*")
_KEY_PREFIX: Final = "/key/"
_ROUTE_PARAMETERS: Final = {
    "capabilities": frozenset[str](),
    "key": frozenset({"remoteSystemID", "size"}),
    "key_by_id": frozenset({"remoteSystemID"}),
    "entropy": frozenset({"minentropy"}),
}

# (local SAE ID, remote SAE ID) -> whether this site makes keys for that pair.
TalksTo = Callable[[str, str], bool]


def skip_key_id(key_id: str) -> str:
    """The SKIP keyId of a qkdd key ID: its UUID as 32 lower-case hexadecimal digits."""
    return uuid.UUID(key_id).hex


def key_id_from_skip(skip_id: str) -> str:
    """The qkdd key ID (a canonical UUID) a SKIP keyId names; ValueError if it is not 32
    hexadecimal digits."""
    if not _SKIP_KEY_ID.fullmatch(skip_id):
        raise ValueError(f"keyId {skip_id!r} is not 32 hexadecimal digits")
    return str(uuid.UUID(hex=skip_id))


class _Refusal(Exception):
    """Ends handling of one request with a SKIP error answer."""

    def __init__(self, status: int, message: str, headers: tuple[tuple[str, str], ...] = ()):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


def _refuse(status: int, message: str) -> NoReturn:
    raise _Refusal(status, message)


def _error(status: int, message: str, headers: tuple[tuple[str, str], ...] = ()) -> ApiResponse:
    body = json.dumps({"message": message}).encode()
    return ApiResponse(status, _HEADERS + headers, body, note=f"message={message!r}")


def _ok(obj: dict[str, object], note: str) -> ApiResponse:
    return ApiResponse(200, _HEADERS, json.dumps(obj, separators=(",", ":")).encode(), note=note)


class SkipProvider:
    """Answers SKIP requests from a `KeyPool` (the `qkdd.http_server.serving.Handler` protocol).

    ``remote_systems`` maps each remoteSystemID to an SAE ID at a peer site; ``talks_to``
    says which (local, remote) pairs this site makes keys for (what the capabilities list);
    ``random_bytes`` is the entropy source behind GET /entropy (None: no entropy served).
    """

    def __init__(
        self,
        pool: KeyPool,
        remote_systems: Mapping[str, str],
        *,
        talks_to: TalksTo,
        random_bytes: Callable[[int], bytes] | None,
        algorithm: str = ALGORITHM,
    ) -> None:
        self.pool = pool
        self.remote_systems = dict(remote_systems)
        self.talks_to = talks_to
        self.random_bytes = random_bytes
        self.algorithm = algorithm

    # -- the Handler protocol ---------------------------------------------------------------

    def body_limit(self, target: str) -> int:
        return MAX_BODY

    def body_too_large(self, target: str, limit: int) -> ApiResponse:
        return _error(400, f"request body over {limit} bytes; SKIP requests have no body")

    def handle(self, request: ApiRequest, caller: Caller) -> Answer:
        return answer_or_error(self._dispatch, request, caller, _error_for)

    # -- routing ----------------------------------------------------------------------------

    def _dispatch(self, request: ApiRequest, caller: Caller) -> Answer:
        local = self._local_system(caller)
        path, raw_query = _split_target(request.target)
        route, key_id = _route(path)
        if request.method != "GET":
            raise _Refusal(405, "method not allowed; SKIP uses GET", (("allow", "GET"),))
        if request.body:
            _refuse(400, "SKIP requests have no body")
        query = _query(raw_query, _ROUTE_PARAMETERS[route])
        if route == "capabilities":
            return self._capabilities(local)
        if route == "entropy":
            return self._entropy(query)
        remote_id, remote_sae = self._remote_system(query)
        if route == "key":
            return self._new_key(local, remote_id, remote_sae, query)
        assert key_id is not None
        return self._key_by_id(local, remote_id, remote_sae, key_id)

    def _local_system(self, caller: Caller) -> str:
        """The caller's local system ID: the one its certificate maps to."""
        if not caller.sae_ids:
            _refuse(
                401,
                f"this {caller.describe()} maps to no local system ID; map one of its "
                "names or its SHA-256 fingerprint in [skip.clients] of the daemon's config",
            )
        if len(caller.sae_ids) > 1:
            _refuse(
                401,
                f"this {caller.describe()} maps to several local system IDs "
                f"({', '.join(sorted(caller.sae_ids))}); map it to one in [skip.clients]",
            )
        (local,) = caller.sae_ids
        if not self.pool.knows_sae(local):
            _refuse(401, f"local system {local!r} is not served by this key provider")
        return local

    def _remote_system(self, query: Mapping[str, str]) -> tuple[str, str]:
        remote_id = query.get("remoteSystemID")
        if remote_id is None:
            _refuse(400, "query parameter remoteSystemID is required")
        remote_sae = self.remote_systems.get(remote_id)
        if remote_sae is None:
            _refuse(
                400,
                f"unknown remoteSystemID {remote_id!r}; this key provider knows "
                f"{', '.join(sorted(self.remote_systems)) or 'none'}",
            )
        return remote_id, remote_sae

    # -- the four methods -------------------------------------------------------------------

    def _capabilities(self, local: str) -> ApiResponse:
        remotes = sorted(
            remote_id
            for remote_id, remote_sae in self.remote_systems.items()
            if self.talks_to(local, remote_sae)
        )
        body = {
            "entropy": self.random_bytes is not None,
            "key": bool(remotes),
            "algorithm": self.algorithm,
            "localSystemID": local,
            "remoteSystemID": remotes,
        }
        return _ok(body, note=f"local={local} remote={','.join(remotes) or '-'}")

    def _new_key(
        self, local: str, remote_id: str, remote_sae: str, query: Mapping[str, str]
    ) -> ApiResponse | Deferred:
        size = _bits(query, "size", DEFAULT_KEY_BITS)
        limits = self.pool.limits(local, remote_sae)
        if size % 8 or not limits.min_key_size <= size <= limits.max_key_size:
            _refuse(
                400,
                f"size must be a multiple of 8 from {limits.min_key_size} to "
                f"{limits.max_key_size} bits",
            )

        def answer(keys: Sequence[PoolKey]) -> ApiResponse:
            (key,) = keys
            skip_id = skip_key_id(key.key_id)
            return _ok(
                {"keyId": skip_id, "key": key.material.hex()},
                note=f"local={local} remote={remote_id} size={size} keyId={skip_id}",
            )

        return take_new_keys(self.pool, local, remote_sae, 1, size, limits.key_size, answer)

    def _key_by_id(self, local: str, remote_id: str, remote_sae: str, skip_id: str) -> ApiResponse:
        try:
            key_id = key_id_from_skip(skip_id)
        except ValueError as exc:
            _refuse(400, str(exc))
        try:
            (key,) = self.pool.take_for_slave(remote_sae, local, [key_id])
        except UnknownKeys:
            _refuse(
                400,
                f"no key {skip_id.lower()} is held for {remote_id} -> {local} (never made, "
                "already fetched, or not yet agreed with the peer site)",
            )
        return _ok(
            {"keyId": skip_id.lower(), "key": key.material.hex()},
            note=f"local={local} remote={remote_id} keyId={skip_id.lower()}",
        )

    def _entropy(self, query: Mapping[str, str]) -> ApiResponse:
        if self.random_bytes is None:
            _refuse(503, "this key provider serves no entropy (entropy = false in [skip])")
        bits = _bits(query, "minentropy", DEFAULT_ENTROPY_BITS)
        if bits % 8 or not 8 <= bits <= MAX_ENTROPY_BITS:
            _refuse(400, f"minentropy must be a multiple of 8 from 8 to {MAX_ENTROPY_BITS} bits")
        random = self.random_bytes(bits // 8)
        return _ok({"randomStr": random.hex().upper(), "minentropy": bits}, f"bits={bits}")


def _split_target(target: str) -> tuple[str, str]:
    if not target.startswith("/"):
        _refuse(400, "malformed request target; send a path such as /capabilities")
    path, _, query = target.partition("?")
    if not _TARGET_CHARS.fullmatch(path) or not _TARGET_CHARS.fullmatch(query):
        _refuse(400, "malformed request target; percent-encode characters outside RFC 3986")
    return path, query


def _route(path: str) -> tuple[str, str | None]:
    """The route a path names, and the keyId of /key/{keyId}; 404 for any other path."""
    if path in ("/capabilities", "/key", "/entropy"):
        return path[1:], None
    if path.startswith(_KEY_PREFIX) and "/" not in path[len(_KEY_PREFIX) :]:
        key_id = unquote(path[len(_KEY_PREFIX) :])
        if key_id:
            return "key_by_id", key_id
    _refuse(
        404,
        f"no such resource {path!r}; SKIP serves /capabilities, /key, /key/{{keyId}} and /entropy",
    )


def _query(raw: str, allowed: frozenset[str]) -> dict[str, str]:
    try:
        parsed = parse_qs(raw, keep_blank_values=True, strict_parsing=bool(raw))
    except ValueError:
        _refuse(400, "malformed query string")
    query = {}
    for name, values in parsed.items():
        if name not in allowed:
            takes = ", ".join(sorted(allowed)) or "no parameters"
            _refuse(400, f"unknown query parameter {name!r}; this method takes {takes}")
        if len(values) != 1:
            _refuse(400, f"query parameter {name} given {len(values)} times; give it once")
        query[name] = values[0]
    return query


def _bits(query: Mapping[str, str], name: str, default: int) -> int:
    text = query.get(name)
    if text is None:
        return default
    if not (text.isascii() and text.isdigit()) or len(text) > 9:
        _refuse(400, f"{name} must be a positive decimal number of bits")
    return int(text)


def _error_for(exc: Exception) -> ApiResponse:
    """The SKIP answer to an exception raised while handling a request: the pool's errors as
    on the ETSI API, but 500 for a failure of the key service (the draft's code); anything
    that is neither a refusal nor the key service's own error propagates (the server logs it)."""
    if isinstance(exc, _Refusal):
        return _error(exc.status, exc.message, exc.headers)
    return _error(*pool_failure(exc, service_failure=500))
