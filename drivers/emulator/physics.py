"""The physics of the emulated BB84 link: its parameters, the exact per-gate probabilities
of every click Bob can see, the expected counts they give (``link_model``) and the
simulation of the clicks of one block (``simulate_block``).

Protocol (Lim, Curty, Walenta, Xu and Zbinden, PRA 89, 022307 (2014), "Lim et al." below):
Alice picks basis X with probability ``q_x`` (else Z), a random bit, and, with a laser
source, one of three intensities (signal ``mu``, decoy ``nu``, weak/vacuum decoy
``omega``) with probabilities ``p_k``; Bob picks X with the same ``q_x``. Key comes from
X-basis clicks of every intensity; Z-basis clicks are disclosed to bound the phase error.
Without decoy states a laser sends ``mu`` only (key then rests on the GLLP bound, which
counts every multi-photon pulse as known to Eve); a single-photon source sends exactly one
photon per pulse.

Source and channel. A laser pulse of intensity ``k`` holds ``n`` photons with probability
``e^-k k^n / n!`` (phase-randomised weak coherent pulse). Each photon crosses the fibre
with ``t = 10^(-alpha L / 10)`` and reaches Bob's detectors (``detectors``): with the bases
equal it goes to the detector of Alice's bit except with the misalignment probability
``e_mis``, with the bases different to either with probability 1/2.

Eavesdroppers. Intercept-resend on a fraction ``f`` of pulses: Eve measures in a random
basis and resends her result with the same photon number (so Bob's click rate does not
betray her); when her basis is not Alice's, Bob's result in Alice's basis is random, so an
intercepted click carries error ``1/4 + e_mis/2``. Photon-number splitting (PNS): Eve
measures the photon number, keeps one photon of every multi-photon pulse (she reads it
after the bases are announced, so she knows those bits), sends ``n - 1`` photons to Bob
over a lossless channel, and blocks single photons; she forwards fractions ``s_m`` of
multi-photon and ``s_1`` of single-photon pulses chosen so that the signal class clicks
exactly as often as on the real fibre. Only the decoy classes, which she cannot tell
apart from the signal, show her.

Clicks. For every combination of intensity class, Alice's basis and bit, Bob's basis,
Eve's action and photon number, ``detectors.gate_patterns`` gives the probability of each
click pattern; the table of those rows (``GateTable``) is exact up to a photon number whose
Poisson tail is below 1e-15. The simulation draws the click gates from the dead-time and
afterpulse renewal process (``detectors.renewal_clicks``), then each photon click's row
from that table (inverting its CDF through a bucket table), so its cost is per click, not
per pulse. An afterpulse repeats the bit of the click before it on whatever pulse Alice sent in that
gate. ``link_model`` turns the same table into expected counts per pulse. The numpy
generator behind the draws is not a cryptographic one, so Alice's bit (the key) is drawn
apart: the table picks a pair of rows that differ only by her bit, and a uniform from the
system's secure generator (``os.urandom``) picks the member with the pair's exact odds,
unless the caller seeded the run for reproducibility.

Bit arrays are one byte per bit (``bitarrays``); those helpers are re-exported here.
"""

from __future__ import annotations

import functools
import math
import os
import random
from dataclasses import dataclass, field

import numpy as np

from .bitarrays import (
    ALL_ONES,
    and_bits,
    bernoulli_bits,
    binary_entropy,
    binomial,
    not_bits,
    or_bits,
    pack_bits,
    pack_to_bytes,
    random_bits,
    select_bits,
    unpack_bits,
    unpack_from_bytes,
    xor_bits,
)
from .detectors import ClickTiming, click_timing, gate_patterns, renewal_clicks

__all__ = [
    "ALL_ONES",
    "BlockTruth",
    "DecoyStats",
    "DetectionBlock",
    "LinkModel",
    "Bb84Parameters",
    "PartyRecord",
    "and_bits",
    "bernoulli_bits",
    "binary_entropy",
    "binomial",
    "channel_transmittance",
    "gate_table",
    "link_model",
    "not_bits",
    "or_bits",
    "pack_bits",
    "pack_to_bytes",
    "random_bits",
    "select_bits",
    "simulate_block",
    "unpack_bits",
    "unpack_from_bytes",
    "xor_bits",
]

