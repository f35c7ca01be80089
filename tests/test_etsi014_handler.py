"""ETSI GS QKD 014 request handling, sans-IO: requests in, responses out, on a MemoryKeyPool."""

from __future__ import annotations

import base64
import json
import uuid
from typing import Any

import pytest
import trio

from qkdd.etsi014.handler import RequestHandler
from qkdd.etsi014.key_pool import KeyServiceError
from qkdd.etsi014.memory_pool import MemoryKeyPool
from qkdd.http_server.exchange import ApiRequest, ApiResponse, Caller, Deferred

A, B, C = "SAE-A", "SAE-B", "SAE-C"
AS_A = Caller(1000, 1000, frozenset({A}))
AS_B = Caller(1001, 1001, frozenset({B}))
ERROR_KEYS = {"message", "details"}


@pytest.fixture
def pool() -> MemoryKeyPool:
    p = MemoryKeyPool(
        [A, B, C],
        key_size=256,
        min_key_size=64,
        max_key_size=1024,
        max_key_per_request=16,
        max_key_count=1000,
    )
    p.fill(A, B, 100)
    return p


@pytest.fixture
def handler(pool: MemoryKeyPool) -> RequestHandler:
    return RequestHandler(pool, max_body=4096)


def call(
    handler: RequestHandler,
    method: str,
    target: str,
    body: Any = None,
    caller: Caller = AS_A,
    headers: tuple[tuple[str, str], ...] = (),
) -> ApiResponse:
    raw = body if isinstance(body, bytes) else (b"" if body is None else json.dumps(body).encode())
    answer = handler.handle(ApiRequest(method, target, headers, raw), caller)
    if isinstance(answer, Deferred):  # what the server does: await its completion
        return trio.run(answer.complete)
    assert isinstance(answer, ApiResponse)
    return answer


def ok(response: ApiResponse) -> dict[str, Any]:
    assert response.status == 200, response.body
    assert ("content-type", "application/json") in response.headers
    return json.loads(response.body)


def error(response: ApiResponse, status: int) -> dict[str, Any]:
    assert response.status == status, response.body
    obj = json.loads(response.body)
    assert set(obj) == ERROR_KEYS and isinstance(obj["message"], str) and obj["message"]
    assert isinstance(obj["details"], list)
    return obj


def test_status_reports_the_pair_and_pool(handler: RequestHandler) -> None:
    obj = ok(call(handler, "GET", f"/api/v1/keys/{B}/status"))
    assert obj == {
        "source_KME_ID": "KME-local",
        "target_KME_ID": "KME-peer",
        "master_SAE_ID": A,
        "slave_SAE_ID": B,
        "key_size": 256,
        "stored_key_count": 100,
        "max_key_count": 1000,
        "max_key_per_request": 16,
        "max_key_size": 1024,
        "min_key_size": 64,
        "max_SAE_ID_count": 8,
    }


def test_enc_then_dec_gives_both_sides_the_same_keys(
    handler: RequestHandler, pool: MemoryKeyPool
) -> None:
    master = ok(call(handler, "POST", f"/api/v1/keys/{B}/enc_keys", {"number": 3, "size": 512}))
    assert len(master["keys"]) == 3
    for key in master["keys"]:
        assert str(uuid.UUID(key["key_ID"])) == key["key_ID"]
        assert len(base64.b64decode(key["key"], validate=True)) == 64
    ids = [k["key_ID"] for k in master["keys"]]
    slave = ok(
        call(
            handler,
            "POST",
            f"/api/v1/keys/{A}/dec_keys",
            {"key_IDs": [{"key_ID": i} for i in reversed(ids)]},
            caller=AS_B,
        )
    )
    assert slave["keys"] == list(reversed(master["keys"]))
    # 3 keys of 512 bits used 6 keys' worth of 256-bit material.
    assert ok(call(handler, "GET", f"/api/v1/keys/{B}/status"))["stored_key_count"] == 94
    # Collected keys are erased: a second collection fails.
    error(call(handler, "GET", f"/api/v1/keys/{A}/dec_keys?key_ID={ids[0]}", caller=AS_B), 400)
    assert pool.pending_key_ids(A, B) == []


def test_get_enc_keys_uses_query_and_defaults(handler: RequestHandler) -> None:
    one = ok(call(handler, "GET", f"/api/v1/keys/{B}/enc_keys"))
    assert len(one["keys"]) == 1 and len(base64.b64decode(one["keys"][0]["key"])) == 32
    two = ok(call(handler, "GET", f"/api/v1/keys/{B}/enc_keys?number=2&size=64"))
    assert [len(base64.b64decode(k["key"])) for k in two["keys"]] == [8, 8]


