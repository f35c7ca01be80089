"""The SKIP provider's rules without I/O: routes, message formats, key IDs, each key once,
and the draft's status codes, over an in-memory pool holding both sites' SAEs."""

from __future__ import annotations

import json
import os
import uuid

import pytest
import trio

from qkdd.etsi014.key_pool import KeyServiceError
from qkdd.etsi014.memory_pool import MemoryKeyPool
from qkdd.http_server.exchange import ApiRequest, ApiResponse, Caller, Deferred
from qkdd.skip.provider import SkipProvider, key_id_from_skip, skip_key_id

ROUTER_A = Caller(None, None, frozenset({"sae-a"}), description="client certificate 'router-a'")
ROUTER_B = Caller(None, None, frozenset({"sae-b"}), description="client certificate 'router-b'")
REMOTE = {"site-b-router": "sae-b", "site-a-router": "sae-a", "sae-c": "sae-c"}


@pytest.fixture
def pool() -> MemoryKeyPool:
    pool = MemoryKeyPool(["sae-a", "sae-b", "sae-c"])
    pool.fill("sae-a", "sae-b", 20)
    return pool


def provider(pool: MemoryKeyPool, *, entropy: bool = True) -> SkipProvider:
    return SkipProvider(
        pool,
        REMOTE,
        # sae-a talks to sae-b only; sae-b to sae-a.
        talks_to=lambda local, remote: {local, remote} == {"sae-a", "sae-b"},
        random_bytes=os.urandom if entropy else None,
    )


def get(skip: SkipProvider, target: str, caller: Caller = ROUTER_A) -> tuple[int, dict]:
    answer = skip.handle(ApiRequest("GET", target), caller)
    if isinstance(answer, Deferred):
        answer = trio.run(answer.complete)
    assert isinstance(answer, ApiResponse)
    assert ("content-type", "application/json") in answer.headers
    return answer.status, json.loads(answer.body)


def test_capabilities_list_what_the_caller_can_get(pool):
    skip = provider(pool)
    status, caps = get(skip, "/capabilities")
    assert status == 200
    assert caps == {
        "entropy": True,
        "key": True,
        "algorithm": "qkdd-hybrid-QKD-ML-KEM-768",
        "localSystemID": "sae-a",
        "remoteSystemID": ["site-b-router"],
    }
    assert get(provider(pool, entropy=False), "/capabilities")[1]["entropy"] is False


def test_key_then_key_by_id_at_the_far_end_once(pool):
    skip = provider(pool)
    status, new = get(skip, "/key?remoteSystemID=site-b-router")
    assert status == 200 and set(new) == {"keyId", "key"}
    assert len(new["keyId"]) == 32 and int(new["keyId"], 16) >= 0
    assert len(bytes.fromhex(new["key"])) == 32
    target = f"/key/{new['keyId']}?remoteSystemID=site-a-router"
    status, fetched = get(skip, target, ROUTER_B)
    assert (status, fetched) == (200, new)
    status, again = get(skip, target, ROUTER_B)
    assert status == 400 and "already fetched" in again["message"]
    # The master's router cannot fetch its own key by ID either.
    status, _ = get(skip, f"/key/{new['keyId']}?remoteSystemID=site-b-router")
    assert status == 400


def test_keys_are_new_each_time(pool):
    skip = provider(pool)
    keys = [get(skip, "/key?remoteSystemID=site-b-router")[1] for _ in range(5)]
    assert len({k["keyId"] for k in keys}) == 5 and len({k["key"] for k in keys}) == 5


def test_key_of_another_size_is_assigned(pool):
    skip = provider(pool)
    answer = skip.handle(ApiRequest("GET", "/key?remoteSystemID=site-b-router&size=512"), ROUTER_A)
    assert isinstance(answer, Deferred)  # the peer site must confirm it first
    status, key = get(skip, "/key?remoteSystemID=site-b-router&size=128")
    assert status == 200 and len(bytes.fromhex(key["key"])) == 16
    status, fetched = get(skip, f"/key/{key['keyId']}?remoteSystemID=site-a-router", ROUTER_B)
    assert status == 200 and fetched["key"] == key["key"]


def test_key_id_is_the_uuid_without_dashes():
    key_id = str(uuid.uuid4())
    assert skip_key_id(key_id) == key_id.replace("-", "")
    assert key_id_from_skip(skip_key_id(key_id)) == key_id
    assert key_id_from_skip(skip_key_id(key_id).upper()) == key_id
    for bad in ("", "12", key_id, "g" * 32, "0" * 33):
        with pytest.raises(ValueError):
            key_id_from_skip(bad)


