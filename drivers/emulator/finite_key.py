"""Finite-key security of the emulated BB84 link: from the public counts of one block, the
statistical bounds on its single-photon content and phase error, the explicit epsilon
budget, and the secret key length.

Decoy states (laser source, three intensities mu_1 > mu_2 + mu_3, mu_2 > mu_3 >= 0): Lim,
Curty, Walenta, Xu and Zbinden, "Concise security bounds for practical decoy-state quantum
key distribution", PRA 89, 022307 (2014), equations (1)-(5) and (B4). With
``tau_n = sum_k p_k e^-k k^n / n!`` and the Hoeffding deviation
``delta(n, eps) = sqrt(n / 2 ln(1 / eps))``::

    n^+-_{X,k} = e^k / p_k (n_{X,k} +- delta(n_X, eps))
    s_{X,0}  >= tau_0 (mu_2 n^-_{X,mu3} - mu_3 n^+_{X,mu2}) / (mu_2 - mu_3)
    s_{X,1}  >= tau_1 mu_1 [n^-_{X,mu2} - n^+_{X,mu3}
                 - (mu_2^2 - mu_3^2) / mu_1^2 (n^+_{X,mu1} - s_{X,0} / tau_0)]
                 / (mu_1 (mu_2 - mu_3) - mu_2^2 + mu_3^2)
    v_{Z,1}  <= tau_1 (m^+_{Z,mu2} - m^-_{Z,mu3}) / (mu_2 - mu_3)    (m^+- with delta(m_Z))
    phi_X    <= v_{Z,1} / s_{Z,1} + gamma(eps, v_{Z,1} / s_{Z,1}, s_{Z,1}, s_{X,1})
    gamma(a, b, c, d) = sqrt((c + d)(1 - b) b / (c d ln 2) log2((c + d) / (c d (1 - b) b a^2)))
    l = floor(s_{X,0} + s_{X,1} (1 - h(phi_X)) - leak_EC - 6 log2(1 / eps) - log2(2 / eps_cor))

(the same bounds with Z counts give s_{Z,0}, s_{Z,1}). The secrecy is
``eps_sec = 2 (2 a_1 + a_2 + a_3) + nu + 10 eps_1 + 2 eps_2`` (B4); every term is set to
one ``eps``, so ``eps = eps_sec / 21`` and the budget reads: 10 eps for the Hoeffding
bounds on the detection counts, 2 eps for those on the error counts, 4 eps for the
sampling bound on the phase error (a_1), 5 eps for privacy amplification and the chain
rules (a_2, a_3, nu). The correctness ``eps_cor`` comes from the 64-bit verification hash.

No decoy states (laser, one intensity): the GLLP bound (Gottesman, Lo, Luetkenhaus and
Preskill, QIC 4, 325 (2004)) counts every multi-photon pulse as known to Eve. Alice sends
N pulses; those with two or more photons and both bases B number at most
``M^+_B = N q_B^2 P(n >= 2) + delta(N, eps)``, so at least ``n_B - M^+_B`` detections came
from pulses with at most one photon, and all errors are charged to them:
``phi_X <= m_Z / (n_Z - M^+_Z) + gamma``. Budget: 2 eps (the two M^+), 4 eps, 5 eps.

A single-photon source: every detection is a single-photon event,
``phi_X <= m_Z / n_Z + gamma``. Budget: 4 eps, 5 eps.

``finite=False`` drops every statistical term (deltas, gamma, the epsilon penalties): the
asymptotic key of the same protocol and intensities.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .physics import Bb84Parameters, LinkModel, binary_entropy, link_model

__all__ = [
    "BlockCounts",
    "EpsilonBudget",
    "Estimates",
    "Protocol",
    "asymptotic_secret_key_rate",
    "estimate",
    "expected_estimates",
    "finite_secret_key_rate",
]

#: Bits of the verification hash; its collision probability 2^-64 is eps_cor.
VERIFICATION_BITS = 64
EPS_COR = 2.0**-VERIFICATION_BITS

_TERMS = {
    "decoy": {
        "detection_counts": 10,
        "error_counts": 2,
        "phase_error_sampling": 4,
        "privacy_amplification": 5,
    },
    "gllp": {"multi_photon_counts": 2, "phase_error_sampling": 4, "privacy_amplification": 5},
    "single-photon": {"phase_error_sampling": 4, "privacy_amplification": 5},
}


@dataclass(frozen=True)
class Protocol:
    """What both ends know about the source: the bound to use and its numbers."""

    mode: str  # "decoy", "gllp" or "single-photon"
    intensities: tuple[float, ...]
    probs: tuple[float, ...]
    x_basis_prob: float
    eps_sec: float = 1e-10

    @classmethod
    def of(cls, link: Bb84Parameters, eps_sec: float = 1e-10) -> Protocol:
        return cls(link.mode, link.intensities, link.class_probs, link.x_basis_prob, eps_sec)

    def tau(self, n: int) -> float:
        """Probability that a pulse holds n photons, over the intensity choice."""
        return sum(
            p * math.exp(-k) * k**n / math.factorial(n)
            for k, p in zip(self.intensities, self.probs, strict=True)
        )


@dataclass(frozen=True)
class EpsilonBudget:
    """eps_sec split into equal terms (see the module doc) and eps_cor."""

    secrecy: float
    correctness: float
    terms: dict[str, int]

    @property
    def unit(self) -> float:
        return self.secrecy / sum(self.terms.values())

    def as_dict(self) -> dict[str, float]:
        out = {"eps_sec": self.secrecy, "eps_cor": self.correctness, "eps": self.unit}
        out.update({name: count * self.unit for name, count in self.terms.items()})
        return out


@dataclass(frozen=True)
class BlockCounts:
    """The public counts of one block, by intensity class."""

    pulses: int
    n_x: tuple[float, ...]  # X-basis sifted detections
    n_z: tuple[float, ...]  # Z-basis sifted detections
    m_z: tuple[float, ...]  # Z-basis errors


@dataclass
class Estimates:
    """The bounds of one block and what they leave for the key."""

    mode: str
    qber_z: float  # observed Z-basis error rate (the QBER estimate)
    s_x0: float  # lower bounds: vacuum / single-photon X detections
    s_x1: float
    s_z1: float
    v_z1: float  # upper bound on single-photon Z errors
    phase_error: float  # phi_X, the upper bound used in h()
    epsilon: EpsilonBudget
    pa_bits: float  # 6 log2(1 / eps)
    correctness_bits: float  # log2(2 / eps_cor)
    intervals: dict[str, list[tuple[float, float]]] = field(default_factory=dict)

    def key_length(self, leak_ec: float) -> int:
        """Secret bits left after ``leak_ec`` disclosed bits (may be negative)."""
        return math.floor(
            self.s_x0
            + self.s_x1 * (1.0 - binary_entropy(self.phase_error))
            - leak_ec
            - self.pa_bits
            - self.correctness_bits
        )

    def as_dict(self) -> dict[str, object]:
        return {
            "mode": self.mode,
            "qber_estimate": self.qber_z,
            "phase_error_bound": self.phase_error,
            "vacuum_x_lower": self.s_x0,
            "single_photon_x_lower": self.s_x1,
            "single_photon_z_lower": self.s_z1,
            "single_photon_z_errors_upper": self.v_z1,
            "intervals": {k: [list(p) for p in v] for k, v in self.intervals.items()},
            "epsilon": self.epsilon.as_dict(),
            "privacy_amplification_bits": self.pa_bits,
            "correctness_bits": self.correctness_bits,
        }


def _hoeffding(n: float, eps: float) -> float:
    return math.sqrt(max(n, 0.0) / 2.0 * math.log(1.0 / eps))


def gamma(a: float, b: float, c: float, d: float) -> float:
    """Lim et al. eq. (5): the random-sampling deviation of the phase error rate.

    The formula vanishes as b -> 0, so an observed rate below one error in the sample is
    taken as one error (b >= 1/c): a clean sample must not prove a zero phase error.
    """
    if c <= 0 or d <= 0:
        return 0.5
    b = min(0.5, max(b, 1.0 / c))
    inner = (c + d) / (c * d * (1.0 - b) * b * a * a)
    return math.sqrt((c + d) * (1.0 - b) * b / (c * d * math.log(2)) * math.log2(inner))


def _scaled_interval(
    proto: Protocol, counts: tuple[float, ...], spread: float
) -> list[tuple[float, float]]:
    """(x^-_k, x^+_k) = e^k / p_k (x_k -+ spread)."""
    return [
        (math.exp(k) / p * (c - spread), math.exp(k) / p * (c + spread))
        for k, p, c in zip(proto.intensities, proto.probs, counts, strict=True)
    ]


def _decoy_lower(proto: Protocol, bounds: list[tuple[float, float]]) -> tuple[float, float]:
    """(s_0, s_1) lower bounds from one basis's scaled intervals (eqs. 2 and 3)."""
    m1, m2, m3 = proto.intensities
    (_, hi1), (lo2, hi2), (lo3, hi3) = bounds
    tau0, tau1 = proto.tau(0), proto.tau(1)
    s0 = max(0.0, tau0 * (m2 * lo3 - m3 * hi2) / (m2 - m3))
    multi = (m2 * m2 - m3 * m3) / (m1 * m1) * (hi1 - s0 / tau0)
    s1 = tau1 * m1 * (lo2 - hi3 - multi) / (m1 * (m2 - m3) - m2 * m2 + m3 * m3)
    return s0, max(0.0, s1)