def test_get_dec_keys_by_single_key_id(handler: RequestHandler) -> None:
    key = ok(call(handler, "GET", f"/api/v1/keys/{B}/enc_keys"))["keys"][0]
    got = ok(
        call(
            handler, "GET", f"/api/v1/keys/{A}/dec_keys?key_ID={key['key_ID'].upper()}", caller=AS_B
        )
    )
    assert got["keys"] == [key]


def test_keys_go_only_to_the_slave_they_were_made_for(handler: RequestHandler) -> None:
    key = ok(call(handler, "GET", f"/api/v1/keys/{B}/enc_keys"))["keys"][0]
    as_c = Caller(1002, 1002, frozenset({C}))
    error(
        call(handler, "GET", f"/api/v1/keys/{A}/dec_keys?key_ID={key['key_ID']}", caller=as_c), 400
    )
    # The master cannot collect its own key as a slave of itself either.
    error(call(handler, "GET", f"/api/v1/keys/{A}/dec_keys?key_ID={key['key_ID']}"), 400)
    assert ok(
        call(handler, "GET", f"/api/v1/keys/{A}/dec_keys?key_ID={key['key_ID']}", caller=AS_B)
    )["keys"] == [key]


def test_dec_keys_is_all_or_nothing(handler: RequestHandler, pool: MemoryKeyPool) -> None:
    key = ok(call(handler, "GET", f"/api/v1/keys/{B}/enc_keys"))["keys"][0]
    body = {"key_IDs": [{"key_ID": key["key_ID"]}, {"key_ID": str(uuid.uuid4())}]}
    obj = error(call(handler, "POST", f"/api/v1/keys/{A}/dec_keys", body, caller=AS_B), 400)
    assert body["key_IDs"][1]["key_ID"] in obj["message"]
    assert pool.pending_key_ids(A, B) == [key["key_ID"]]


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"number": 0}, "number"),
        ({"number": 17}, "number"),
        ({"number": "2"}, "number"),
        ({"number": True}, "number"),
        ({"size": 100}, "multiple of 8"),
        ({"size": 56}, "size"),
        ({"size": 1032}, "size"),
        ({"size": 256.0}, "size"),
        ({"additional_slave_SAE_IDs": ["SAE-X"]}, "not known"),
        ({"additional_slave_SAE_IDs": [B]}, "already the master or slave"),
        ({"additional_slave_SAE_IDs": [A]}, "already the master or slave"),
        ({"additional_slave_SAE_IDs": [C, C]}, "twice"),
        ({"additional_slave_SAE_IDs": [7]}, "strings"),
        ({"additional_slave_SAE_IDs": [C] * 9}, "at most 8"),
        ({"additional_slave_SAE_IDs": C}, "array"),
        ({"extension_mandatory": [{"route": "direct"}]}, "extension_mandatory"),
        ({"extension_optional": "x"}, "array"),
        ([1, 2], "object"),
        (b"{not json", "JSON"),
        (b"", "empty"),
        (b'{"number": NaN}', "JSON"),
        (b"[" * 5000 + b"]" * 5000, "JSON"),  # nested deeper than the parser allows
    ],
)
def test_bad_key_requests_get_400(handler: RequestHandler, body: Any, fragment: str) -> None:
    handler.max_body = 64 * 1024
    obj = error(call(handler, "POST", f"/api/v1/keys/{B}/enc_keys", body), 400)
    assert fragment.lower() in obj["message"].lower()


def test_keys_of_another_size_are_deferred_then_shared(
    handler: RequestHandler, pool: MemoryKeyPool
) -> None:
    request = ApiRequest("POST", f"/api/v1/keys/{B}/enc_keys", (), b'{"number": 2, "size": 512}')
    answer = handler.handle(request, AS_A)
    assert isinstance(answer, Deferred), "a non-default size needs the peer: not answered at once"
    keys = ok(trio.run(answer.complete))["keys"]
    assert [len(base64.b64decode(k["key"])) for k in keys] == [64, 64]
    body = {"key_IDs": [{"key_ID": k["key_ID"]} for k in keys]}
    assert (
        ok(call(handler, "POST", f"/api/v1/keys/{A}/dec_keys", body, caller=AS_B))["keys"] == keys
    )


def test_additional_slaves_each_collect_the_key_once(handler: RequestHandler) -> None:
    body = {"number": 1, "additional_slave_SAE_IDs": [C]}
    (key,) = ok(call(handler, "POST", f"/api/v1/keys/{B}/enc_keys", body))["keys"]
    as_c = Caller(1002, 1002, frozenset({C}))
    dec = f"/api/v1/keys/{A}/dec_keys?key_ID={key['key_ID']}"
    assert ok(call(handler, "GET", dec, caller=as_c))["keys"] == [key]
    assert ok(call(handler, "GET", dec, caller=AS_B))["keys"] == [key]
    error(call(handler, "GET", dec, caller=as_c), 400)  # once each


