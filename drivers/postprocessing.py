"""Post-processing of one BB84 block between Alice and Bob over an authenticated classical
channel: sifting, QBER estimation on a random sample, Cascade error correction, a 64-bit
verification hash, and privacy amplification by (modified) Toeplitz hashing.

Roles and messages. Bob drives (``bob_postprocess`` takes a ``request(bytes) -> bytes``
callable); Alice is a sans-IO responder (``AliceSession.handle(bytes) -> bytes``). Each
message is one kind byte and a body; the reply to every request is one message body. The
order is fixed and Alice refuses anything else:

=========  ===================================================  ==========================
request    body (Bob -> Alice)                                  reply (Alice -> Bob)
=========  ===================================================  ==========================
SIFT       u32 clicks, Bob's bases (packed bits)                Alice's bases (packed)
SAMPLE     32-byte sample seed, Bob's sample bits (packed)      Alice's sample bits
CASCADE    a Cascade message (see ``cascade``)                  Cascade reply
VERIFY     u32 seed bytes, seed (n + 63 bits), 8-byte tag       1 byte: 1 equal, 0 not
AMPLIFY    u32 m, u32 seed bytes, seed (n - 1 bits)             16-byte key IDs, m / key
ABORT      reason (UTF-8)                                       empty
=========  ===================================================  ==========================

Packed bits are little-endian within and across bytes; integers are little-endian.
In one process the channel is a direct call (``InMemoryChannel``); the same bytes can
travel over TCP with a length prefix.

What each step costs and why:

* Sifting keeps clicks where the bases agree (half of them on average). Announcing which
  pulses clicked is represented by the shared click numbering of the simulation.
* Estimation: each sifted bit joins the sample with probability ``sample_fraction``
  (default 5 %), the mask drawn from a seed Bob announces. Both sides disclose their
  sample bits; the estimate is ``e = errors / k`` and the sample is discarded. The block
  aborts if ``e > qber_threshold`` (default 11 %, where 1 - 2 h(e) vanishes). Optionally
  (``pe_epsilon``) the bound used for the key is ``e + mu`` with the sampling deviation of
  Tomamichel, Lim, Gisin and Renner, Nat. Commun. 3, 634 (2012)::

      mu = sqrt( (n + k) / (n k) * (k + 1) / k * ln(1 / eps_PE) )

  (n kept bits, k sample bits): except with probability eps_PE the error rate of the kept
  bits is below ``e + mu``.
* Error correction: Cascade with k_1 from ``e``; ``leak_EC`` is the exact number of parity
  bits Alice sent.
* Verification: Bob sends a fresh (n + 63)-bit Toeplitz seed and the 64-bit hash of his
  corrected string; Alice compares with hers (collision probability 2^-64); mismatch
  aborts. ``leak_verification = 64``.
* Key length (the same public function on both sides)::

      n_final = floor( n (1 - h(e)) - leak_EC - leak_verification - 2 log2(1 / eps_PA) )

  with h the binary entropy, ``e`` the estimate (or bound) above and the leftover-hash
  margin ``2 log2(1/eps_PA)`` (eps_PA = 1e-10: 67 bits). With decoy states ``n (1 - h(e))``
  becomes ``n1 (1 - h(e1))`` where ``n1 = n Q1 / Q_mu`` is the lower bound on kept bits
  from single-photon pulses and e1 the upper bound on their error (``bb84.decoy_bounds``,
  counts from the disclosed decoy and vacuum classes). Otherwise this is the ideal
  single-photon (Shor-Preskill) bound; see ``bb84``. ``n_final`` is rounded down to whole
  keys of ``key_bits`` bits; nothing is produced if it is not positive.
* Privacy amplification: Bob sends m and a fresh (n - 1)-bit seed; both hash their
  corrected strings with the modified Toeplitz matrix ``[T | I]`` to m bits. Alice draws
  the key IDs (random version-4 UUIDs) and sends them back.
"""