def estimate(
    proto: Protocol, counts: BlockCounts, *, finite: bool = True, eps_cor: float = EPS_COR
) -> Estimates:
    """The bounds of ``counts`` (see the module doc)."""
    budget = EpsilonBudget(proto.eps_sec, eps_cor, dict(_TERMS[proto.mode]))
    eps = budget.unit
    n_x, n_z, m_z = sum(counts.n_x), sum(counts.n_z), sum(counts.m_z)
    qber_z = m_z / n_z if n_z else 0.5
    spread = (lambda n: _hoeffding(n, eps)) if finite else (lambda n: 0.0)
    intervals: dict[str, list[tuple[float, float]]] = {}
    if proto.mode == "decoy":
        intervals["n_x"] = _scaled_interval(proto, counts.n_x, spread(n_x))
        intervals["n_z"] = _scaled_interval(proto, counts.n_z, spread(n_z))
        intervals["m_z"] = _scaled_interval(proto, counts.m_z, spread(m_z))
        s_x0, s_x1 = _decoy_lower(proto, intervals["n_x"])
        _, s_z1 = _decoy_lower(proto, intervals["n_z"])
        _, m2, m3 = proto.intensities
        (_, m_hi2), (m_lo3, _) = intervals["m_z"][1], intervals["m_z"][2]
        v_z1 = max(0.0, proto.tau(1) * (m_hi2 - m_lo3) / (m2 - m3))
    elif proto.mode == "gllp":
        mu = proto.intensities[0]
        multi = 1.0 - math.exp(-mu) * (1.0 + mu)
        q = proto.x_basis_prob
        bound_x = counts.pulses * q * q * multi + spread(counts.pulses)
        bound_z = counts.pulses * (1 - q) ** 2 * multi + spread(counts.pulses)
        intervals["multi_photon_upper"] = [(0.0, bound_x), (0.0, bound_z)]
        s_x0, s_x1, s_z1, v_z1 = 0.0, max(0.0, n_x - bound_x), max(0.0, n_z - bound_z), m_z
    else:
        s_x0, s_x1, s_z1, v_z1 = 0.0, n_x, n_z, m_z
    if s_x1 <= 0 or s_z1 <= 0:
        ratio, phase = 0.5, 0.5
    else:
        ratio = min(0.5, v_z1 / s_z1)
        phase = ratio + (gamma(eps, ratio, s_z1, s_x1) if finite else 0.0)
    return Estimates(
        mode=proto.mode,
        qber_z=qber_z,
        s_x0=s_x0,
        s_x1=s_x1,
        s_z1=s_z1,
        v_z1=v_z1,
        phase_error=min(0.5, phase),
        epsilon=budget,
        pa_bits=6.0 * math.log2(1.0 / eps) if finite else 0.0,
        correctness_bits=math.log2(2.0 / eps_cor) if finite else 0.0,
        intervals=intervals,
    )


