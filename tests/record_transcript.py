"""A recorded transcript of the peer protocol between two sites, from first contact to the
first application keys: an ML-DSA-65 bootstrap handshake and its key agreement (the first
authentication key), then a PSK handshake under that key and its key agreement (a new
authentication key and the first batches of application keys). Two ``PeerConnection``s
and two ``LinkAgreement``s over real SQLite stores, every frame through the real wire.

Everything random is fixed: the identities (ML-DSA seeds), the key stores' IDs, the QKD
keys, and every nonce and ephemeral ML-KEM and X25519 key pair (derived from per-site
seeds through ``qkdd.peer.randomness.Randomness``). Two things no backend lets us fix
are recorded instead (``TranscriptRecord``) and replayed:

- ML-KEM encapsulations: pyca/cryptography draws the randomness of ``encapsulate``
  internally. The record holds each (shared secret, ciphertext) pair, found by the hash of
  the encapsulation key; the other side decapsulates the ciphertext for real, so a pair
  that does not belong to the key breaks the handshake or the batch.
- ML-DSA signatures: FIPS 204 signing is hedged (fresh randomness per signature) and
  pyca/cryptography offers no deterministic variant. A signature enters the transcript
  hash, so every later frame and key depends on its bytes: the record holds each one,
  found by the signer, the context and the exact message signed, and the peer verifies it
  during the replay as always.

``python tests/record_transcript.py`` writes ``tests/vectors/peer_transcript.json``
(after a deliberate protocol change); recorded encapsulations and signatures whose inputs
did not change are kept, so re-recording an unchanged protocol reproduces the file.
``tests/test_peer_transcript.py`` replays it.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import sys
import tempfile
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qkdd.crypto import (
    KEM_SEED_SIZE,
    SIGNATURE_SEED_SIZE,
    X25519_KEY_SIZE,
    KemPrivateKey,
    PqcBackend,
    SigningKey,
    X25519KeyPair,
)
from qkdd.keystore import KeyStore, StoredQkdKey
from qkdd.link_params import LinkParameters
from qkdd.peer.agreement import LinkAgreement
from qkdd.peer.agreement_messages import STORE_ID_SIZE, LinkMessage, MessageType, decode_message
from qkdd.peer.connection import (
    AuthKey,
    HandshakeComplete,
    MessageReceived,
    PeerConnection,
    Role,
)
from qkdd.peer.wire import MAX_SESSION_BODY, FrameBuffer, FrameType

VECTOR = Path(__file__).parent / "vectors" / "peer_transcript.json"

SITE_A = "site-a.example"  # sorts first: the link master
SITE_B = "site-b.example"
SAE = {SITE_A: "sae-a", SITE_B: "sae-b"}
KEY_SIZE_BITS = 256
POOL_SIZE = 2
NOW = 0.0  # the agreements' clock (no deadline falls due in the transcript)
# QKD keys the devices delivered before each session: one for the first authentication
# key, then one for the next and two for each site's pool.
QKD_KEYS_PER_SESSION = (1, 5)

_FRAME_NAMES = {v: k for k, v in vars(FrameType).items() if isinstance(v, int)}
_MESSAGE_NAMES = {v: k for k, v in vars(MessageType).items() if isinstance(v, int)}


def fixed(label: str, size: int) -> bytes:
    """A fixed input of the transcript: SHAKE-256 of its label."""
    return hashlib.shake_256(b"qkdd peer transcript/" + label.encode()).digest(size)


IDENTITY_SEEDS = {site: fixed(f"{site} identity", SIGNATURE_SEED_SIZE) for site in SAE}
STORE_IDS = {site: fixed(f"{site} store id", STORE_ID_SIZE) for site in SAE}
KEY_ENCRYPTION_KEYS = {site: fixed(f"{site} key encryption key", 32) for site in SAE}
QKD_KEYS = [
    StoredQkdKey(
        str(uuid.UUID(bytes=fixed(f"qkd key id {i}", 16), version=4)),
        fixed(f"qkd key {i}", KEY_SIZE_BITS // 8),
    )
    for i in range(sum(QKD_KEYS_PER_SESSION))
]


# -- What is recorded rather than derived ------------------------------------------------


@dataclass
class TranscriptRecord:
    """Recorded ML-KEM encapsulations and ML-DSA signatures, found by their inputs.

    ``strict`` (replaying): an input not in the record is a protocol change and fails.
    Otherwise (recording) it is computed with the backend and added. ``used`` lists what
    the run took, in order: the record as the vector keeps it."""

    encapsulations: dict[str, dict[str, str]] = field(default_factory=dict)
    signatures: dict[tuple[str, str, str], dict[str, str]] = field(default_factory=dict)
    strict: bool = True
    used: dict[str, list[dict[str, str]]] = field(
        default_factory=lambda: {"encapsulations": [], "signatures": []}
    )

    @classmethod
    def of(cls, document: dict[str, Any], *, strict: bool) -> TranscriptRecord:
        record = cls(strict=strict)
        for entry in document.get("encapsulations", []):
            record.encapsulations[entry["public_key_sha256"]] = entry
        for entry in document.get("signatures", []):
            key = (entry["signer"], entry["context"], entry["message"])
            record.signatures[key] = entry
        return record

    def _missing(self, what: str) -> AssertionError:
        return AssertionError(
            f"{what} is not in the recorded transcript: the protocol changed. If that is "
            f"deliberate, run `python tests/record_transcript.py` and review the diff"
        )

    def encapsulate(self, backend: PqcBackend, public_key: bytes) -> tuple[bytes, bytes]:
        digest = hashlib.sha256(public_key).hexdigest()
        entry = self.encapsulations.get(digest)
        if entry is None:
            if self.strict:
                raise self._missing(f"an encapsulation to ML-KEM key {digest[:16]}...")
            shared, ciphertext = backend.kem_encapsulate(public_key)
            entry = {
                "public_key_sha256": digest,
                "ciphertext": ciphertext.hex(),
                "shared_secret": shared.hex(),
            }
            self.encapsulations[digest] = entry
        self.used["encapsulations"].append(entry)
        return bytes.fromhex(entry["shared_secret"]), bytes.fromhex(entry["ciphertext"])

    def sign(self, signer: str, key: SigningKey, message: bytes, context: bytes) -> bytes:
        lookup = (signer, context.hex(), message.hex())
        entry = self.signatures.get(lookup)
        if entry is None:
            if self.strict:
                raise self._missing(f"a signature by {signer} over {message.hex()[:16]}...")
            entry = {
                "signer": signer,
                "context": context.hex(),
                "message": message.hex(),
                "signature": key.sign(message, context).hex(),
            }
            self.signatures[lookup] = entry
        self.used["signatures"].append(entry)
        return bytes.fromhex(entry["signature"])


class RecordedSigningKey(SigningKey):
    """A site's ML-DSA-65 identity whose signatures come from the record."""

    def __init__(self, site: str, key: SigningKey, record: TranscriptRecord) -> None:
        self._site = site
        self._key = key
        self._record = record

    @property
    def public_bytes(self) -> bytes:
        return self._key.public_bytes

    def sign(self, message: bytes, context: bytes) -> bytes:
        return self._record.sign(self._site, self._key, message, context)