from __future__ import annotations

import enum
import hmac
import math
import random
import secrets
import struct
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from .bb84 import (
    DecoyStats,
    LinkParameters,
    PartyRecord,
    bernoulli_bits,
    binary_entropy,
    decoy_bounds,
    not_bits,
    pack_bits,
    pack_to_bytes,
    select_bits,
    unpack_from_bytes,
    xor_bits,
)
from .cascade import CascadeAlice, CascadeError, cascade_bob
from .toeplitz import modified_toeplitz_hash, toeplitz_hash_parity

__all__ = [
    "AliceSession",
    "BlockReport",
    "InMemoryChannel",
    "PartyOutcome",
    "PostProcessingError",
    "PostProcessingParameters",
    "bob_postprocess",
    "secure_key_length",
]

VERIFICATION_BITS = 64
_U32 = struct.Struct("<I")


class PostProcessingError(Exception):
    """A post-processing message is malformed or out of order: the two ends disagree on
    the protocol (a bug, or a corrupted channel); the block is lost, restart the link."""


class Msg(enum.IntEnum):
    SIFT = 1
    SAMPLE = 2
    CASCADE = 3
    VERIFY = 4
    AMPLIFY = 5
    ABORT = 6


@dataclass(frozen=True)
class PostProcessingParameters:
    sample_fraction: float = 0.05
    qber_threshold: float = 0.11
    cascade_passes: int = 4
    eps_pa: float = 1e-10
    pe_epsilon: float | None = None  # None: use the point estimate of the QBER
    key_bits: int = 256

    def __post_init__(self) -> None:
        if not 0 < self.sample_fraction < 1:
            raise ValueError("sample fraction must be in (0, 1)")
        if not 0 < self.qber_threshold <= 0.5:
            raise ValueError("QBER abort threshold must be in (0, 0.5]")
        if not 1 <= self.cascade_passes <= 16:
            raise ValueError("Cascade passes must be between 1 and 16")
        if not 0 < self.eps_pa < 1:
            raise ValueError("privacy amplification epsilon must be in (0, 1)")
        if self.pe_epsilon is not None and not 0 < self.pe_epsilon < 1:
            raise ValueError("parameter estimation epsilon must be in (0, 1)")
        if self.key_bits % 8 or not 8 <= self.key_bits <= 8192:
            raise ValueError("key size must be a multiple of 8 bits between 8 and 8192")


@dataclass
class BlockReport:
    """Public figures of one block (identical at both ends)."""

    pulses: int = 0
    simulated_seconds: float = 0.0
    detections: int = 0
    sifted_bits: int = 0
    sample_bits: int = 0
    kept_bits: int = 0  # sifted and not sampled: the n of the key length formula
    sample_errors: int = 0
    qber_estimate: float | None = None
    qber_bound: float | None = None  # the e used in h(e)
    ec_disclosed_bits: int = 0
    verification_bits: int = 0
    disclosed_bits: int = 0  # sample + EC + verification
    corrected_errors: int = 0
    single_photon_bits: float | None = None  # decoy only: n1
    single_photon_error: float | None = None  # decoy only: e1
    secure_length: int = 0  # n_final before rounding to whole keys
    final_bits: int = 0
    aborted: str | None = None

    @property
    def secret_key_rate(self) -> float:
        """Final key bits per simulated second."""
        return self.final_bits / self.simulated_seconds if self.simulated_seconds else 0.0

    def as_dict(self) -> dict[str, object]:
        out = {k: v for k, v in self.__dict__.items()}
        out["secret_key_rate"] = self.secret_key_rate
        return out


@dataclass
class PartyOutcome:
    """One end's result: its keys (ID, material) and the block report."""

    keys: list[tuple[bytes, bytes]] = field(repr=False)
    report: BlockReport


def _pe_deviation(n: int, k: int, eps: float) -> float:
    return math.sqrt((n + k) / (n * k) * (k + 1) / k * math.log(1 / eps))


