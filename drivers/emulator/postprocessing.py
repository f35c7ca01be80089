"""Post-processing of one BB84 block between Alice and Bob over an authenticated classical
channel: sifting, parameter estimation on the Z basis, finite-key bounds, Cascade error
correction on the X basis, a 64-bit verification hash, and privacy amplification by
(modified) Toeplitz hashing.

Roles and messages. Bob drives (``bob_postprocess`` takes a ``request(bytes) -> bytes``
callable); Alice is a sans-IO responder (``AliceSession.handle(bytes) -> bytes``). Each
message is one kind byte and a body; the reply to every request is one message body. The
order is fixed and Alice refuses anything else:

=========  ======================================  =========================================
request    body (Bob -> Alice)                     reply (Alice -> Bob)
=========  ======================================  =========================================
SIFT       u32 clicks, Bob's bases (packed)        u64 pulses sent, Alice's bases (packed),
                                                   intensity class of each click (two
                                                   packed bit planes: low bit, high bit)
ESTIMATE   Bob's Z-basis sifted bits (packed)      Alice's Z-basis sifted bits (packed)
CASCADE    a Cascade message (see ``cascade``)     Cascade reply
VERIFY     u32 seed bytes, seed (n + 63 bits),     1 byte: 1 equal, 0 not
           8-byte tag
AMPLIFY    u32 m, u32 seed bytes, seed (n - 1)     16-byte key IDs, m / key_bits of them
ABORT      reason (UTF-8)                          empty
=========  ======================================  =========================================

Packed bits are little-endian within and across bytes; integers are little-endian.
In one process the channel is a direct call (``InMemoryChannel``); the same bytes can
travel over TCP with a length prefix.

What each step does (Lim, Curty, Walenta, Xu and Zbinden, PRA 89, 022307 (2014)):

* Sifting keeps the clicks where Alice's and Bob's bases agree, X (the key) and Z (the
  test), and counts them per intensity class: ``n_{X,k}``, ``n_{Z,k}``.
* Estimation: both disclose their Z-basis bits; ``m_{Z,k}`` are the errors per class and
  ``E_Z = m_Z / n_Z`` the QBER estimate. ``finite_key.estimate`` turns the counts into
  lower bounds on the vacuum and single-photon X detections, an upper bound ``phi_X`` on
  their phase error, and the epsilon budget. The block aborts if ``E_Z`` exceeds
  ``qber_threshold`` (11 % by default) or if not even a perfect code would leave key.
* Error correction: Cascade on the X bits with its block sizes from ``E_Z``;
  ``leak_EC`` is the number of parity bits Alice disclosed.
* Verification: Bob sends a fresh (n + 63)-bit Toeplitz seed and the 64-bit hash of his
  corrected string; Alice compares (collision probability ``eps_cor = 2^-64``); a
  mismatch aborts.
* Key length (the same public function at both ends)::

      l = floor(s_X0 + s_X1 (1 - h(phi_X)) - leak_EC - 6 log2(1 / eps) - log2(2 / eps_cor))

  rounded down to whole keys of ``key_bits``; nothing is produced if it is not positive.
* Privacy amplification: Bob sends m and a fresh (n - 1)-bit seed; both hash their
  corrected X strings with the modified Toeplitz matrix ``[T | I]`` to m bits (FFT).
  Alice draws the key IDs (random version-4 UUIDs) and sends them back.
"""

from __future__ import annotations

import enum
import hmac
import math
import secrets
import struct
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .cascade import DEFAULT_PASSES, CascadeAlice, CascadeError, cascade_bob
from .finite_key import (
    VERIFICATION_BITS,
    BlockCounts,
    Estimates,
    Protocol,
    estimate,
)
from .physics import Bb84Parameters, DecoyStats, PartyRecord, binary_entropy
from .toeplitz import modified_toeplitz_hash_bits, toeplitz_tag

__all__ = [
    "AliceSession",
    "BlockReport",
    "InMemoryChannel",
    "Msg",
    "PartyOutcome",
    "PostProcessingError",
    "PostProcessingParameters",
    "bob_postprocess",
]

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
X, Z = 0, 1


class PostProcessingError(Exception):
    """A post-processing message is malformed or out of order: the two ends disagree on
    the protocol (a bug, or a corrupted channel); the block is lost, restart the link."""


