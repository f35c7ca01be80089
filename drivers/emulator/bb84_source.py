"""``Bb84KeySource``: a ``KeySource`` whose keys come out of a simulated BB84 link.

Each block: simulate the clicks of enough pulses for ``block_detections`` expected clicks
(``physics.simulate_block``), then run the post-processing with Alice and Bob as two separate
parties that share nothing but the classical messages (``postprocessing``): Bob drives
through a channel, Alice answers. Both derive their final keys from their own noisy strings;
the keys are handed out only if both ends' keys are identical (they are unless the 2^-64
verification collision happens, counted as a failed block). The block's report also gets
what only the simulation knows (``truth``: how many key bits came from vacuum, single- and
multi-photon pulses, and how many a photon-number-splitting eavesdropper holds), which the
post-processing never sees.

The heavy work runs in a worker thread (``trio.to_thread.run_sync``) so the emulator's event
loop keeps serving the serial links. With ``rate_bits_per_s`` the source hands out keys no
faster than that many final-key bits per second (it sleeps between blocks), otherwise as
fast as the CPU allows.
"""

from __future__ import annotations

import collections
import hmac
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import trio

from .bitarrays import binary_entropy
from .finite_key import BlockCounts, Protocol, estimate
from .physics import Bb84Parameters, DetectionBlock, link_model, simulate_block
from .postprocessing import (
    AliceSession,
    BlockReport,
    InMemoryChannel,
    PostProcessingParameters,
    bob_postprocess,
)

__all__ = ["BlockResult", "Bb84KeySource", "RunningTotals"]

#: Expected clicks per block: ~1.1 Mbit of X-basis key material. The finite-key bounds
#: (Hoeffding deviations of the decoy counts) cost ~23 % of the asymptotic key at this
#: size and ~40 % at 200 000 clicks; a block still takes well under a second of work.
DEFAULT_BLOCK_DETECTIONS = 2_000_000


@dataclass
class RunningTotals:
    """Sums over every block since the source started."""

    blocks: int = 0
    aborted_blocks: int = 0
    pulses: int = 0
    simulated_seconds: float = 0.0
    detections: int = 0
    sifted_bits: int = 0
    disclosed_bits: int = 0
    final_bits: int = 0
    wall_seconds: float = 0.0
    timings: dict[str, float] = field(
        default_factory=lambda: {
            "simulation": 0.0,
            "sifting": 0.0,
            "ec": 0.0,
            "verify": 0.0,
            "pa": 0.0,
        }
    )

    def add(self, report: BlockReport, wall: float, timings: dict[str, float]) -> None:
        self.blocks += 1
        self.aborted_blocks += report.aborted is not None
        self.pulses += report.pulses
        self.simulated_seconds += report.simulated_seconds
        self.detections += report.detections
        self.sifted_bits += report.sifted_bits
        self.disclosed_bits += report.disclosed_bits
        self.final_bits += report.final_bits
        self.wall_seconds += wall
        for name, seconds in timings.items():
            self.timings[name] = self.timings.get(name, 0.0) + seconds

    @property
    def secret_key_rate(self) -> float:
        """Final bits per simulated second."""
        return self.final_bits / self.simulated_seconds if self.simulated_seconds else 0.0

    @property
    def throughput(self) -> float:
        """Final bits per second of computation."""
        return self.final_bits / self.wall_seconds if self.wall_seconds else 0.0

    def as_dict(self) -> dict[str, object]:
        out = dict(self.__dict__)
        out["timings"] = dict(self.timings)
        out["secret_key_rate"] = self.secret_key_rate
        out["throughput_bits_per_s"] = self.throughput
        return out


@dataclass
class BlockResult:
    """One block's report, each end's keys, and where the time went."""

    report: BlockReport
    alice_keys: list[tuple[bytes, bytes]] = field(repr=False)
    bob_keys: list[tuple[bytes, bytes]] = field(repr=False)
    timings: dict[str, float]
    alice_report: BlockReport | None = None

    @property
    def keys_match(self) -> bool:
        a = b"".join(i + m for i, m in self.alice_keys)
        b = b"".join(i + m for i, m in self.bob_keys)
        return hmac.compare_digest(a, b)