def _decoy_single_photon(
    link: LinkParameters, decoy: DecoyStats, n: int
) -> tuple[float, float] | None:
    """(n1, e1) from the disclosed decoy-class counts, or None if they say nothing."""
    assert link.decoy_mu is not None
    (ps, pd, pv), (cs, cd, cv) = decoy.pulses, decoy.clicks
    if min(ps, pd, pv) == 0 or cs == 0 or decoy.sifted[0] == 0:
        return None
    gain_mu, gain_nu, y0 = cs / ps, cd / pd, cv / pv
    error_nu = decoy.errors[0] / decoy.sifted[0]
    y1, e1 = decoy_bounds(link.mu, link.decoy_mu, gain_mu, gain_nu, y0, error_nu)
    q1 = y1 * link.mu * math.exp(-link.mu)
    return n * min(1.0, q1 / gain_mu), e1


def secure_key_length(
    report: BlockReport,
    params: PostProcessingParameters,
    link: LinkParameters,
    decoy: DecoyStats | None,
    leak: int,
) -> int:
    """n_final (see module doc), filling the bound fields of ``report``; may be negative."""
    n, e = report.kept_bits, report.qber_bound
    assert e is not None
    if decoy is not None and link.decoy_mu is not None:
        single = _decoy_single_photon(link, decoy, n)
        if single is None:
            return -1
        n1, e1 = single
        report.single_photon_bits, report.single_photon_error = n1, e1
        base = n1 * (1 - binary_entropy(e1))
    else:
        base = n * (1 - binary_entropy(e))
    return math.floor(base - leak - VERIFICATION_BITS - 2 * math.log2(1 / params.eps_pa))


def _estimate(report: BlockReport, params: PostProcessingParameters) -> None:
    k, n = report.sample_bits, report.kept_bits
    e = report.sample_errors / k
    report.qber_estimate = e
    bound = e
    if params.pe_epsilon is not None and n > 0:
        bound = min(0.5, e + _pe_deviation(n, k, params.pe_epsilon))
    report.qber_bound = bound
    if e > params.qber_threshold:
        report.aborted = f"estimated QBER {e:.4f} above threshold {params.qber_threshold}"


def _sift(mine: PartyRecord, their_bases: bytes) -> bytes:
    return select_bits(mine.bits, not_bits(xor_bits(mine.bases, their_bases)))


def _sample_mask(seed: bytes, n: int, fraction: float) -> bytes:
    return bernoulli_bits(random.Random(seed), n, fraction)


def _frame(kind: Msg, body: bytes) -> bytes:
    return bytes([kind]) + body


def _read_u32(body: bytes, offset: int) -> tuple[int, int]:
    if len(body) < offset + 4:
        raise PostProcessingError("message truncated")
    return _U32.unpack_from(body, offset)[0], offset + 4


def _split_keys(material: bytes, key_bytes: int) -> list[bytes]:
    return [material[i : i + key_bytes] for i in range(0, len(material), key_bytes)]