def test_errors_while_a_deferred_answer_completes_map_to_the_standard(
    handler: RequestHandler, pool: MemoryKeyPool
) -> None:
    pool.unavailable = "the peer site is down"
    obj = error(call(handler, "POST", f"/api/v1/keys/{B}/enc_keys", {"size": 512}), 503)
    assert "peer site is down" in obj["message"]


def test_unsupported_mandatory_extensions_are_listed(handler: RequestHandler) -> None:
    ext = [{"abc_route_type": "direct"}, {"abc_transfer_method": "qkd"}]
    obj = error(
        call(
            handler, "POST", f"/api/v1/keys/{B}/enc_keys", {"number": 1, "extension_mandatory": ext}
        ),
        400,
    )
    assert obj["details"] == [{"extension_mandatory_unsupported": ext}]


def test_optional_extensions_are_ignored(handler: RequestHandler) -> None:
    body = {
        "number": 1,
        "extension_optional": [{"abc_key_lifetime": 10}],
        "additional_slave_SAE_IDs": [],
    }
    assert len(ok(call(handler, "POST", f"/api/v1/keys/{B}/enc_keys", body))["keys"]) == 1


@pytest.mark.parametrize(
    "query", ["number=abc", "number=-1", "number=0", "size=12", "number=1&number=2", "size="]
)
def test_bad_query_parameters_get_400(handler: RequestHandler, query: str) -> None:
    error(call(handler, "GET", f"/api/v1/keys/{B}/enc_keys?{query}"), 400)


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"key_IDs": []},
        {"key_IDs": "x"},
        {"key_IDs": [{"key": "x"}]},
        {"key_IDs": [{"key_ID": 5}]},
        {"key_IDs": [{"key_ID": "not-a-uuid"}]},
        {"key_IDs": [{"key_ID": "6f1c0a3e-0000-4000-8000-000000000001"}] * 2},
        {"key_IDs": [{"key_ID": str(uuid.uuid4())} for _ in range(17)]},
    ],
)
def test_bad_key_id_requests_get_400(handler: RequestHandler, body: Any) -> None:
    error(call(handler, "POST", f"/api/v1/keys/{A}/dec_keys", body, caller=AS_B), 400)


def test_get_dec_keys_needs_key_id(handler: RequestHandler) -> None:
    error(call(handler, "GET", f"/api/v1/keys/{A}/dec_keys", caller=AS_B), 400)


def test_empty_pool_is_503_and_takes_nothing(handler: RequestHandler, pool: MemoryKeyPool) -> None:
    obj = error(call(handler, "POST", f"/api/v1/keys/{C}/enc_keys", {"number": 1}), 503)
    assert "ready" in obj["message"]
    pool.fill(A, C, 3)
    error(call(handler, "POST", f"/api/v1/keys/{C}/enc_keys", {"number": 4}), 503)
    assert pool.status(A, C).stored_key_count == 3
    assert pool.pending_key_ids(A, C) == []
    assert len(ok(call(handler, "POST", f"/api/v1/keys/{C}/enc_keys", {"number": 3}))["keys"]) == 3


def test_unavailable_pool_reason_reaches_the_caller(
    handler: RequestHandler, pool: MemoryKeyPool
) -> None:
    pool.unavailable = "QKD link down; check the QKD device"
    obj = error(call(handler, "GET", f"/api/v1/keys/{B}/enc_keys"), 503)
    assert obj["message"] == "QKD link down; check the QKD device"


def test_other_pool_failures_are_503(handler: RequestHandler, pool: MemoryKeyPool) -> None:
    def broken(*_: object) -> None:
        raise KeyServiceError("database is locked")

    pool.take_for_master = broken  # type: ignore[method-assign]
    assert (
        "database is locked"
        in error(call(handler, "GET", f"/api/v1/keys/{B}/enc_keys"), 503)["message"]
    )


def test_caller_without_sae_is_401(handler: RequestHandler) -> None:
    nobody = Caller(4242, 4242, frozenset())
    obj = error(call(handler, "GET", f"/api/v1/keys/{B}/status", caller=nobody), 401)
    assert "4242" in obj["message"]


def test_caller_with_several_saes_must_pick_one(handler: RequestHandler) -> None:
    both = Caller(1000, 1000, frozenset({A, C}))
    obj = error(call(handler, "GET", f"/api/v1/keys/{B}/status", caller=both), 401)
    assert "X-SAE-ID" in obj["message"]
    picked = ok(
        call(handler, "GET", f"/api/v1/keys/{B}/status", caller=both, headers=(("x-sae-id", C),))
    )
    assert picked["master_SAE_ID"] == C
    error(
        call(handler, "GET", f"/api/v1/keys/{B}/status", caller=both, headers=(("x-sae-id", B),)),
        401,
    )
    error(
        call(
            handler,
            "GET",
            f"/api/v1/keys/{B}/status",
            caller=both,
            headers=(("x-sae-id", A), ("x-sae-id", C)),
        ),
        400,
    )