class TranscriptRandomness:
    """A site's randomness for the transcript (a ``qkdd.peer.randomness.Randomness``):
    nonces and key pairs derived from the site's name and a counter, encapsulations from
    the record."""

    def __init__(self, site: str, record: TranscriptRecord) -> None:
        self._site = site
        self._record = record
        self._drawn = 0

    def _next(self, what: str, size: int) -> bytes:
        self._drawn += 1
        return fixed(f"{self._site} {what} {self._drawn}", size)

    def nonce(self, size: int) -> bytes:
        return self._next("nonce", size)

    def kem_key(self, backend: PqcBackend) -> KemPrivateKey:
        return backend.kem_from_seed(self._next("ml-kem seed", KEM_SEED_SIZE))

    def x25519_key(self) -> X25519KeyPair:
        return X25519KeyPair(self._next("x25519 private key", X25519_KEY_SIZE))

    def kem_encapsulate(self, backend: PqcBackend, public_key: bytes) -> tuple[bytes, bytes]:
        return self._record.encapsulate(backend, public_key)


# -- Two sites ------------------------------------------------------------------------------


def open_store(path: Path, site: str) -> KeyStore:
    """A real key store whose ID (sent in STORE_ID) is the fixed one: it is written before
    the store first opens, which keeps it."""
    with sqlite3.connect(path) as db:
        db.execute(
            "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value BLOB NOT NULL)"
            " WITHOUT ROWID"
        )
        db.execute("INSERT OR IGNORE INTO meta VALUES ('store_id', ?)", (STORE_IDS[site],))
    db.close()
    store = KeyStore(path, KEY_ENCRYPTION_KEYS[site])
    assert store.store_id == STORE_IDS[site]
    return store


@dataclass
class StoreTrust:
    """The PeerTrust a daemon gives its handshakes, over the site's store."""

    store: KeyStore
    peer: str
    peer_public_key: bytes

    def pinned_key(self, site_id: str) -> bytes | None:
        return self.peer_public_key if site_id == self.peer else None

    def bootstrap_allowed(self, site_id: str) -> bool:
        return site_id == self.peer and self.store.bootstrap_allowed(site_id)

    def auth_key(self, site_id: str, key_id: str) -> bytes | None:
        record = self.store.auth_key(site_id, key_id) if site_id == self.peer else None
        return record.material if record else None