class Bb84KeySource:
    """Keys from a simulated BB84 link (satisfies ``key_source.KeySource``)."""

    qber: float | None

    def __init__(
        self,
        link: Bb84Parameters | None = None,
        post: PostProcessingParameters | None = None,
        *,
        block_detections: int = DEFAULT_BLOCK_DETECTIONS,
        rate_bits_per_s: float | None = None,
        rng: random.Random | None = None,
        on_block: Callable[[BlockResult], None] | None = None,
        truth: bool = False,
    ) -> None:
        if block_detections < 1000:
            raise ValueError("a block needs at least 1000 expected clicks")
        if rate_bits_per_s is not None and not rate_bits_per_s > 0:
            raise ValueError("key rate limit must be positive (omit it for unpaced keys)")
        self.link = link or Bb84Parameters()
        self.post = post or PostProcessingParameters()
        # Pulses per block for the requested expected click count (dead time included).
        self.block_pulses = max(1, math.ceil(block_detections / link_model(self.link).clicks))
        self.rate_bits_per_s = rate_bits_per_s
        # The physics randomness decides Alice's bits: system randomness unless a test
        # passes a seeded generator for reproducibility.
        self.rng = rng or random.SystemRandom()
        self.on_block = on_block
        # Reports carry what only the simulation knows (photon numbers, Eve's knowledge):
        # on request, and always under a PNS attack, where it is the point of the run.
        self.truth = truth or self.link.pns_attack
        self.qber = None
        self.totals = RunningTotals()
        self._pending: collections.deque[tuple[bytes, bytes]] = collections.deque()
        self._paced_since: float | None = None
        self._paced_bits = 0

    def __repr__(self) -> str:
        return f"Bb84KeySource(link={self.link!r}, totals={self.totals!r})"

    def run_block(self) -> BlockResult:
        """Simulate and post-process one block (synchronous, CPU bound)."""
        started = time.perf_counter()
        block = simulate_block(self.link, self.block_pulses, self.rng, truth=self.truth)
        simulated = time.perf_counter() - started
        alice = AliceSession(block.alice, self.post, self.link, block.decoy)
        timings: dict[str, float] = {}
        bob = bob_postprocess(
            block.bob, InMemoryChannel(alice), self.post, self.link, block.decoy, timings=timings
        )
        timings = {"simulation": simulated, **timings}
        report = bob.report
        report.pulses, report.simulated_seconds = block.pulses, block.simulated_seconds
        if self.truth:
            report.truth = block_truth(block)
        if self.link.pns_attack:
            report.pns = pns_exposure(report, self.post.eps_sec)
        alice_keys = alice.outcome.keys if alice.outcome is not None else []
        result = BlockResult(report, alice_keys, bob.keys, timings, alice.report)
        if not result.keys_match:
            report.aborted = "the two ends' keys differ (verification hash collision)"
            report.final_bits = 0
            result.alice_keys, result.bob_keys = [], []
        if report.qber_estimate is not None:
            self.qber = report.qber_estimate
        self.totals.add(report, time.perf_counter() - started, timings)
        if self.on_block is not None:
            self.on_block(result)
        return result

    async def next_block(self, max_keys: int) -> list[tuple[bytes, bytes]]:
        """Between 1 and ``max_keys`` keys; waits (in a thread) for blocks that yield keys."""
        while not self._pending:
            result = await trio.to_thread.run_sync(self.run_block)
            self._pending.extend(result.alice_keys)
        keys = [self._pending.popleft() for _ in range(min(max(1, max_keys), len(self._pending)))]
        if self.rate_bits_per_s is not None:
            await self._pace(sum(len(m) * 8 for _, m in keys))
        return keys

    async def _pace(self, bits: int) -> None:
        now = trio.current_time()
        if self._paced_since is None:
            self._paced_since = now
        self._paced_bits += bits
        assert self.rate_bits_per_s is not None
        await trio.sleep_until(self._paced_since + self._paced_bits / self.rate_bits_per_s)


def block_truth(block: DetectionBlock) -> dict[str, int]:
    """What only the simulation knows about the block's X-basis key bits."""
    if block.truth is None:
        return {}
    a = np.frombuffer(block.alice.bases, np.uint8)
    b = np.frombuffer(block.bob.bases, np.uint8)
    x = (a | b) == 0
    photons = np.bincount(np.frombuffer(block.truth.photons, np.uint8)[x], minlength=3)
    return {
        "vacuum_x": int(photons[0]),
        "single_photon_x": int(photons[1]),
        "multi_photon_x": int(photons[2:].sum()),
        "eve_known_x": int(np.count_nonzero(np.frombuffer(block.truth.eve_knows, np.uint8)[x])),
        "afterpulses": block.truth.afterpulses,
        "double_clicks": block.truth.double_clicks,
    }


def pns_exposure(report: BlockReport, eps_sec: float) -> dict[str, int]:
    """Under a photon-number-splitting attack: the key bits Eve holds, against the key a
    single-photon bound (every click one photon, what a laser without decoy states would
    claim) would keep from the same block."""
    counts = report.counts
    if not counts.get("m_z") or report.truth is None:
        return {}
    total = BlockCounts(
        report.pulses,
        (sum(counts["n_x"]),),
        (sum(counts["n_z"]),),
        (sum(counts["m_z"]),),
    )
    naive = estimate(Protocol("single-photon", (1.0,), (1.0,), 0.5, eps_sec), total)
    leak = report.ec_disclosed_bits or math.ceil(
        report.kept_bits * 1.1 * binary_entropy(naive.qber_z)
    )
    claimed = max(0, naive.key_length(leak))
    known = report.truth["eve_known_x"]
    unknown = report.kept_bits - known
    return {
        "eve_known_key_bits": known,
        "single_photon_bound_bits": claimed,
        "eve_information_bits": max(0, claimed - max(0, unknown - leak)),
    }