def test_caller_sae_not_served_here_is_401(handler: RequestHandler) -> None:
    stranger = Caller(1000, 1000, frozenset({"SAE-elsewhere"}))
    error(call(handler, "GET", f"/api/v1/keys/{B}/status", caller=stranger), 401)


def test_unknown_or_same_target_sae_is_400(handler: RequestHandler) -> None:
    obj = error(call(handler, "GET", "/api/v1/keys/SAE-nope/enc_keys"), 400)
    assert obj["details"] == [{"SAE_ID": "SAE-nope"}]
    error(call(handler, "GET", f"/api/v1/keys/{A}/status"), 400)


def test_percent_encoded_sae_ids(pool: MemoryKeyPool) -> None:
    odd = "site 2/app"
    handler = RequestHandler(MemoryKeyPool([A, odd]))
    obj = ok(call(handler, "GET", "/api/v1/keys/site%202%2Fapp/status"))
    assert obj["slave_SAE_ID"] == odd


@pytest.mark.parametrize(
    ("method", "target", "status"),
    [
        ("POST", f"/api/v1/keys/{B}/status", 405),
        ("DELETE", f"/api/v1/keys/{B}/enc_keys", 405),
        ("PUT", f"/api/v1/keys/{A}/dec_keys", 405),
        ("GET", "/", 404),
        ("GET", "/api/v1/keys/", 404),
        ("GET", f"/api/v1/keys/{B}", 404),
        ("GET", f"/api/v1/keys/{B}/status/", 404),
        ("GET", f"/api/v1/keys/{B}/other", 404),
        ("GET", "/api/v2/keys/SAE-B/status", 404),
        ("GET", "/api/v1/keys//status", 404),
    ],
)
def test_routing_errors(handler: RequestHandler, method: str, target: str, status: int) -> None:
    response = call(handler, method, target)
    error(response, status)
    if status == 405:
        assert dict(response.headers)["allow"].startswith("GET")


def test_body_over_limit_is_400_on_etsi_routes(handler: RequestHandler) -> None:
    # ETSI GS QKD 014 answers 200, 400, 401 or 503: an oversized body is a bad request.
    obj = error(call(handler, "POST", f"/api/v1/keys/{B}/enc_keys", b" " * 4097), 400)
    assert "4096 bytes" in obj["message"]


def test_oversized_body_answer_depends_on_the_route(handler: RequestHandler) -> None:
    etsi = handler.body_too_large(f"/api/v1/keys/{B}/enc_keys", 4096)
    assert etsi.status == 400 and b"4096 bytes" in etsi.body
    # The daemon's own routes are plain HTTP: 413.
    assert handler.body_too_large("/qkdd/v1/messages/x", 4096).status == 413


def test_status_never_advertises_more_than_the_pool_can_hold() -> None:
    small = MemoryKeyPool([A, B], max_key_per_request=128, max_key_count=64)
    small.fill(A, B, 64)
    handler = RequestHandler(small)
    obj = ok(call(handler, "GET", f"/api/v1/keys/{B}/status"))
    assert (obj["max_key_count"], obj["max_key_per_request"]) == (64, 64)
    obj = error(call(handler, "GET", f"/api/v1/keys/{B}/enc_keys?number=65"), 400)
    assert "holds at most 64 keys" in obj["message"]
    assert len(ok(call(handler, "GET", f"/api/v1/keys/{B}/enc_keys?number=64"))["keys"]) == 64


def test_401_names_the_caller_as_its_transport_knows_it(handler: RequestHandler) -> None:
    certificate = Caller(None, None, frozenset(), description="client certificate 'CN=app-x'")
    obj = error(call(handler, "GET", f"/api/v1/keys/{B}/status", caller=certificate), 401)
    assert "client certificate 'CN=app-x'" in obj["message"] and "None" not in obj["message"]
    local = Caller(4242, 4243, frozenset())
    obj = error(call(handler, "GET", f"/api/v1/keys/{B}/status", caller=local), 401)
    assert "uid 4242, gid 4243" in obj["message"]


def test_log_note_names_ids_but_never_material(handler: RequestHandler) -> None:
    response = call(handler, "POST", f"/api/v1/keys/{B}/enc_keys", {"number": 2})
    keys = ok(response)["keys"]
    for key in keys:
        assert key["key_ID"] in response.note
        assert key["key"] not in response.note
        assert base64.b64decode(key["key"]).hex() not in response.note
