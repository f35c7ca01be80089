"""The recorded peer-protocol transcript (tests/vectors/peer_transcript.json, written by
tests/record_transcript.py): a bootstrap handshake, its key agreement, a PSK handshake
and the first application keys, replayed with the same fixed inputs. Every frame on the
wire and every resulting key must come out byte for byte as recorded, so a protocol
change shows up here and is made on purpose (re-record and review the diff).

Signatures: pyca/cryptography signs ML-DSA-65 hedged only (FIPS 204 with fresh randomness)
and has no deterministic mode, and each signature enters the transcript hash that every
later frame and key depends on; so signature frames are not compared "up to the
signature". Instead the signatures are part of the record: the replay signs by handing
back the recorded signature when the signer, context and message signed are exactly the
recorded ones (any other message fails the replay), the peer verifies it under the pinned
key during the replay, and ``test_recorded_signatures_verify_and_are_on_the_wire`` checks
each one independently. ML-KEM encapsulations are recorded the same way (pyca/cryptography
draws their randomness internally); the receiving side decapsulates them for real.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from record_transcript import (
    IDENTITY_SEEDS,
    SITE_A,
    SITE_B,
    VECTOR,
    TranscriptRecord,
    run_transcript,
)

from qkdd.crypto import KEM_SEED_SIZE, PqcBackend, SeedNotSupported
from qkdd.peer.connection import PeerConnection, Role


class _Pinned:
    """A PeerTrust that knows site-b's key only."""

    def __init__(self, public_key: bytes) -> None:
        self.public_key = public_key

    def pinned_key(self, site_id: str) -> bytes | None:
        return self.public_key if site_id == "site-b" else None

    def bootstrap_allowed(self, site_id: str) -> bool:
        return True

    def auth_key(self, site_id: str, key_id: str) -> bytes | None:
        return None


def recorded() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(VECTOR.read_text())
    return document


@pytest.fixture
def seeded(backend: PqcBackend) -> PqcBackend:
    """The backend, if it loads ML-KEM keys from seeds (the transcript's key pairs)."""
    try:
        backend.kem_from_seed(bytes(KEM_SEED_SIZE))
    except SeedNotSupported as exc:
        pytest.skip(str(exc))
    return backend


def test_the_transcript_replays_byte_for_byte(seeded: PqcBackend) -> None:
    expected = recorded()
    replayed = run_transcript(seeded, TranscriptRecord.of(expected["record"], strict=True))
    assert len(replayed["sessions"]) == len(expected["sessions"])
    for number, (got, want) in enumerate(
        zip(replayed["sessions"], expected["sessions"], strict=True), 1
    ):
        for index, (frame, recorded_frame) in enumerate(
            zip(got["frames"], want["frames"], strict=False)
        ):
            what = " ".join(
                str(recorded_frame.get(k, "")) for k in ("from", "frame", "message")
            ).strip()
            assert frame == recorded_frame, f"session {number}, frame {index} ({what}) differs"
        assert len(got["frames"]) == len(want["frames"]), f"session {number}: frame count"
        assert got == want, f"session {number}"
    assert replayed["application_keys"] == expected["application_keys"]
    # Everything else too, the record included: each recorded value used once, in order.
    assert replayed == expected


def test_the_transcript_covers_both_handshakes_and_the_first_keys() -> None:
    document = recorded()
    modes = [session["mode"] for session in document["sessions"]]
    assert modes == ["ml-dsa-bootstrap", "psk"]
    first, second = document["sessions"]
    # The second handshake is authenticated by the key the first session's agreement made.
    assert second["psk_id"] == first["authentication_key_after"]["key_id"]
    assert second["authentication_key_after"] != first["authentication_key_after"]
    for session in document["sessions"]:
        assert [f["frame"] for f in session["frames"][:3]] == ["HELLO", "RESPONSE", "FINISH"]
        messages = {f.get("message") for f in session["frames"]}
        assert {"KEY_BATCH", "BATCH_ACK", "BATCH_DECISION", "KEM_OFFER"} <= messages
    assert all(len(keys) == 2 for keys in document["application_keys"].values())


def test_recorded_signatures_verify_and_are_on_the_wire(backend: PqcBackend) -> None:
    document = recorded()
    bootstrap = document["sessions"][0]["frames"]
    signatures = document["record"]["signatures"]
    # One each way in the bootstrap (RESPONSE, FINISH), none in the PSK handshake.
    assert [s["signer"] for s in signatures] == [SITE_B, SITE_A]
    for entry, frame in zip(signatures, bootstrap[1:3], strict=True):
        public = backend.signing_key_from_seed(IDENTITY_SEEDS[entry["signer"]]).public_bytes
        backend.verify(
            public,
            bytes.fromhex(entry["message"]),
            bytes.fromhex(entry["signature"]),
            bytes.fromhex(entry["context"]),
        )
        assert frame["from"] == entry["signer"]
        assert entry["signature"] in frame["hex"]


def test_a_replay_that_needs_what_was_not_recorded_fails(seeded: PqcBackend) -> None:
    """The replay never fills a gap in the record on its own: a changed transcript hash
    means a message that was never signed in the record, and that fails."""
    document = recorded()
    record = dict(document["record"], signatures=document["record"]["signatures"][:1])
    with pytest.raises(AssertionError, match="the protocol changed"):
        run_transcript(seeded, TranscriptRecord.of(record, strict=True))


def test_connections_draw_fresh_randomness_by_default(
    backend: PqcBackend, identities: dict[str, Any]
) -> None:
    """Without an injected source the handshake is random, as in the daemon: two HELLOs
    to the same peer share no nonce and no key share."""
    hellos = []
    for _ in range(2):
        conn = PeerConnection(
            Role.INITIATOR,
            backend=backend,
            local_site_id="site-a",
            signing_key=identities["site-a"],
            trust=_Pinned(identities["site-b"].public_bytes),
            expected_peer="site-b",
        )
        conn.initiate()
        hellos.append(conn.data_to_send())
    assert len(hellos[0]) == len(hellos[1])
    # The identical prefix ends before the nonce; nonce, ML-KEM key and X25519 share differ.
    tail = 32 + 1184 + 32
    first, second = (h[-tail:] for h in hellos)
    assert first[:32] != second[:32]
    assert first[32:-32] != second[32:-32]
    assert first[-32:] != second[-32:]