class Msg(enum.IntEnum):
    SIFT = 1
    ESTIMATE = 2
    CASCADE = 3
    VERIFY = 4
    AMPLIFY = 5
    ABORT = 6


@dataclass(frozen=True)
class PostProcessingParameters:
    qber_threshold: float = 0.11
    cascade_passes: int = DEFAULT_PASSES
    eps_sec: float = 1e-10
    key_bits: int = 256

    def __post_init__(self) -> None:
        if not 0 < self.qber_threshold <= 0.5:
            raise ValueError("QBER abort threshold must be in (0, 0.5]")
        if not 1 <= self.cascade_passes <= 31:
            raise ValueError("Cascade passes must be between 1 and 31")
        if not 0 < self.eps_sec < 1:
            raise ValueError("secrecy epsilon must be in (0, 1)")
        if self.key_bits % 8 or not 8 <= self.key_bits <= 8192:
            raise ValueError("key size must be a multiple of 8 bits between 8 and 8192")


@dataclass
class BlockReport:
    """Public figures of one block (identical at both ends)."""

    pulses: int = 0
    simulated_seconds: float = 0.0
    detections: int = 0
    sifted_bits: int = 0  # X and Z
    kept_bits: int = 0  # X-basis sifted bits: the key's raw material
    test_bits: int = 0  # Z-basis sifted bits, disclosed
    counts: dict[str, list[int]] = field(default_factory=dict)  # n_x, n_z, m_z by class
    qber_estimate: float | None = None  # E_Z
    qber_bound: float | None = None  # phi_X, the upper bound used in h()
    estimates: dict[str, object] | None = None  # finite_key.Estimates.as_dict()
    ec_disclosed_bits: int = 0  # leak_EC
    corrected_errors: int = 0
    ec_efficiency: float | None = None  # leak_EC / (n h(corrected / n))
    verification_bits: int = 0
    disclosed_bits: int = 0  # Z bits + EC + verification
    secure_length: int = 0  # l before rounding to whole keys
    final_bits: int = 0
    aborted: str | None = None
    truth: dict[str, int] | None = None  # what only the simulation knows (in-process)
    pns: dict[str, int] | None = None  # under a PNS attack: what Eve holds (in-process)

    @property
    def secret_key_rate(self) -> float:
        """Final key bits per simulated second."""
        return self.final_bits / self.simulated_seconds if self.simulated_seconds else 0.0

    def as_dict(self) -> dict[str, object]:
        out = dict(self.__dict__)
        out["secret_key_rate"] = self.secret_key_rate
        return out


@dataclass
class PartyOutcome:
    """One end's result: its keys (ID, material) and the block report."""

    keys: list[tuple[bytes, bytes]] = field(repr=False)
    report: BlockReport


def _frame(kind: Msg, body: bytes) -> bytes:
    return bytes([kind]) + body


def _read_u32(body: bytes, offset: int) -> tuple[int, int]:
    if len(body) < offset + 4:
        raise PostProcessingError("message truncated")
    return _U32.unpack_from(body, offset)[0], offset + 4


def _pack(bits: np.ndarray) -> bytes:
    return np.packbits(bits, bitorder="little").tobytes()


def _unpack(data: bytes, n: int) -> np.ndarray:
    if len(data) != (n + 7) // 8:
        raise ValueError(f"expected {(n + 7) // 8} bytes for {n} bits, got {len(data)}")
    bits = np.unpackbits(np.frombuffer(data, np.uint8), bitorder="little")
    if bits[n:].any():
        raise ValueError("padding bits must be zero")
    return bits[:n]


def _split_keys(material: bytes, key_bytes: int) -> list[bytes]:
    return [material[i : i + key_bytes] for i in range(0, len(material), key_bytes)]


class _Sifted:
    """One end's sifted strings and the public counts, from both ends' bases."""

    def __init__(
        self, bits: np.ndarray, mine: np.ndarray, theirs: np.ndarray, classes: np.ndarray, k: int
    ) -> None:
        # One pass for all counts: class * 4 + my basis * 2 + their basis.
        pair = (mine << 1) | theirs
        counts = np.bincount((classes << 2) | pair, minlength=4 * k)[: 4 * k].reshape(k, 4)
        self.n_x = counts[:, 0].tolist()
        self.n_z = counts[:, 3].tolist()
        # np.compress: several times faster than boolean indexing on long arrays.
        self.x_bits = np.compress(pair == 0, bits)
        z = pair == 3
        self.z_bits, self.z_classes = np.compress(z, bits), np.compress(z, classes)
        self.k = k

    def z_errors(self, theirs: np.ndarray) -> list[int]:
        wrong = self.z_classes[self.z_bits != theirs]
        return np.bincount(wrong, minlength=self.k)[: self.k].tolist()