# -- expected rates of a link ------------------------------------------------------------


def _expected_counts(model: LinkModel, pulses: float) -> BlockCounts:
    return BlockCounts(
        round(pulses),
        tuple(pulses * v for v in model.n_x),
        tuple(pulses * v for v in model.n_z),
        tuple(pulses * v for v in model.m_z),
    )


def expected_estimates(
    link: Bb84Parameters, pulses: float, *, eps_sec: float = 1e-10, finite: bool = True
) -> tuple[Estimates, float]:
    """(bounds, X-basis detections) of a block of ``pulses`` pulses with expected counts."""
    model = link_model(link)
    counts = _expected_counts(model, pulses)
    return estimate(Protocol.of(link, eps_sec), counts, finite=finite), sum(counts.n_x)


def finite_secret_key_rate(
    link: Bb84Parameters, detections: float, *, ec_efficiency: float = 1.1, eps_sec: float = 1e-10
) -> float:
    """Secret bits per second of blocks of ``detections`` expected clicks, with error
    correction leaking ``f h(E_X)`` per X-basis bit (f = ``ec_efficiency``)."""
    model = link_model(link)
    pulses = detections / model.clicks
    bounds, n_x = expected_estimates(link, pulses, eps_sec=eps_sec)
    leak = ec_efficiency * n_x * binary_entropy(model.qber_x)
    return max(0, bounds.key_length(leak)) / pulses * link.pulse_rate


def asymptotic_secret_key_rate(link: Bb84Parameters, ec_efficiency: float = 1.1) -> float:
    """Secret bits per second for blocks without bound (same protocol and intensities)."""
    model = link_model(link)
    pulses = 1e15
    bounds, n_x = expected_estimates(link, pulses, finite=False)
    leak = ec_efficiency * n_x * binary_entropy(model.qber_x)
    length = bounds.s_x0 + bounds.s_x1 * (1 - binary_entropy(bounds.phase_error)) - leak
    return max(0.0, length) / pulses * link.pulse_rate
