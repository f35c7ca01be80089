"""ETSI GS QKD 014 v1.1.1 request handling, without I/O: an `ApiRequest` and the `Caller` who
sent it go in, an answer comes out (the types are `qkdd.http_server.exchange`'s).

Owns routing, the caller's SAE identity, validation of the standard's Key request and Key IDs
objects and of query parameters, and the mapping of pool errors to the standard's status codes
(400, 401, 503) and Error object. HTTP framing belongs to `qkdd.http_server`.

Paths under `EXTENSION_PREFIX` are not ETSI: they go to the `extensions` the handler was
given (the daemon's own routes), matched by the longest registered path prefix ending in "/"
or by exact path; this module knows nothing of what they do.

Most answers are ready at once. Two kinds need I/O first, and the handler says so instead of
doing it: a `Deferred` answer (e.g. a key of a non-default size, which the peer site must
confirm) is awaited by the server; a `Streamed` answer (e.g. key events) is a chunked body the
server sends as it is produced. Errors raised while a deferred answer completes map to the
standard's codes exactly as the immediate ones do.
"""

from __future__ import annotations

import functools
import re
import uuid
from binascii import b2a_base64
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, Final, NamedTuple
from urllib.parse import parse_qs, unquote

from qkdd.constants import MAX_SAE_ID_COUNT, MAX_TARGETS
from qkdd.etsi014.key_pool import (
    HandOuts,
    InvalidKeyRequest,
    KeyPool,
    KeyServiceError,
    KeysUnavailable,
    PoolKey,
    UnknownKeys,
)
from qkdd.http_server.exchange import (
    JSON_HEADERS,
    Answer,
    ApiRequest,
    ApiResponse,
    Caller,
    Deferred,
    Extension,
    MethodNotAllowed,
    Reject,
    answer_or_error,
    dump_json,
    error_response,
    json_object,
    reject,
    rejection_response,
    split_target,
)

API_PREFIX = "/api/v1/keys/"
# The project's own routes live under this prefix, outside the standard's paths.
EXTENSION_PREFIX = "/qkdd/"
SAE_HEADER = "x-sae-id"

# Key IDs that are their own JSON text between quotes (joined by commas).
_PLAIN_IDS: Final = re.compile(r"[-0-9A-Za-z.:_~,]*")

_ROUTES: dict[str, tuple[str, ...]] = {
    "status": ("GET",),
    "enc_keys": ("GET", "POST"),
    "dec_keys": ("GET", "POST"),
}


def _optional_int(obj: dict[str, Any], name: str) -> int | None:
    value = obj.get(name)
    # bool is an int in Python but not in JSON.
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        reject(400, f"{name} must be an integer", {name: value})
    return value


def _optional_list(obj: dict[str, Any], name: str) -> list[Any]:
    value = obj.get(name, [])
    if value is None:
        return []
    if not isinstance(value, list):
        reject(400, f"{name} must be an array", {name: value})
    return value


def _single_query(query: dict[str, list[str]], name: str) -> str | None:
    values = query.get(name)
    if values is None:
        return None
    if len(values) != 1:
        reject(400, f"query parameter {name} given {len(values)} times; give it once")
    return values[0]


def _query_int(query: dict[str, list[str]], name: str) -> int | None:
    text = _single_query(query, name)
    if text is None:
        return None
    if not (text.isascii() and text.isdigit()) or len(text) > 9:
        reject(400, f"query parameter {name} must be a positive decimal integer", {name: text})
    return int(text)


class _Target(NamedTuple):
    """What a request target names: its path and parsed query, and for an ETSI route the
    other SAE and the operation (None otherwise)."""

    path: str
    query: dict[str, list[str]]
    other_sae: str | None
    operation: str | None


def _read_target(target: str) -> _Target:
    """The target's parts; 400 (`Reject`) when it is malformed. Routing errors that need
    the method or the caller are left to `RequestHandler._dispatch`."""
    path, raw_query = split_target(target)
    other_sae = operation = None
    if path.startswith(API_PREFIX):
        parts = path[len(API_PREFIX) :].split("/")
        if len(parts) == 2 and parts[0] and parts[1] in _ROUTES:
            other_sae, operation = unquote(parts[0]), parts[1]
    return _Target(path, parse_qs(raw_query, keep_blank_values=True), other_sae, operation)


def _canonical_key_id(value: object) -> str:
    if not isinstance(value, str):
        reject(400, "key_ID must be a string", {"key_ID": value})
    try:
        return str(uuid.UUID(value))
    except ValueError:
        reject(400, f"key_ID {value!r} is not a UUID", {"key_ID": value})