class TranscriptSite:
    """One site: its store, identity, randomness, and the session's connection and
    agreement."""

    def __init__(self, name: str, peer: str, store: KeyStore, backend: PqcBackend) -> None:
        self.name = name
        self.peer = peer
        self.store = store
        self.backend = backend
        self.conn: PeerConnection | None = None
        self.agreement: LinkAgreement | None = None
        # Names of the link messages sealed and not yet on the wire, in order.
        self.sealed: deque[str] = deque()

    def params(self) -> LinkParameters:
        return LinkParameters(
            self.name,
            self.peer,
            frozenset({SAE[self.name]}),
            frozenset({SAE[self.peer]}),
            KEY_SIZE_BITS,
            POOL_SIZE,
        )

    def dial_auth_key(self) -> AuthKey | None:
        """What a daemon dials with: the newest ready PSK, or none (a bootstrap)."""
        record = self.store.newest_ready_auth_key(self.peer)
        return AuthKey(record.key_id, record.material) if record else None

    def send(self, messages: list[LinkMessage]) -> None:
        assert self.conn is not None
        for message in messages:
            encoded = message.encode()
            self.sealed.append(_MESSAGE_NAMES[encoded[0]])
            self.conn.send_message(encoded)


class Transcript:
    """Two sites over an in-memory wire that writes down every frame."""

    def __init__(self, directory: Path, backend: PqcBackend, record: TranscriptRecord) -> None:
        self.backend = backend
        keys = {site: backend.signing_key_from_seed(IDENTITY_SEEDS[site]) for site in SAE}
        self.sites: dict[str, TranscriptSite] = {}
        self.identity: dict[str, RecordedSigningKey] = {}
        self.randomness: dict[str, TranscriptRandomness] = {}
        self.trust: dict[str, StoreTrust] = {}
        for site, peer in ((SITE_A, SITE_B), (SITE_B, SITE_A)):
            store = open_store(directory / f"{site}.db", site)
            self.sites[site] = TranscriptSite(site, peer, store, backend)
            self.identity[site] = RecordedSigningKey(site, keys[site], record)
            self.randomness[site] = TranscriptRandomness(site, record)
            self.trust[site] = StoreTrust(store, peer, keys[peer].public_bytes)
        self.frames: list[dict[str, str]] = []

    def close(self) -> None:
        for site in self.sites.values():
            site.store.close()

    def carry(self, sender: TranscriptSite, receiver: TranscriptSite) -> list[object]:
        """Move what ``sender`` has to send to ``receiver``, writing down each frame."""
        assert sender.conn is not None and receiver.conn is not None
        data = sender.conn.data_to_send()
        frames = FrameBuffer()
        frames.max_body = MAX_SESSION_BODY
        frames.feed(data)
        while (frame := frames.next_frame()) is not None:
            entry = {"from": sender.name, "frame": _FRAME_NAMES[frame.type]}
            if frame.type == FrameType.DATA:
                entry["message"] = sender.sealed.popleft()
            entry["hex"] = frame.encode().hex()
            self.frames.append(entry)
        assert not frames.pending and not sender.sealed
        return list(receiver.conn.receive_data(data)) if data else []

    def handshake(self) -> HandshakeComplete:
        """Site A dials site B, as a daemon does: with its newest PSK, or a bootstrap."""
        a, b = self.sites[SITE_A], self.sites[SITE_B]
        a.conn = PeerConnection(
            Role.INITIATOR,
            backend=self.backend,
            local_site_id=SITE_A,
            signing_key=self.identity[SITE_A],
            trust=self.trust[SITE_A],
            expected_peer=SITE_B,
            auth_key=a.dial_auth_key(),
            randomness=self.randomness[SITE_A],
        )
        b.conn = PeerConnection(
            Role.RESPONDER,
            backend=self.backend,
            local_site_id=SITE_B,
            signing_key=self.identity[SITE_B],
            trust=self.trust[SITE_B],
            randomness=self.randomness[SITE_B],
        )
        a.conn.initiate()
        assert self.carry(a, b) == []  # HELLO
        (done_a,) = self.carry(b, a)  # RESPONSE
        (done_b,) = self.carry(a, b)  # FINISH
        assert isinstance(done_a, HandshakeComplete) and isinstance(done_b, HandshakeComplete)
        assert done_a.session_id == done_b.session_id
        assert done_a.auth_key_id == done_b.auth_key_id
        return done_a

    def agree(self, session_id: bytes, auth_key_id: str | None) -> None:
        """Key agreement over the session until nothing moves."""
        sites = list(self.sites.values())
        for site in sites:
            if auth_key_id is not None:  # the daemon notes the peer proved the PSK
                site.store.auth_key_proven(site.peer, auth_key_id)
            site.agreement = LinkAgreement(
                site.params(),
                store=site.store,
                backend=self.backend,
                session_id=session_id,
                randomness=self.randomness[site.name],
            )
        for site in sites:
            assert site.agreement is not None
            site.send(site.agreement.start(NOW))
        for _ in range(50):
            moved = False
            for sender, receiver in ((sites[0], sites[1]), (sites[1], sites[0])):
                assert sender.agreement is not None and receiver.agreement is not None
                sender.send(sender.agreement.poll(NOW))
                events = self.carry(sender, receiver)
                moved = moved or bool(events)
                for event in events:
                    assert isinstance(event, MessageReceived)
                    message = decode_message(event.payload)
                    receiver.send(receiver.agreement.on_message(message, NOW))
            if not moved:
                return
        raise AssertionError("the key agreement did not settle")

    def session(self, qkd_keys: list[StoredQkdKey]) -> dict[str, Any]:
        for site in self.sites.values():
            site.store.store_qkd_keys(site.peer, qkd_keys)
        self.frames = []
        done = self.handshake()
        self.agree(done.session_id, done.auth_key_id)
        auth = {}
        for site in self.sites.values():
            record = site.store.newest_ready_auth_key(site.peer)
            assert record is not None
            auth[site.name] = {"key_id": record.key_id, "material": record.material.hex()}
        assert auth[SITE_A] == auth[SITE_B]
        return {
            "mode": "ml-dsa-bootstrap" if done.auth_key_id is None else "psk",
            "psk_id": done.auth_key_id,
            "session_id": done.session_id.hex(),
            "frames": self.frames,
            "authentication_key_after": auth[SITE_A],
        }

    def application_keys(self) -> dict[str, list[dict[str, str]]]:
        """Each pool's ready keys, taken at the site that fills it and by ID at the other:
        both hold the same."""
        pools = {}
        for site in self.sites.values():
            pair = (SAE[site.name], SAE[site.peer])
            assert site.store.ready_count(*pair) == POOL_SIZE
            taken = site.store.take_ready(*pair, POOL_SIZE)
            other = self.sites[site.peer].store.take_by_ids(*pair, [k.key_id for k in taken])
            assert other is not None
            assert [k.material for k in other] == [k.material for k in taken]
            pools[" -> ".join(pair)] = [
                {"key_id": k.key_id, "material": k.material.hex()} for k in taken
            ]
        return pools