def _estimate(
    report: BlockReport, params: PostProcessingParameters, link: Bb84Parameters, m_z: list[int]
) -> Estimates | None:
    """Fill the estimation figures of ``report``; None (and ``aborted``) if no key can come."""
    r = report
    r.counts["m_z"] = m_z
    if not r.kept_bits or not r.test_bits:
        r.aborted = "block too small: no X- or Z-basis clicks to work with"
        return None
    counts = BlockCounts(r.pulses, tuple(r.counts["n_x"]), tuple(r.counts["n_z"]), tuple(m_z))
    bounds = estimate(Protocol.of(link, params.eps_sec), counts)
    r.qber_estimate = bounds.qber_z
    r.qber_bound = bounds.phase_error
    r.estimates = bounds.as_dict()
    if bounds.qber_z > params.qber_threshold:
        r.aborted = f"estimated QBER {bounds.qber_z:.4f} above threshold {params.qber_threshold}"
    elif bounds.key_length(math.ceil(r.kept_bits * binary_entropy(bounds.qber_z))) <= 0:
        r.aborted = "no secret key possible at this QBER and block size"
    return None if r.aborted else bounds


class AliceSession:
    """Alice's end of the post-processing of one block (a sans-IO responder)."""

    def __init__(
        self,
        record: PartyRecord,
        params: PostProcessingParameters,
        link: Bb84Parameters,
        decoy: DecoyStats | None = None,  # older record format; every class is in record
    ) -> None:
        self._record = record
        self._params = params
        self._link = link
        self._expect = Msg.SIFT
        self._sifted: _Sifted | None = None
        self._bounds: Estimates | None = None
        self._cascade: CascadeAlice | None = None
        self.report = BlockReport(detections=len(record.bits), pulses=record.pulses)
        self.outcome: PartyOutcome | None = None

    def __repr__(self) -> str:
        return f"AliceSession(expect={self._expect.name}, report={self.report!r})"

    def handle(self, message: bytes) -> bytes:
        if not message:
            raise PostProcessingError("empty post-processing message")
        try:
            kind = Msg(message[0])
        except ValueError:
            raise PostProcessingError(f"unknown message kind {message[0]}") from None
        body = message[1:]
        if kind is Msg.ABORT:
            self.report.aborted = self.report.aborted or body.decode("utf-8", "replace")
            self.outcome = PartyOutcome([], self.report)
            self._expect = Msg.ABORT
            return b""
        # Cascade takes many round trips; VERIFY ends it.
        cascading = kind is Msg.CASCADE and self._expect in (Msg.CASCADE, Msg.VERIFY)
        if not cascading and kind is not self._expect:
            raise PostProcessingError(f"{kind.name} received while expecting {self._expect.name}")
        try:
            return getattr(self, f"_on_{kind.name.lower()}")(body)
        except (ValueError, CascadeError) as exc:
            raise PostProcessingError(f"bad {kind.name} message: {exc}") from exc

    def _on_sift(self, body: bytes) -> bytes:
        d, off = _read_u32(body, 0)
        record = self._record
        if d != len(record.bits):
            raise PostProcessingError(f"Bob reports {d} clicks, Alice recorded {len(record.bits)}")
        bob_bases = _unpack(body[off:], d)
        mine = np.frombuffer(record.bases, np.uint8)
        classes = np.frombuffer(record.intensities or bytes(d), np.uint8)
        k = len(self._link.intensities)
        self._sifted = _Sifted(np.frombuffer(record.bits, np.uint8), mine, bob_bases, classes, k)
        r = self.report
        r.kept_bits, r.test_bits = len(self._sifted.x_bits), len(self._sifted.z_bits)
        r.sifted_bits = r.kept_bits + r.test_bits
        r.counts = {"n_x": self._sifted.n_x, "n_z": self._sifted.n_z}
        self._expect = Msg.ESTIMATE
        return _U64.pack(record.pulses) + _pack(mine) + _pack(classes & 1) + _pack(classes >> 1)

    def _on_estimate(self, body: bytes) -> bytes:
        sifted = self._sifted
        assert sifted is not None
        theirs = _unpack(body, len(sifted.z_bits))
        r = self.report
        self._bounds = _estimate(r, self._params, self._link, sifted.z_errors(theirs))
        self._cascade = CascadeAlice(sifted.x_bits.tobytes())
        # Bob reaches the same decision from the same numbers; only ABORT may follow it.
        self._expect = Msg.ABORT if r.aborted else Msg.CASCADE
        return _pack(sifted.z_bits)

    def _on_cascade(self, body: bytes) -> bytes:
        assert self._cascade is not None
        self._expect = Msg.VERIFY
        return self._cascade.handle(body)

    def _on_verify(self, body: bytes) -> bytes:
        assert self._cascade is not None and self._sifted is not None
        assert self._bounds is not None
        kept = self._sifted.x_bits
        n = len(kept)
        size, off = _read_u32(body, 0)
        if len(body) != off + size + 8 or size != (n + VERIFICATION_BITS - 1 + 7) // 8:
            raise PostProcessingError("VERIFY message has the wrong size")
        seed = int.from_bytes(body[off : off + size], "little")
        tag = _verification_tag(seed, kept)
        equal = hmac.compare_digest(tag.to_bytes(8, "little"), body[off + size :])
        r = self.report
        _close_ec(r, self._cascade.disclosed_bits, None)
        r.secure_length = self._bounds.key_length(r.ec_disclosed_bits)
        if not equal:
            r.aborted = "verification hash mismatch after error correction"
        self._expect = Msg.AMPLIFY
        return b"\x01" if equal else b"\x00"

    def _on_amplify(self, body: bytes) -> bytes:
        if self.report.aborted:
            raise PostProcessingError("AMPLIFY after the block was aborted")
        assert self._sifted is not None
        m, off = _read_u32(body, 0)
        size, off = _read_u32(body, off)
        kept = self._sifted.x_bits
        n = len(kept)
        secure = self.report.secure_length
        key_bits = self._params.key_bits
        if m != max(0, secure) // key_bits * key_bits or m == 0:
            raise PostProcessingError(f"Bob asks for {m} key bits, Alice computes {secure}")
        if size != (n - 1 + 7) // 8 or len(body) != off + size:
            raise PostProcessingError("AMPLIFY seed has the wrong size")
        seed = _unpack(body[off:], n - 1)
        material = _pack(modified_toeplitz_hash_bits(seed, kept, m))
        self.report.final_bits = m
        ids = [uuid.uuid4().bytes for _ in range(m // key_bits)]
        self.outcome = PartyOutcome(
            list(zip(ids, _split_keys(material, key_bits // 8), strict=True)), self.report
        )
        self._expect = Msg.ABORT  # the block is finished
        return b"".join(ids)


def _verification_tag(seed: int, bits: np.ndarray) -> int:
    return toeplitz_tag(seed, bits, VERIFICATION_BITS)


def _close_ec(report: BlockReport, disclosed: int, corrections: int | None) -> None:
    r = report
    r.ec_disclosed_bits = disclosed
    r.verification_bits = VERIFICATION_BITS
    r.disclosed_bits = r.test_bits + disclosed + VERIFICATION_BITS
    if corrections is not None:
        r.corrected_errors = corrections
        shannon = r.kept_bits * binary_entropy(corrections / r.kept_bits) if r.kept_bits else 0
        r.ec_efficiency = disclosed / shannon if shannon else None


def bob_postprocess(
    record: PartyRecord,
    request: Callable[[bytes], bytes],
    params: PostProcessingParameters,
    link: Bb84Parameters,
    decoy: DecoyStats | None = None,  # older record format; every class is in record
    *,
    timings: dict[str, float] | None = None,
) -> PartyOutcome:
    """Bob's end: drives the whole block through ``request`` and returns his keys.

    ``timings``, if given, receives the seconds spent in sifting (with estimation), error
    correction, verification and privacy amplification ("sifting", "ec", "verify", "pa").
    """
    clock = time.perf_counter
    marks = {"sifting": 0.0, "ec": 0.0, "verify": 0.0, "pa": 0.0}
    start = clock()
    report = BlockReport(detections=len(record.bits))

    def finish(keys: list[tuple[bytes, bytes]], reason: str | None = None) -> PartyOutcome:
        if reason is not None:
            report.aborted = reason
            request(_frame(Msg.ABORT, reason.encode()))
        if timings is not None:
            timings.update(marks)
        return PartyOutcome(keys, report)

    d = len(record.bits)
    mine = np.frombuffer(record.bases, np.uint8)
    reply = request(_frame(Msg.SIFT, _U32.pack(d) + _pack(mine)))
    plane = (d + 7) // 8
    if len(reply) != 8 + 3 * plane:
        raise PostProcessingError("SIFT reply has the wrong size")
    report.pulses = _U64.unpack_from(reply)[0]
    alice_bases = _unpack(reply[8 : 8 + plane], d)
    classes = _unpack(reply[8 + plane : 8 + 2 * plane], d) | (
        _unpack(reply[8 + 2 * plane :], d) << 1
    )
    k = len(link.intensities)
    if d and classes.max() >= k:
        raise PostProcessingError("Alice names an intensity class this link does not have")
    sifted = _Sifted(np.frombuffer(record.bits, np.uint8), mine, alice_bases, classes, k)
    report.kept_bits, report.test_bits = len(sifted.x_bits), len(sifted.z_bits)
    report.sifted_bits = report.kept_bits + report.test_bits
    report.counts = {"n_x": sifted.n_x, "n_z": sifted.n_z}
    theirs = _unpack(request(_frame(Msg.ESTIMATE, _pack(sifted.z_bits))), len(sifted.z_bits))
    bounds = _estimate(report, params, link, sifted.z_errors(theirs))
    marks["sifting"] = clock() - start
    if bounds is None:
        return finish([], report.aborted)

    start = clock()
    result = cascade_bob(
        sifted.x_bits.tobytes(),
        report.qber_estimate or 0.0,
        lambda body: request(_frame(Msg.CASCADE, body)),
        passes=params.cascade_passes,
        seed=secrets.token_bytes(32),
    )
    marks["ec"] = clock() - start
    start = clock()
    corrected = np.frombuffer(result.corrected, np.uint8)
    n = len(corrected)
    _close_ec(report, result.disclosed_bits, result.corrections)
    vseed = secrets.randbits(n + VERIFICATION_BITS - 1)
    vsize = (n + VERIFICATION_BITS - 1 + 7) // 8
    tag = _verification_tag(vseed, corrected)
    verdict = request(
        _frame(
            Msg.VERIFY,
            _U32.pack(vsize) + vseed.to_bytes(vsize, "little") + tag.to_bytes(8, "little"),
        )
    )
    marks["verify"] = clock() - start
    if verdict != b"\x01":
        return finish([], "verification hash mismatch after error correction")
    secure = bounds.key_length(result.disclosed_bits)
    report.secure_length = secure
    m = max(0, secure) // params.key_bits * params.key_bits
    if m == 0:
        return finish([], "no secret key left after error correction")
    start = clock()
    pseed = secrets.token_bytes((n - 1 + 7) // 8)
    if (n - 1) % 8:  # padding bits stay zero
        pseed = pseed[:-1] + bytes([pseed[-1] & ((1 << ((n - 1) % 8)) - 1)])
    ids = request(_frame(Msg.AMPLIFY, _U32.pack(m) + _U32.pack(len(pseed)) + pseed))
    count = m // params.key_bits
    if len(ids) != 16 * count:
        raise PostProcessingError("Alice sent the wrong number of key IDs")
    material = _pack(modified_toeplitz_hash_bits(_unpack(pseed, n - 1), corrected, m))
    report.final_bits = m
    keys = list(zip(_split_keys(ids, 16), _split_keys(material, params.key_bits // 8), strict=True))
    marks["pa"] = clock() - start
    return finish(keys)


class InMemoryChannel:
    """Bob's ``request`` callable delivering to an Alice in the same process, counting
    the classical traffic in both directions."""

    def __init__(self, alice: AliceSession) -> None:
        self.alice = alice
        self.bytes_to_alice = 0
        self.bytes_to_bob = 0
        self.messages = 0

    def __call__(self, message: bytes) -> bytes:
        reply = self.alice.handle(message)
        self.bytes_to_alice += len(message)
        self.bytes_to_bob += len(reply)
        self.messages += 1
        return reply