def _key_container(keys: Sequence[PoolKey]) -> bytes:
    """The standard's Key container, {"keys": [{"key_ID": ..., "key": ...}, ...]}, written
    directly: key IDs that need no JSON escaping (UUIDs always) go in as they are."""
    ids = [key.key_id for key in keys]
    if not _PLAIN_IDS.fullmatch(",".join(ids)):
        return dump_json(
            {
                "keys": [
                    {"key_ID": key.key_id, "key": b2a_base64(key.material, newline=False).decode()}
                    for key in keys
                ]
            }
        )
    entries = [
        f'{{"key_ID":"{key_id}","key":"{b2a_base64(key.material, newline=False).decode()}"}}'
        for key_id, key in zip(ids, keys, strict=True)
    ]
    return ('{"keys":[' + ",".join(entries) + "]}").encode()


class RequestHandler:
    """Answers ETSI GS QKD 014 requests from a `KeyPool`; paths under `EXTENSION_PREFIX`
    go to `extensions` (exact path -> route), and are 404 when none matches."""

    def __init__(
        self,
        pool: KeyPool,
        *,
        max_body: int = 64 * 1024,
        extensions: Mapping[str, Extension] = MappingProxyType({}),
        body_limits: Mapping[str, int] = MappingProxyType({}),
        hand_outs: HandOuts | None = None,
    ) -> None:
        """``body_limits`` maps extension path prefixes to the request body size they accept
        instead of ``max_body`` (e.g. the message routes). With ``hand_outs``, enc_keys
        hands keys of the default size out through it (a `Deferred` answer), together with
        the other requests ready at the same moment; without, at once."""
        for path in extensions:
            if not path.startswith(EXTENSION_PREFIX):
                raise ValueError(f"extension path {path!r} must start with {EXTENSION_PREFIX}")
        self.pool = pool
        self.max_body = max_body
        self.extensions = dict(extensions)
        self.body_limits = dict(body_limits)
        self.hand_outs = hand_outs
        self._targets: dict[str, _Target] = {}

    def _target(self, target: str) -> _Target:
        """`_read_target`, remembered (callers send the same few targets again and again)."""
        known = self._targets.get(target)
        if known is None:
            known = _read_target(target)
            if len(self._targets) >= MAX_TARGETS:
                self._targets.clear()
            self._targets[target] = known
        return known

    def body_limit(self, target: str) -> int:
        """The largest request body accepted for this request target (for a malformed one,
        the default: handling it answers 400)."""
        if not self.body_limits:
            return self.max_body
        try:
            path = self._target(target).path
        except Reject:
            return self.max_body
        return max(
            [self.max_body]
            + [limit for prefix, limit in self.body_limits.items() if path.startswith(prefix)]
        )

    def body_too_large(self, target: str, limit: int) -> ApiResponse:
        """The answer to a request whose body is over ``limit`` bytes (read no further).
        ETSI GS QKD 014 answers only 200, 400, 401 and 503, so its routes say 400; the
        daemon's own routes say 413, as plain HTTP does."""
        try:
            path, _query = split_target(target)
        except Reject:
            path = ""
        status = 413 if path.startswith(EXTENSION_PREFIX) else 400
        return error_response(status, _body_over(limit))

    def handle(self, request: ApiRequest, caller: Caller) -> Answer:
        return answer_or_error(self._dispatch, request, caller, _error_for)

    def _dispatch(self, request: ApiRequest, caller: Caller) -> Answer:
        path, query, other_sae, operation = self._target(request.target)
        if path.startswith(EXTENSION_PREFIX):
            route = self._extension(path)
            if route is None:
                reject(404, f"no such resource {path!r}")
            return route(request, caller)
        if not path.startswith(API_PREFIX):
            reject(404, f"no such resource {path!r}; the API lives under {API_PREFIX}")
        if other_sae is None or operation is None:
            reject(404, f"no such resource {path!r}")
        allowed = _ROUTES[operation]
        if request.method not in allowed:
            raise MethodNotAllowed(allowed)
        if len(request.body) > self.max_body:
            reject(400, _body_over(self.max_body))

        own_sae = caller_sae(request, caller, self.pool.knows_sae)
        if not self.pool.knows_sae(other_sae):
            reject(400, f"SAE {other_sae!r} is not known to this KME", {"SAE_ID": other_sae})
        if other_sae == own_sae:
            reject(400, f"SAE {own_sae!r} cannot exchange keys with itself")

        if operation == "status":
            return self._status(own_sae, other_sae)
        if operation == "enc_keys":
            return self._enc_keys(request, query, master=own_sae, slave=other_sae)
        return self._dec_keys(request, query, master=other_sae, slave=own_sae)

    def _extension(self, path: str) -> Extension | None:
        route = self.extensions.get(path)
        if route is not None:
            return route
        prefixes = [p for p in self.extensions if p.endswith("/") and path.startswith(p)]
        return self.extensions[max(prefixes, key=len)] if prefixes else None

    def _status(self, master: str, slave: str) -> ApiResponse:
        st = self.pool.status(master, slave)
        body = dump_json(
            {
                "source_KME_ID": st.source_kme_id,
                "target_KME_ID": st.target_kme_id,
                "master_SAE_ID": master,
                "slave_SAE_ID": slave,
                "key_size": st.key_size,
                "stored_key_count": st.stored_key_count,
                "max_key_count": st.max_key_count,
                "max_key_per_request": st.max_key_per_request,
                "max_key_size": st.max_key_size,
                "min_key_size": st.min_key_size,
                "max_SAE_ID_count": MAX_SAE_ID_COUNT,
            }
            | ({"status_extension": st.extension} if st.extension else {})
        )
        return ApiResponse(
            200,
            JSON_HEADERS,
            body,
            note=f"master={master} slave={slave} stored={st.stored_key_count}",
        )

    def _enc_keys(
        self, request: ApiRequest, query: dict[str, list[str]], *, master: str, slave: str
    ) -> ApiResponse | Deferred:
        additional: list[Any] = []
        if request.method == "GET":
            number = _query_int(query, "number")
            size = _query_int(query, "size")
        else:
            obj = json_object(request.body, "Key request")
            number = _optional_int(obj, "number")
            size = _optional_int(obj, "size")
            additional = _optional_list(obj, "additional_slave_SAE_IDs")
            mandatory = _optional_list(obj, "extension_mandatory")
            if mandatory:
                # No extension is supported, so every mandatory one is unsupported (6.2).
                reject(
                    400,
                    "not all extension_mandatory parameters are supported",
                    {"extension_mandatory_unsupported": mandatory},
                )
            _optional_list(obj, "extension_optional")  # type-checked, then ignored (6.2)

        st = self.pool.limits(master, slave)
        number = 1 if number is None else number
        size = st.key_size if size is None else size
        if not 1 <= number <= st.max_key_per_request:
            reject(
                400,
                f"number must be between 1 and {st.max_key_per_request}"
                + _because(st.max_key_per_request_reason),
                {"number": number},
            )
        if size % 8 or not st.min_key_size <= size <= st.max_key_size:
            reject(
                400,
                f"size must be a multiple of 8 between {st.min_key_size} and "
                f"{st.max_key_size} bits",
                {"size": size},
            )
        extra = self._additional_slaves(additional, master=master, slave=slave)

        def answer(keys: Sequence[PoolKey]) -> ApiResponse:
            return ApiResponse(
                200,
                JSON_HEADERS,
                _key_container(keys),
                note=f"master={master} slave={slave} size={size} "
                + (f"additional={','.join(extra)} " if extra else "")
                + f"key_IDs={','.join(k.key_id for k in keys)}",
            )

        return take_new_keys(
            self.pool, master, slave, number, size, st.key_size, answer, extra, self.hand_outs
        )

    def _additional_slaves(self, raw: list[Any], *, master: str, slave: str) -> tuple[str, ...]:
        if len(raw) > MAX_SAE_ID_COUNT:
            reject(
                400,
                f"at most {MAX_SAE_ID_COUNT} additional_slave_SAE_IDs per request",
                {"count": len(raw)},
            )
        for sae in raw:
            if not isinstance(sae, str):
                reject(400, "additional_slave_SAE_IDs must be strings", {"SAE_ID": sae})
            if not self.pool.knows_sae(sae):
                reject(400, f"SAE {sae!r} is not known to this KME", {"SAE_ID": sae})
            if sae in (master, slave):
                reject(400, f"SAE {sae!r} is already the master or slave of this request")
        if len(set(raw)) != len(raw):
            reject(400, "the same SAE is listed twice in additional_slave_SAE_IDs")
        return tuple(raw)

    def _dec_keys(
        self, request: ApiRequest, query: dict[str, list[str]], *, master: str, slave: str
    ) -> ApiResponse:
        if request.method == "GET":
            key_id = _single_query(query, "key_ID")
            if key_id is None:
                reject(400, "query parameter key_ID is required")
            raw_ids: list[Any] = [key_id]
        else:
            obj = json_object(request.body, "Key IDs")
            entries = obj.get("key_IDs")
            if not isinstance(entries, list) or not entries:
                reject(400, 'key_IDs must be a non-empty array of {"key_ID": ...} objects')
            raw_ids = []
            for entry in entries:
                if not isinstance(entry, dict) or "key_ID" not in entry:
                    reject(
                        400,
                        "each entry of key_IDs must be an object with a key_ID",
                        {"entry": entry},
                    )
                raw_ids.append(entry["key_ID"])
        key_ids = [_canonical_key_id(value) for value in raw_ids]
        if len(set(key_ids)) != len(key_ids):
            reject(400, "the same key_ID is requested more than once")
        st = self.pool.limits(master, slave)
        if len(key_ids) > st.max_key_per_request:
            reject(
                400,
                f"at most {st.max_key_per_request} key_IDs per request"
                + _because(st.max_key_per_request_reason),
                {"count": len(key_ids)},
            )
        keys = self.pool.take_for_slave(master, slave, key_ids)
        return ApiResponse(
            200,
            JSON_HEADERS,
            _key_container(keys),
            note=f"master={master} slave={slave} key_IDs={','.join(key_ids)}",
        )