@pytest.mark.parametrize(
    ("target", "status", "fragment"),
    [
        ("/key?remoteSystemID=nobody", 400, "unknown remoteSystemID 'nobody'"),
        ("/key", 400, "remoteSystemID is required"),
        ("/key?remoteSystemID=site-b-router&remoteSystemID=x", 400, "given 2 times"),
        ("/key?remoteSystemID=site-b-router&size=100", 400, "multiple of 8"),
        ("/key?remoteSystemID=site-b-router&size=-8", 400, "positive decimal"),
        ("/key?remoteSystemID=site-b-router&size=16384", 400, "from 64 to 8192"),
        ("/key?remotesystemid=site-b-router", 400, "unknown query parameter 'remotesystemid'"),
        ("/key/x?remoteSystemID=site-b-router", 400, "32 hexadecimal digits"),
        ("/key/0123?remoteSystemID=site-b-router", 400, "32 hexadecimal digits"),
        (f"/key/{'ab' * 16}?remoteSystemID=site-b-router", 400, "is held for"),
        (f"/key/{'ab' * 16}", 400, "remoteSystemID is required"),
        ("/capabilities?x=1", 400, "takes no parameters"),
        ("/entropy?minentropy=12", 400, "multiple of 8"),
        ("/entropy?minentropy=0", 400, "multiple of 8"),
        ("/keys", 404, "no such resource"),
        ("/key/a/b", 404, "no such resource"),
        ("/", 404, "no such resource"),
        ("/key?remoteSystemID=a b", 400, "malformed request target"),
    ],
)
def test_bad_requests_get_the_drafts_status(pool, target, status, fragment):
    got, body = get(provider(pool), target)
    assert got == status, body
    assert set(body) == {"message"} and fragment in body["message"], body


def test_only_get(pool):
    answer = provider(pool).handle(
        ApiRequest("POST", "/key?remoteSystemID=x", body=b"{}"), ROUTER_A
    )
    assert isinstance(answer, ApiResponse) and answer.status == 405
    assert ("allow", "GET") in answer.headers


def test_unmapped_or_ambiguous_certificate_is_refused(pool):
    skip = provider(pool)
    stranger = Caller(None, None, frozenset(), description="client certificate 'x'")
    status, body = get(skip, "/capabilities", stranger)
    assert status == 401 and "[skip.clients]" in body["message"]
    both = Caller(None, None, frozenset({"sae-a", "sae-b"}))
    status, body = get(skip, "/key?remoteSystemID=site-b-router", both)
    assert status == 401 and "several local system IDs" in body["message"]
    assert pool.status("sae-a", "sae-b").stored_key_count == 20  # nothing was taken


def test_no_keys_ready_is_503(pool):
    pool.unavailable = "the QKD link is down"
    status, body = get(provider(pool), "/key?remoteSystemID=site-b-router")
    assert status == 503 and "QKD link is down" in body["message"]


def test_key_service_failure_is_500(pool, monkeypatch):
    def broken(*args: object) -> None:
        raise KeyServiceError("the store is gone")

    monkeypatch.setattr(pool, "take_for_master", broken)
    status, body = get(provider(pool), "/key?remoteSystemID=site-b-router")
    assert status == 500 and "the store is gone" in body["message"]


def test_a_pair_without_keys_ready_is_503(pool):
    status, body = get(provider(pool), "/key?remoteSystemID=sae-c")
    assert status == 503 and "sae-a -> sae-c" in body["message"]


def test_entropy(pool):
    skip = provider(pool)
    status, body = get(skip, "/entropy")
    assert status == 200 and body["minentropy"] == 256 and len(body["randomStr"]) == 64
    status, body = get(skip, "/entropy?minentropy=1024")
    assert status == 200 and len(bytes.fromhex(body["randomStr"])) == 128
    status, body = get(provider(pool, entropy=False), "/entropy")
    assert status == 503 and "entropy = false" in body["message"]


def test_no_key_material_in_the_access_log_note(pool):
    answer = provider(pool).handle(ApiRequest("GET", "/key?remoteSystemID=site-b-router"), ROUTER_A)
    assert isinstance(answer, ApiResponse)
    key = json.loads(answer.body)["key"]
    assert key not in answer.note and json.loads(answer.body)["keyId"] in answer.note