def run_transcript(backend: PqcBackend, record: TranscriptRecord) -> dict[str, Any]:
    """Run the whole transcript; return it as the vector stores it."""
    with tempfile.TemporaryDirectory(prefix="qkdd-transcript-") as directory:
        transcript = Transcript(Path(directory), backend, record)
        try:
            sessions, start = [], 0
            for count in QKD_KEYS_PER_SESSION:
                sessions.append(transcript.session(QKD_KEYS[start : start + count]))
                start += count
            keys = transcript.application_keys()
        finally:
            transcript.close()
    return {
        "about": (
            "A recorded transcript of the qkdd peer protocol (docs/protocol.md): an ML-DSA-65 "
            "bootstrap handshake and key agreement, then a PSK handshake under the "
            "authentication key it made and the first batches of application keys. Every "
            "frame on the wire is listed, in order. Written by tests/record_transcript.py, "
            "replayed by tests/test_peer_transcript.py: a change of any value is a change "
            "of the protocol."
        ),
        "inputs": {
            "sites": {
                site: {
                    "sae_id": SAE[site],
                    "identity_seed": IDENTITY_SEEDS[site].hex(),
                    "store_id": STORE_IDS[site].hex(),
                }
                for site in SAE
            },
            "key_size_bits": KEY_SIZE_BITS,
            "pool_size": POOL_SIZE,
            "qkd_keys_per_session": list(QKD_KEYS_PER_SESSION),
            "qkd_keys": [{"key_id": k.key_id, "material": k.material.hex()} for k in QKD_KEYS],
            "randomness": (
                "nonces, ML-KEM seeds and X25519 private keys: SHAKE-256('qkdd peer "
                "transcript/' + '<site> <what> <n>'), n counting each site's draws from 1"
            ),
        },
        "sessions": sessions,
        "application_keys": keys,
        "record": record.used,
    }


def main() -> int:
    from qkdd.crypto.select import select_backend

    previous: dict[str, Any] = {}
    if VECTOR.exists():
        previous = json.loads(VECTOR.read_text()).get("record", {})
    document = run_transcript(
        select_backend("cryptography"), TranscriptRecord.of(previous, strict=False)
    )
    VECTOR.write_text(json.dumps(document, indent=1) + "\n")
    frames = sum(len(session["frames"]) for session in document["sessions"])
    print(f"wrote {VECTOR} ({frames} frames)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