X_BASIS, Z_BASIS = 0, 1
SOURCES = ("laser", "single-photon")
DOUBLE_CLICKS = ("squash", "discard")
#: Photon numbers above this carry a Poisson tail below 1e-15 for intensities up to 2.
_MAX_PHOTONS = 16


@dataclass(frozen=True)
class Bb84Parameters:
    """Every physical parameter of the emulated link. Defaults: a 1 GHz decoy-state link
    with GHz-gated InGaAs/InP avalanche photodiodes (see docs/emulator.md for sources)."""

    source: str = "laser"  # "laser" (weak coherent pulses) or "single-photon"
    mu: float = 0.5  # signal intensity (mean photon number)
    decoy_mu: float | None = 0.2  # decoy intensity nu; None: no decoy states
    vacuum_mu: float = 0.0  # weakest decoy omega (0: vacuum)
    decoy_prob: float = 0.5  # p_nu
    vacuum_prob: float = 0.25  # p_omega (the signal gets the rest)
    x_basis_prob: float = 0.75  # q_x, for Alice and Bob alike
    pulse_rate: float = 1e9  # pulses (gates) per second
    alpha_db_per_km: float = 0.2  # fibre attenuation (SMF-28 at 1550 nm)
    length_km: float = 10.0
    detector_efficiency: float = 0.2  # eta_0, of the bit-0 detector
    efficiency_mismatch: float = 0.05  # eta_1 = eta_0 (1 - m)
    dark_count_prob: float = 1e-6  # per gate, per detector
    dead_time: float = 50e-9  # seconds the receiver is blind after a click
    afterpulse_prob: float = 0.04  # afterpulses per click
    afterpulse_time: float = 100e-9  # decay constant of the trap release, seconds
    double_click: str = "squash"  # "squash" (random bit) or "discard"
    misalignment: float = 0.01  # e_mis, optical error probability per photon
    eve_fraction: float = 0.0  # intercept-resend on this fraction of pulses
    pns_attack: bool = False  # photon-number-splitting eavesdropper

    def __post_init__(self) -> None:
        checks = [
            (self.source in SOURCES, f"source must be one of {', '.join(SOURCES)}"),
            (0 < self.mu <= 2, "mu (signal intensity) must be in (0, 2]"),
            (self.pulse_rate > 0, "pulse rate must be positive"),
            (self.alpha_db_per_km >= 0, "fibre attenuation must be >= 0 dB/km"),
            (self.length_km >= 0, "fibre length must be >= 0 km"),
            (0 < self.detector_efficiency <= 1, "detector efficiency must be in (0, 1]"),
            (0 <= self.efficiency_mismatch < 1, "efficiency mismatch must be in [0, 1)"),
            (0 <= self.dark_count_prob < 0.5, "dark count probability must be in [0, 0.5)"),
            (self.dead_time >= 0, "dead time must be >= 0"),
            (0 <= self.afterpulse_prob < 1, "afterpulse probability must be in [0, 1)"),
            (self.afterpulse_time >= 0, "afterpulse time constant must be >= 0"),
            (self.double_click in DOUBLE_CLICKS, "double clicks: squash or discard"),
            (0 <= self.misalignment <= 0.5, "intrinsic QBER must be in [0, 0.5]"),
            (0 <= self.eve_fraction <= 1, "eavesdropped fraction must be in [0, 1]"),
            (0 < self.x_basis_prob < 1, "X-basis probability must be in (0, 1)"),
            (
                not (self.pns_attack and self.eve_fraction > 0),
                "choose one eavesdropper: intercept-resend or photon-number splitting",
            ),
            (
                not (self.pns_attack and self.source == "single-photon"),
                "a photon-number-splitting attack needs a laser source",
            ),
        ]
        if self.decoy_states:
            assert self.decoy_mu is not None
            checks += [
                (
                    0 <= self.vacuum_mu < self.decoy_mu,
                    "vacuum decoy intensity must be in [0, decoy intensity)",
                ),
                (
                    self.decoy_mu + self.vacuum_mu < self.mu,
                    "decoy intensity (plus the vacuum decoy's) must be below mu",
                ),
                (
                    self.decoy_prob > 0
                    and self.vacuum_prob > 0
                    and self.decoy_prob + self.vacuum_prob < 1,
                    "decoy and vacuum probabilities must be positive and sum below 1",
                ),
            ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def decoy_states(self) -> bool:
        return self.source == "laser" and self.decoy_mu is not None

    @property
    def intensities(self) -> tuple[float, ...]:
        """Intensity of each class (signal first); a single-photon source has one class."""
        if self.source == "single-photon":
            return (1.0,)
        if self.decoy_mu is None:
            return (self.mu,)
        return (self.mu, self.decoy_mu, self.vacuum_mu)

    @property
    def class_probs(self) -> tuple[float, ...]:
        if not self.decoy_states:
            return (1.0,)
        return (1.0 - self.decoy_prob - self.vacuum_prob, self.decoy_prob, self.vacuum_prob)

    @property
    def mode(self) -> str:
        """How the key length is bounded: "decoy", "gllp" or "single-photon"."""
        if self.source == "single-photon":
            return "single-photon"
        return "decoy" if self.decoy_states else "gllp"

    def photon_numbers(self, k: int) -> np.ndarray:
        """P(n photons) for class k, n = 0 .. _MAX_PHOTONS (the tail folded into the last)."""
        out = np.zeros(_MAX_PHOTONS + 1)
        if self.source == "single-photon":
            out[1] = 1.0
            return out
        mean = self.intensities[k]
        if mean == 0:
            out[0] = 1.0
            return out
        terms = [math.exp(-mean) * mean**n / math.factorial(n) for n in range(_MAX_PHOTONS)]
        out[:_MAX_PHOTONS] = terms
        out[_MAX_PHOTONS] = max(0.0, 1.0 - sum(terms))
        return out


def channel_transmittance(params: Bb84Parameters) -> float:
    """t = 10^(-alpha L / 10): the fibre alone (detector efficiencies are separate)."""
    return 10 ** (-params.alpha_db_per_km * params.length_km / 10)


# -- the exact per-gate table ------------------------------------------------------------


@dataclass(frozen=True)
class GateTable:
    """Every way a gate can click, with its probability (classes weighted by p_k)."""

    prob: np.ndarray  # P(row and click) per gate
    cls: np.ndarray  # intensity class
    alice_basis: np.ndarray
    alice_bit: np.ndarray
    bob_basis: np.ndarray
    photons: np.ndarray  # photons in the pulse Alice sent
    pattern: np.ndarray  # 0: D0 only, 1: D1 only, 2: both
    eve_knows: np.ndarray  # PNS: Eve holds a photon of this pulse (or blocked it)


def _photon_weights(
    state_basis: int, state_bit: int, bob_basis: int, e_mis: float
) -> tuple[float, float]:
    if state_basis != bob_basis:
        return 0.5, 0.5
    return (1.0 - e_mis, e_mis) if state_bit == 0 else (e_mis, 1.0 - e_mis)


def _pns_fractions(params: Bb84Parameters, t: float) -> tuple[float, float]:
    """(s_1, s_m): the forwarded fractions that keep the signal class's click rate."""
    honest = _class_click_prob(params, 0, t, None)
    low = _class_click_prob(params, 0, t, (0.0, 0.0))
    multi = _class_click_prob(params, 0, t, (0.0, 1.0))
    if multi >= honest:
        return 0.0, (honest - low) / (multi - low) if multi > low else 0.0
    full = _class_click_prob(params, 0, t, (1.0, 1.0))
    return min(1.0, (honest - multi) / (full - multi)) if full > multi else 1.0, 1.0


def _rows(
    params: Bb84Parameters, k: int, t: float, pns: tuple[float, float] | None
) -> list[tuple[float, int, int, int, int, int, int, bool]]:
    """(P, alice basis, alice bit, bob basis, photons, pattern, eve knows) rows of class k,
    without the class probability, for every click pattern."""
    q = (params.x_basis_prob, 1.0 - params.x_basis_prob)
    eta0 = params.detector_efficiency
    eta1 = eta0 * (1.0 - params.efficiency_mismatch)
    p_dc, e_mis, f = params.dark_count_prob, params.misalignment, params.eve_fraction
    numbers = params.photon_numbers(k)
    rows = []
    for a_basis in (0, 1):
        for a_bit in (0, 1):
            # Eve's action: (weight, state basis, state bit) of what reaches Bob.
            actions = [(1.0 - f, a_basis, a_bit)]
            if f > 0:
                actions.append((f / 2, a_basis, a_bit))  # her basis was Alice's
                actions += [(f / 4, 1 - a_basis, s) for s in (0, 1)]  # it was not
            for b_basis in (0, 1):
                base = q[a_basis] * q[b_basis] * 0.5
                for weight, s_basis, s_bit in actions:
                    w0, w1 = _photon_weights(s_basis, s_bit, b_basis, e_mis)
                    for n, p_n in enumerate(numbers):
                        if p_n <= 0:
                            continue
                        ways = [(1.0, n, t, False)]
                        if pns is not None:
                            s1, sm = pns
                            keep = s1 if n == 1 else sm if n >= 2 else 1.0
                            sent = max(n - 1, 1) if n >= 1 else 0
                            ways = [(keep, sent, 1.0, n >= 2), (1.0 - keep, 0, 1.0, n >= 1)]
                        for p_way, photons, trans, knows in ways:
                            if p_way <= 0:
                                continue
                            pats = gate_patterns(photons, trans, w0, w1, eta0, eta1, p_dc)
                            for pattern, p_pat in enumerate(pats):
                                p = base * weight * p_n * p_way * p_pat
                                if p > 0:
                                    rows.append((p, a_basis, a_bit, b_basis, n, pattern, knows))
    return rows  # type: ignore[return-value]


def _class_click_prob(
    params: Bb84Parameters, k: int, t: float, pns: tuple[float, float] | None
) -> float:
    return sum(r[0] for r in _rows(params, k, t, pns))


@functools.lru_cache(maxsize=64)
def gate_table(params: Bb84Parameters) -> GateTable:
    t = channel_transmittance(params)
    pns = _pns_fractions(params, t) if params.pns_attack else None
    columns: list[list[float]] = [[] for _ in range(8)]
    for k, p_k in enumerate(params.class_probs):
        for row in _rows(params, k, t, pns):
            values = (row[0] * p_k, k, *row[1:])
            for column, value in zip(columns, values, strict=True):
                column.append(value)
    prob, cls, a_basis, a_bit, b_basis, photons, pattern, knows = columns
    u8 = np.uint8
    return GateTable(
        np.array(prob),
        np.array(cls, dtype=u8),
        np.array(a_basis, dtype=u8),
        np.array(a_bit, dtype=u8),
        np.array(b_basis, dtype=u8),
        np.array(photons, dtype=u8),
        np.array(pattern, dtype=u8),
        np.array(knows, dtype=bool),
    )


# -- expected counts ---------------------------------------------------------------------


@dataclass(frozen=True)
class LinkModel:
    """Expected counts per pulse (gate) of the link, from the exact table."""

    timing: ClickTiming
    clicks: float  # clicks per pulse, dead time and afterpulses included
    n_x: tuple[float, ...]  # X-basis sifted clicks per pulse, by class
    m_x: tuple[float, ...]  # ... of which errors
    n_z: tuple[float, ...]
    m_z: tuple[float, ...]
    single_x: float  # X-basis sifted clicks from single-photon pulses
    vacuum_x: float  # ... from empty pulses
    single_phase_error: float  # error rate of single-photon Z-basis clicks
    pns_fractions: tuple[float, float] | None

    @property
    def qber_x(self) -> float:
        return sum(self.m_x) / sum(self.n_x) if sum(self.n_x) else 0.5

    @property
    def qber_z(self) -> float:
        return sum(self.m_z) / sum(self.n_z) if sum(self.n_z) else 0.5


def _error_weight(table: GateTable, params: Bb84Parameters) -> np.ndarray:
    """P(Bob's bit differs from Alice's) of each row: a double click is a coin flip."""
    wrong = (table.pattern != 2) & (table.pattern != table.alice_bit)
    return np.where(table.pattern == 2, 0.5, wrong.astype(float))


@functools.lru_cache(maxsize=64)
def link_model(params: Bb84Parameters) -> LinkModel:
    table = gate_table(params)
    y = float(table.prob.sum())
    if y <= 0:
        raise ValueError("no clicks at all on this link: check length and losses")
    timing = click_timing(
        y, params.dead_time, params.afterpulse_prob, params.afterpulse_time, params.pulse_rate
    )
    rate = timing.clicks_per_gate
    share = timing.afterpulse_share
    kept = table.prob * (table.pattern != 2) if params.double_click == "discard" else table.prob
    photon = rate * (1.0 - share) / y  # per pulse, per unit of table probability
    err = _error_weight(table, params)
    q = (params.x_basis_prob, 1.0 - params.x_basis_prob)
    p_k = params.class_probs
    sums: dict[str, list[float]] = {"nx": [], "mx": [], "nz": [], "mz": []}
    for basis, n_key, m_key in ((X_BASIS, "nx", "mx"), (Z_BASIS, "nz", "mz")):
        match = (table.alice_basis == basis) & (table.bob_basis == basis)
        for k in range(len(p_k)):
            rows = match & (table.cls == k)
            ap = rate * share * p_k[k] * q[basis] ** 2  # afterpulses: random bit
            sums[n_key].append(photon * float(kept[rows].sum()) + ap)
            sums[m_key].append(photon * float((kept * err)[rows].sum()) + ap / 2)
    # Photon-number truth, afterpulses included (they land on pulses of any class).
    ap_photons = np.sum([p * params.photon_numbers(k) for k, p in enumerate(p_k)], axis=0)
    x_match = (table.alice_basis == X_BASIS) & (table.bob_basis == X_BASIS)
    z_match = (table.alice_basis == Z_BASIS) & (table.bob_basis == Z_BASIS)
    ones = table.photons == 1
    ap_x = rate * share * q[0] ** 2
    ap_z = rate * share * q[1] ** 2
    single_x = photon * float(kept[x_match & ones].sum()) + ap_x * ap_photons[1]
    vacuum_x = photon * float(kept[x_match & (table.photons == 0)].sum()) + ap_x * ap_photons[0]
    single_z = photon * float(kept[z_match & ones].sum()) + ap_z * ap_photons[1]
    single_z_err = photon * float((kept * err)[z_match & ones].sum()) + ap_z * ap_photons[1] / 2
    t = channel_transmittance(params)
    return LinkModel(
        timing=timing,
        clicks=rate,
        n_x=tuple(sums["nx"]),
        m_x=tuple(sums["mx"]),
        n_z=tuple(sums["nz"]),
        m_z=tuple(sums["mz"]),
        single_x=single_x,
        vacuum_x=vacuum_x,
        single_phase_error=single_z_err / single_z if single_z else 0.5,
        pns_fractions=_pns_fractions(params, t) if params.pns_attack else None,
    )


# -- the simulation of one block ---------------------------------------------------------


class _BucketTable:
    """Draws row i with probability prob[i] / sum(prob) by inverting the CDF: a uniform
    falls into one of 2^16 equal buckets, and a bucket inside a single row's CDF interval
    names that row at once; only the few buckets a row boundary crosses (at most one per
    row) need a binary search. Exact to the uniform's 53 bits."""

    BUCKETS = 1 << 16

    def __init__(self, prob: np.ndarray) -> None:
        cdf = np.cumsum(prob / prob.sum())
        cdf[-1] = 1.0
        edges = np.arange(self.BUCKETS + 1) / self.BUCKETS
        first = np.searchsorted(cdf, edges[:-1], side="right")
        last = np.searchsorted(cdf, np.nextafter(edges[1:], 0), side="right")
        self.cdf = cdf
        self.rows = np.where(first == last, first, -1).astype(np.int32)

    def draw(self, rng: np.random.Generator, count: int) -> np.ndarray:
        u = rng.random(count)
        row = self.rows[(u * self.BUCKETS).astype(np.int32)]
        straddle = np.flatnonzero(row < 0)
        row[straddle] = np.searchsorted(self.cdf, u[straddle], side="right")
        return row


# A row's fields packed in one integer, so a click costs one gather: class (2 bits),
# Alice's basis, Alice's bit, Bob's basis, pattern (2 bits), Eve knows, then photons.
_CLS, _A_BASIS, _A_BIT, _B_BASIS, _PATTERN, _KNOWS, _PHOTONS = 0, 2, 3, 4, 5, 7, 8


def _pack_rows(
    cls: np.ndarray,
    a_basis: np.ndarray,
    a_bit: np.ndarray,
    b_basis: np.ndarray,
    pattern: np.ndarray,
    knows: np.ndarray,
    photons: np.ndarray,
) -> np.ndarray:
    fields = (
        (cls, _CLS),
        (a_basis, _A_BASIS),
        (a_bit, _A_BIT),
        (b_basis, _B_BASIS),
        (pattern, _PATTERN),
        (knows, _KNOWS),
        (photons, _PHOTONS),
    )
    code = np.zeros(len(cls), dtype=np.uint16)
    for values, shift in fields:
        code |= values.astype(np.uint16) << shift
    return code


def _field(code: np.ndarray, shift: int, width: int = 1) -> np.ndarray:
    return ((code >> shift) & ((1 << width) - 1)).astype(np.uint8)


@dataclass(frozen=True)
class _Sampler:
    """Draws row codes in two steps. The table picks a pair of rows that differ only
    by Alice's bit (and, with it, which detector her photons favour); a second uniform
    picks the member, with the pair's exact odds. Only that second draw decides Alice's
    key bit, so it alone has to come from the system's secure generator."""

    table: _BucketTable
    codes: np.ndarray  # the pair's member with Alice's bit 0
    zero_below: np.ndarray  # member 0 when a 16-bit uniform is below this

    def draw(self, gen: np.random.Generator, count: int, secure: bool) -> np.ndarray:
        pair = self.table.draw(gen, count)
        if secure:
            u = np.frombuffer(os.urandom(2 * count), dtype="<u2")
        else:
            u = gen.integers(0, 1 << 16, count, dtype=np.uint16)
        one = (u >= self.zero_below[pair]).astype(np.uint16)
        code = self.codes[pair]
        # Alice's bit 1: set it, and swap single-detector patterns (D0 only <-> D1 only).
        swap = one & (code >> np.uint16(_PATTERN + 1) ^ np.uint16(1))
        return code ^ (one << np.uint16(_A_BIT)) ^ (swap << np.uint16(_PATTERN))


def _paired(prob: np.ndarray, codes: np.ndarray) -> _Sampler:
    """Group rows by their Alice-bit-0 form (rows that look the same merge): fewer,
    heavier rows also make the draw cheaper."""
    a_bit = (codes >> _A_BIT) & 1
    pattern = (codes >> _PATTERN) & 3
    single = pattern < 2
    swapped = (a_bit & single).astype(np.uint16) << _PATTERN
    canonical = (codes & ~np.uint16(1 << _A_BIT)) ^ swapped
    pairs, where = np.unique(canonical, return_inverse=True)
    total = np.bincount(where, weights=prob)
    zero = np.bincount(where, weights=prob * (a_bit == 0))
    threshold = np.rint(zero / total * 65536).clip(0, 65536).astype(np.int64)
    return _Sampler(_BucketTable(total), pairs, threshold)


@functools.lru_cache(maxsize=64)
def _samplers(params: Bb84Parameters, truth: bool) -> tuple[_Sampler, _Sampler]:
    """Samplers for photon clicks (the gate table) and for the pulse under an afterpulse
    (class, bases, bit and photon number as Alice and Bob chose them). Without ``truth``
    the photon number and Eve's knowledge are left out of the codes."""
    table = gate_table(params)
    keep = 1 if truth else 0
    codes = _pack_rows(
        table.cls,
        table.alice_basis,
        table.alice_bit,
        table.bob_basis,
        table.pattern,
        table.eve_knows * keep,
        table.photons * keep,
    )
    q = (params.x_basis_prob, 1.0 - params.x_basis_prob)
    rows = []
    for k, p_k in enumerate(params.class_probs):
        for n, p_n in enumerate(params.photon_numbers(k)):
            for a_basis in (0, 1):
                for b_basis in (0, 1):
                    for a_bit in (0, 1):
                        p = p_k * p_n * q[a_basis] * q[b_basis] * 0.5
                        if p > 0:
                            rows.append((p, k, a_basis, a_bit, b_basis, n * keep))
    c = [np.array([r[i] for r in rows]) for i in range(6)]
    # The pattern of an afterpulse row is a placeholder (D0 only); Bob's bit is the
    # previous click's.
    zero = np.zeros(len(rows), dtype=np.uint8)
    pulse_codes = _pack_rows(c[1], c[2], c[3], c[4], c[3], zero, c[5])
    return _paired(table.prob, codes), _paired(c[0], pulse_codes)


@dataclass(frozen=True)
class PartyRecord:
    """What one end knows after the quantum phase: its bit and basis for every click
    (and, for Alice, the intensity class of each click's pulse)."""

    bits: bytes  # one byte per click, 0/1
    bases: bytes  # 0 = X (key basis), 1 = Z
    intensities: bytes = field(default=b"", repr=False)  # Alice only: class per click
    pulses: int = 0  # Alice only: pulses she sent in the block

    def __repr__(self) -> str:  # raw key bits never appear in logs
        return f"PartyRecord(<{len(self.bits)} clicks>)"


@dataclass(frozen=True)
class DecoyStats:
    """Per-class counts sent beside a record by earlier versions of the two-host link
    format; kept for that format. The records now hold every class's clicks."""

    pulses: tuple[int, int, int]
    clicks: tuple[int, int, int]
    sifted: tuple[int, int]
    errors: tuple[int, int]


@dataclass(frozen=True)
class BlockTruth:
    """What only the emulator knows about each click (for tests and reports)."""

    photons: bytes = field(repr=False)  # photons in the pulse of each click
    eve_knows: bytes = field(repr=False)  # 1 where a PNS eavesdropper knows Alice's bit
    afterpulses: int = 0
    double_clicks: int = 0


@dataclass(frozen=True)
class DetectionBlock:
    """One simulated block: Alice's and Bob's separate records of its clicks."""

    alice: PartyRecord
    bob: PartyRecord
    pulses: int
    simulated_seconds: float
    decoy: DecoyStats | None = None
    truth: BlockTruth | None = None


def numpy_rng(rng: random.Random | np.random.Generator) -> np.random.Generator:
    """A numpy generator seeded from ``rng`` (so seeded runs stay reproducible)."""
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(rng.getrandbits(128))


def simulate_block(
    params: Bb84Parameters,
    pulses: int,
    rng: random.Random | np.random.Generator,
    *,
    truth: bool = True,
) -> DetectionBlock:
    """Simulate ``pulses`` pulses and return the clicks as seen by each end (and, with
    ``truth``, the photon number and Eve's knowledge of each click)."""
    gen = numpy_rng(rng)
    model = link_model(params)
    photons, pulses_under_afterpulses = _samplers(params, truth)
    # Alice's bits come from the system's secure generator unless the run is seeded.
    secure = isinstance(rng, random.SystemRandom)
    _, after = renewal_clicks(model.timing, pulses, gen)
    count = len(after)
    ap_idx = np.flatnonzero(after)
    code = photons.draw(gen, count, secure)
    if len(ap_idx):  # an afterpulse lands on whatever pulse was sent in its gate
        code[ap_idx] = pulses_under_afterpulses.draw(gen, len(ap_idx), secure)
    b_bit = _field(code, _PATTERN, 2)
    double = b_bit == 2
    doubles = int(np.count_nonzero(double))
    if doubles:  # squashing: a double click becomes a random bit
        b_bit[double] = gen.integers(0, 2, doubles, dtype=np.uint8)
    if len(ap_idx):  # ... and repeats the bit of the last photon click before it
        photon_idx = np.flatnonzero(~after)
        last = photon_idx[np.searchsorted(photon_idx, ap_idx) - 1]
        b_bit[ap_idx] = b_bit[last]
    if params.double_click == "discard" and doubles:
        code, b_bit = code[~double], b_bit[~double]
    return DetectionBlock(
        alice=PartyRecord(
            _field(code, _A_BIT).tobytes(),
            _field(code, _A_BASIS).tobytes(),
            _field(code, _CLS, 2).tobytes(),
            pulses,
        ),
        bob=PartyRecord(b_bit.tobytes(), _field(code, _B_BASIS).tobytes()),
        pulses=pulses,
        simulated_seconds=pulses / params.pulse_rate,
        truth=BlockTruth(
            _field(code, _PHOTONS, 8).tobytes(),
            _field(code, _KNOWS).tobytes(),
            len(ap_idx),
            doubles,
        )
        if truth
        else None,
    )