def _body_over(limit: int) -> str:
    return f"request body over {limit} bytes; no request to this route needs that much"


def _because(reason: str) -> str:
    return f" ({reason})" if reason else ""


def caller_sae(request: ApiRequest, caller: Caller, knows_sae: Callable[[str], bool]) -> str:
    """The SAE the caller acts as (its only one, or the one its X-SAE-ID header picks);
    401 when it may act as none, or not as the one it names, or that SAE is not served."""
    who = caller.describe()
    if not caller.sae_ids:
        reject(401, f"this {who} may not act as any SAE; {caller.how_to_map()}")
    wanted = request.header_values(SAE_HEADER)
    if len(wanted) > 1:
        reject(400, "X-SAE-ID header given more than once")
    if not wanted:
        if len(caller.sae_ids) > 1:
            reject(
                401,
                f"this {who} may act as several SAEs "
                f"({', '.join(sorted(caller.sae_ids))}); pick one with the "
                "X-SAE-ID header",
            )
        (sae,) = caller.sae_ids
    else:
        sae = wanted[0]
        if sae not in caller.sae_ids:
            reject(401, f"this {who} may not act as SAE {sae!r}")
    if not knows_sae(sae):
        reject(401, f"SAE {sae!r} is not served by this KME")
    return sae


def _error_for(exc: Exception) -> ApiResponse:
    """The standard's answer to an exception raised while handling a request; anything that
    is not the key service's own error propagates (the server logs it and answers 503)."""
    if isinstance(exc, Reject):
        return rejection_response(exc)
    return error_response(*pool_failure(exc, service_failure=503))