class AliceSession:
    """Alice's end of the post-processing of one block (a sans-IO responder)."""

    def __init__(
        self,
        record: PartyRecord,
        params: PostProcessingParameters,
        link: LinkParameters,
        decoy: DecoyStats | None = None,
    ) -> None:
        self._record = record
        self._params = params
        self._link = link
        self._decoy = decoy
        self._expect = Msg.SIFT
        self._sifted = b""
        self._kept = b""
        self._cascade: CascadeAlice | None = None
        self.report = BlockReport(detections=len(record.bits))
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
        if d != len(self._record.bits):
            raise PostProcessingError(
                f"Bob reports {d} clicks, Alice recorded {len(self._record.bits)}"
            )
        bob_bases = unpack_from_bytes(body[off:], d)
        self._sifted = _sift(self._record, bob_bases)
        self.report.sifted_bits = len(self._sifted)
        self._expect = Msg.SAMPLE
        return pack_to_bytes(self._record.bases)

    def _on_sample(self, body: bytes) -> bytes:
        if len(body) < 32:
            raise PostProcessingError("SAMPLE message truncated")
        mask = _sample_mask(body[:32], len(self._sifted), self._params.sample_fraction)
        k = mask.count(1)
        bob_sample = unpack_from_bytes(body[32:], k)
        mine = select_bits(self._sifted, mask)
        self._kept = select_bits(self._sifted, not_bits(mask))
        r = self.report
        r.sample_bits, r.kept_bits = k, len(self._kept)
        r.sample_errors = xor_bits(mine, bob_sample).count(1)
        self._cascade = CascadeAlice(self._kept)
        if k and r.kept_bits:
            _estimate(r, self._params)
        # Bob takes the same decision from the same numbers; only ABORT may follow it.
        self._expect = Msg.ABORT if r.aborted or not k or not r.kept_bits else Msg.CASCADE
        return pack_to_bytes(mine)

    def _on_cascade(self, body: bytes) -> bytes:
        assert self._cascade is not None
        self._expect = Msg.VERIFY
        return self._cascade.handle(body)

    def _on_verify(self, body: bytes) -> bytes:
        assert self._cascade is not None
        n = len(self._kept)
        size, off = _read_u32(body, 0)
        if len(body) != off + size + 8 or size != (n + VERIFICATION_BITS - 1 + 7) // 8:
            raise PostProcessingError("VERIFY message has the wrong size")
        seed = int.from_bytes(body[off : off + size], "little")
        tag = toeplitz_hash_parity(seed, pack_bits(self._kept), n, VERIFICATION_BITS)
        equal = hmac.compare_digest(tag.to_bytes(8, "little"), body[off + size :])
        r = self.report
        r.ec_disclosed_bits = self._cascade.disclosed_bits
        r.verification_bits = VERIFICATION_BITS
        r.disclosed_bits = r.sample_bits + r.ec_disclosed_bits + VERIFICATION_BITS
        r.secure_length = secure_key_length(
            r, self._params, self._link, self._decoy, r.ec_disclosed_bits
        )
        if not equal:
            r.aborted = "verification hash mismatch after error correction"
        self._expect = Msg.AMPLIFY
        return b"\x01" if equal else b"\x00"

    def _on_amplify(self, body: bytes) -> bytes:
        if self.report.aborted:
            raise PostProcessingError("AMPLIFY after the block was aborted")
        m, off = _read_u32(body, 0)
        size, off = _read_u32(body, off)
        n = len(self._kept)
        secure = self.report.secure_length
        key_bits = self._params.key_bits
        if m != max(0, secure) // key_bits * key_bits or m == 0:
            raise PostProcessingError(f"Bob asks for {m} key bits, Alice computes {secure}")
        if size != (n - 1 + 7) // 8 or len(body) != off + size:
            raise PostProcessingError("AMPLIFY seed has the wrong size")
        seed = int.from_bytes(body[off:], "little")
        material = modified_toeplitz_hash(seed, pack_bits(self._kept), n, m).to_bytes(
            m // 8, "little"
        )
        self.report.final_bits = m
        ids = [uuid.uuid4().bytes for _ in range(m // key_bits)]
        self.outcome = PartyOutcome(
            list(zip(ids, _split_keys(material, key_bits // 8), strict=True)), self.report
        )
        self._expect = Msg.ABORT  # the block is finished
        return b"".join(ids)


def bob_postprocess(
    record: PartyRecord,
    request: Callable[[bytes], bytes],
    params: PostProcessingParameters,
    link: LinkParameters,
    decoy: DecoyStats | None = None,
    *,
    timings: dict[str, float] | None = None,
) -> PartyOutcome:
    """Bob's end: drives the whole block through ``request`` and returns his keys.

    ``timings``, if given, receives the seconds spent in sifting (with estimation), error
    correction and verification plus amplification ("sifting", "ec", "pa").
    """
    clock = time.perf_counter
    marks = {"sifting": 0.0, "ec": 0.0, "pa": 0.0}
    start = clock()
    report = BlockReport(detections=len(record.bits))

    def abort(reason: str) -> PartyOutcome:
        report.aborted = reason
        request(_frame(Msg.ABORT, reason.encode()))
        return PartyOutcome([], report)

    d = len(record.bits)
    alice_bases = unpack_from_bytes(
        request(_frame(Msg.SIFT, _U32.pack(d) + pack_to_bytes(record.bases))), d
    )
    sifted = _sift(record, alice_bases)
    report.sifted_bits = len(sifted)
    seed = secrets.token_bytes(32)
    mask = _sample_mask(seed, len(sifted), params.sample_fraction)
    mine = select_bits(sifted, mask)
    kept = select_bits(sifted, not_bits(mask))
    k, n = len(mine), len(kept)
    theirs = unpack_from_bytes(request(_frame(Msg.SAMPLE, seed + pack_to_bytes(mine))), k)
    report.sample_bits, report.kept_bits = k, n
    report.sample_errors = xor_bits(mine, theirs).count(1)
    marks["sifting"] = clock() - start
    if k == 0 or n == 0:
        return abort("block too small to estimate the QBER")
    _estimate(report, params)
    if report.aborted:
        return abort(report.aborted)
    e = report.qber_bound
    assert e is not None
    # Even a perfect code leaks n h(e): skip the work when no key can come out.
    if secure_key_length(report, params, link, decoy, math.ceil(n * binary_entropy(e))) <= 0:
        return abort("no secret key possible at this QBER and block size")

    start = clock()
    result = cascade_bob(
        kept,
        report.qber_estimate or 0.0,
        lambda body: request(_frame(Msg.CASCADE, body)),
        passes=params.cascade_passes,
        seed=secrets.token_bytes(32),
    )
    marks["ec"] = clock() - start
    start = clock()
    corrected = result.corrected
    report.ec_disclosed_bits = result.disclosed_bits
    report.corrected_errors = result.corrections
    report.verification_bits = VERIFICATION_BITS
    report.disclosed_bits = k + result.disclosed_bits + VERIFICATION_BITS
    value = pack_bits(corrected)
    vseed = secrets.randbits(n + VERIFICATION_BITS - 1)
    vsize = (n + VERIFICATION_BITS - 1 + 7) // 8
    tag = toeplitz_hash_parity(vseed, value, n, VERIFICATION_BITS)
    verdict = request(
        _frame(
            Msg.VERIFY,
            _U32.pack(vsize) + vseed.to_bytes(vsize, "little") + tag.to_bytes(8, "little"),
        )
    )
    if verdict != b"\x01":
        return abort("verification hash mismatch after error correction")
    secure = secure_key_length(report, params, link, decoy, result.disclosed_bits)
    m = max(0, secure) // params.key_bits * params.key_bits
    report.secure_length = secure
    if m == 0:
        marks["pa"] = clock() - start
        if timings is not None:
            timings.update(marks)
        return abort("no secret key left after error correction")
    pseed = secrets.randbits(n - 1)
    psize = (n - 1 + 7) // 8
    ids = request(
        _frame(Msg.AMPLIFY, _U32.pack(m) + _U32.pack(psize) + pseed.to_bytes(psize, "little"))
    )
    count = m // params.key_bits
    if len(ids) != 16 * count:
        raise PostProcessingError("Alice sent the wrong number of key IDs")
    material = modified_toeplitz_hash(pseed, value, n, m).to_bytes(m // 8, "little")
    report.final_bits = m
    keys = list(
        zip(
            _split_keys(ids, 16),
            _split_keys(material, params.key_bits // 8),
            strict=True,
        )
    )
    marks["pa"] = clock() - start
    if timings is not None:
        timings.update(marks)
    return PartyOutcome(keys, report)


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
