"""Bob's detectors in the BB84 emulator: what two threshold single-photon detectors report
for one gate, and the gate-to-gate effects (dead time, afterpulsing) that make the click
sequence a renewal process.

One gate. Bob's receiver (active basis choice, one detector per bit value, D0 and D1) sees
photons that reach D0 with probability ``w0`` each and D1 with ``w1`` (the state and the
bases decide ``w``; misalignment moves ``e_mis`` of them to the wrong detector). Each
photon survives the fibre with ``t`` and is detected by Dj with efficiency ``eta_j``
(efficiency mismatch: ``eta_1 = eta_0 (1 - m)``); each detector also fires by itself with
the dark-count probability ``p_dc``. Photons are split independently, so with ``n``
photons::

    P(Dj sees no photon)      = (1 - t w_j eta_j)^n
    P(neither sees a photon)  = (1 - t (w0 eta_0 + w1 eta_1))^n
    P(Dj silent)              = (1 - p_dc) P(Dj sees no photon)
    P(no click)               = (1 - p_dc)^2 P(neither sees a photon)

``gate_patterns`` returns the probabilities of the three click patterns: D0 only, D1 only,
both. A double click is squashed (Bob assigns a random bit, as the security proofs of
Lim et al. 2014 and of the squashing model require) or, with ``double_click="discard"``,
dropped (which is known to open an attack; offered to show the difference).

Gate to gate. After a click the whole receiver is blind for ``d`` gates (dead time, the
same for both detectors: a dead time per detector would tell Eve which one clicked). After
the dead time the detector that clicked fires again with probability ``p_ap`` by itself
(afterpulse: a trapped carrier released), at a gate ``H`` after the end of the dead time
with ``H`` geometric, ``P(H = h) = r (1 - r)^(h-1)``, ``r = 1 - exp(-T_gate / tau_ap)``
(exponential release with time constant ``tau_ap``). Photon and dark clicks happen in each
live gate independently with probability ``Y`` (the mean over intensity classes), so the
gap to the next photon click is geometric, ``G``, with ``P(G = g) = Y (1 - Y)^(g-1)``.
Whichever comes first is the next click (a tie counts as a photon click)::

    gap  = d + min(G, H)   with probability p_ap,   d + G   otherwise
    E[gap] = d + p_ap / (1 - (1 - Y)(1 - r)) + (1 - p_ap) / Y
    afterpulse share of clicks = p_ap r (1 - Y) / (1 - (1 - r)(1 - Y))

so the click rate saturates at one per ``d + 1`` gates. Gaps are independent, which is
what ``renewal_clicks`` draws (vectorised: the cost is per click, not per gate). An
afterpulse lands on whatever pulse Alice sent in that gate, of any intensity class: this
is how afterpulsing inflates the vacuum and decoy yields. The photons of that gate's own
pulse are not simulated (their click would coincide with the afterpulse).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = [
    "ClickTiming",
    "click_timing",
    "gate_patterns",
    "renewal_clicks",
]


def gate_patterns(
    n: int, t: float, w0: float, w1: float, eta0: float, eta1: float, p_dc: float
) -> tuple[float, float, float]:
    """(P(D0 only), P(D1 only), P(both)) for a gate holding ``n`` photons."""
    none0 = (1.0 - t * w0 * eta0) ** n
    none1 = (1.0 - t * w1 * eta1) ** n
    none_both = (1.0 - t * (w0 * eta0 + w1 * eta1)) ** n
    quiet = 1.0 - p_dc
    silent = quiet * quiet * none_both
    only0 = quiet * none1 - silent  # D1 silent minus both silent
    only1 = quiet * none0 - silent
    both = 1.0 - silent - only0 - only1
    return max(0.0, only0), max(0.0, only1), max(0.0, both)


@dataclass(frozen=True)
class ClickTiming:
    """The gate-to-gate process of one receiver (see the module doc)."""

    photon_click_prob: float  # Y: a live gate clicks (photon or dark count)
    dead_gates: int  # d
    afterpulse_prob: float  # p_ap
    release_prob: float  # r, per gate after the dead time

    @property
    def mean_gap(self) -> float:
        y, r, p = self.photon_click_prob, self.release_prob, self.afterpulse_prob
        race = 1.0 / (1.0 - (1.0 - y) * (1.0 - r)) if p > 0 else 0.0
        return self.dead_gates + p * race + (1.0 - p) / y

    @property
    def afterpulse_share(self) -> float:
        y, r, p = self.photon_click_prob, self.release_prob, self.afterpulse_prob
        if p <= 0:
            return 0.0
        return p * r * (1.0 - y) / (1.0 - (1.0 - r) * (1.0 - y))

    @property
    def clicks_per_gate(self) -> float:
        return 1.0 / self.mean_gap


def click_timing(
    photon_click_prob: float,
    dead_time_s: float,
    afterpulse_prob: float,
    afterpulse_time_s: float,
    pulse_rate: float,
) -> ClickTiming:
    """The renewal process for click probability ``Y`` per live gate."""
    dead = max(0, round(dead_time_s * pulse_rate))
    release = -math.expm1(-1.0 / (afterpulse_time_s * pulse_rate)) if afterpulse_time_s else 1.0
    return ClickTiming(photon_click_prob, dead, afterpulse_prob, release)


def _geometric(rng: np.random.Generator, p: float, size: int) -> np.ndarray:
    """Geometric draws on 1, 2, ... by inversion: 1 + floor(ln(1 - U) / ln(1 - p)).

    Single precision halves the cost; its 24-bit uniforms cut the tail at
    ``16.6 / p`` gates, which a geometric exceeds with probability 6e-8.
    """
    if p >= 1.0:
        return np.ones(size, dtype=np.int64)
    scaled = np.log1p(-rng.random(size, dtype=np.float32))
    scaled *= np.float32(1.0 / math.log1p(-p))
    return np.floor(scaled, out=scaled).astype(np.int64) + 1


def renewal_clicks(
    timing: ClickTiming, gates: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """The clicks of ``gates`` gates: (gate index of each click, afterpulse flag).

    Draws the gaps in vectorised chunks until they cover the block; the first click has no
    click before it, so no dead time and no afterpulse either.
    """
    y = timing.photon_click_prob
    chunks_at: list[np.ndarray] = []
    chunks_after: list[np.ndarray] = []
    position = 0  # gate of the last click so far (0: before the first gate)
    first = True
    while True:
        remaining = gates - position
        if remaining <= 0:
            break
        expected = remaining / timing.mean_gap
        size = int(expected + 5.0 * math.sqrt(expected) + 64)
        gap = _geometric(rng, y, size)
        after = np.zeros(size, dtype=bool)
        if timing.afterpulse_prob > 0:
            # Draw release gates only for the clicks that afterpulse at all.
            trapped = np.flatnonzero(rng.random(size, dtype=np.float32) < timing.afterpulse_prob)
            release = _geometric(rng, timing.release_prob, len(trapped))
            first_out = release < gap[trapped]
            won = trapped[first_out]
            after[won] = True
            gap[won] = release[first_out]
        gap += timing.dead_gates
        if first:
            gap[0] -= timing.dead_gates
            after[0] = False
            first = False
        at = position + np.cumsum(gap)
        keep = int(np.searchsorted(at, gates, side="right"))
        chunks_at.append(at[:keep])
        chunks_after.append(after[:keep])
        if keep < size:
            break
        position = int(at[-1])
    if not chunks_at:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=bool)
    if len(chunks_at) == 1:  # the usual case: no copy
        return chunks_at[0], chunks_after[0]
    return np.concatenate(chunks_at), np.concatenate(chunks_after)