# -- shared with the other key APIs on the pool (qkdd.skip.provider) ------------------------


def pool_failure(exc: Exception, service_failure: int) -> tuple[int, str]:
    """The status and message that answer an error of the key pool: 400 for keys it does not
    hold or a request it refuses, 503 when too few keys are ready, `service_failure` when
    the key service failed. Anything else is raised again."""
    if isinstance(exc, (UnknownKeys, InvalidKeyRequest)):
        return 400, str(exc)
    if isinstance(exc, KeysUnavailable):
        return 503, str(exc)
    if isinstance(exc, KeyServiceError):
        return service_failure, f"key service failure: {exc}"
    raise exc


def take_new_keys(
    pool: KeyPool,
    master: str,
    slave: str,
    number: int,
    size: int,
    default_size: int,
    answer: Callable[[Sequence[PoolKey]], ApiResponse],
    additional: tuple[str, ...] = (),
    hand_outs: HandOuts | None = None,
) -> ApiResponse | Deferred:
    """`answer` to `number` new keys of `size` bits for `master` and `slave`. Keys of the
    pool's default size for the pair alone are taken at once, or through `hand_outs` when
    given (a `Deferred` answer, with the other requests ready at the same moment); others
    are assigned with the peer site first (a `Deferred` answer)."""
    if size == default_size and not additional:
        if hand_outs is None:
            return answer(pool.take_for_master(master, slave, number, size))
        take = functools.partial(pool.take_for_master, master, slave, number, size)

        async def gathered() -> ApiResponse:
            return answer(await hand_outs(take))

        return Deferred(gathered)

    async def assigned() -> ApiResponse:
        return answer(await pool.take_assigned(master, slave, number, size, additional))

    return Deferred(assigned)
