"""Cascade error correction (Brassard and Salvail, 1993) between Alice, who answers parity
questions, and Bob, who asks them and corrects his string; every parity Alice discloses is
counted, and only those.

Roles. ``CascadeAlice`` is a sans-IO responder: ``handle(request) -> reply`` on byte
strings. ``cascade_bob`` drives the protocol through a ``request(bytes) -> bytes`` callable,
so the same code runs over an in-memory call or a TCP connection.

Parameters. ``passes`` passes (4 by default); pass t splits the (permuted) string into
blocks of ``k_t = k_1 * 2^t`` bits with ``k_1 = 2^round(log2(0.73 / Q))`` (the classic
``k_1 ~ 0.73 / Q`` rounded to a power of two, at least 8) where Q is the estimated QBER.
Power-of-two blocks let each side compute the parities of every aligned sub-block of every
size at once: folding ``F_L = F_{L-1} XOR (F_{L-1} >> 2^(L-1))`` leaves the parity of block
``[s, s + 2^L)`` in bit ``s`` of ``F_L``, a handful of big-int operations per level.

Permutations. Pass 0 uses the identity; pass t >= 1 uses the affine permutation
``position q of the pass -> bit (b_t + a_t q) mod n`` with ``gcd(a_t, n) = 1`` and ``a_t``
near sqrt(n), ``a_t, b_t`` drawn from a seed Bob announces. Applying it is ~sqrt(n) slices
of the byte-per-bit string (C speed, where a shuffled index list would cost a Python step
per bit), and for independent errors it separates the errors of a block as a random
permutation does: two errors meet in a pass-t block only if their distance is congruent to
``a_t`` times a number below ``k_t``.

Protocol. Bob opens with HELLO (n, log2 k_1, passes, seed). For each pass he asks TOP and
Alice replies with the parity of every block of the pass. Bob then runs all binary
searches of odd blocks (Bob's parity differs from Alice's) in lock-step rounds: one
PARITY request per round carries the left halves of every search (Alice's parity of the
right half follows from the parent's, so it costs nothing), and Bob descends into the odd
half. A search ending on one bit flips it. After a flip, in every pass already run, the
smallest block containing that bit whose Alice parity Bob already knows and that is now
odd starts a new search (the "cascade"). A search is re-checked before each step, so a
block made even by another correction is dropped instead of being searched wrongly.
Every parity Bob has learned is cached: asking the same block twice never happens.
``disclosed_bits`` is the number of parity bits in Alice's replies.
"""

from __future__ import annotations

import math
import random
import struct
import sys
from array import array
from collections.abc import Callable
from dataclasses import dataclass

from .bb84 import pack_bits, pack_to_bytes, unpack_from_bytes

__all__ = [
    "CascadeAlice",
    "CascadeError",
    "CascadeLayout",
    "CascadeResult",
    "cascade_bob",
    "initial_block_log2",
]

_HELLO, _TOP, _PARITY = 1, 2, 3
_HELLO_FORMAT = struct.Struct("<BIBB32s")  # kind, n, log2 k1, passes, seed
_TOP_FORMAT = struct.Struct("<BB")  # kind, pass
MAX_PASSES = 16
_LOW_BIT = bytes(i & 1 for i in range(256))


class CascadeError(Exception):
    """A Cascade message is malformed or out of order (a bug or a corrupted channel)."""


def initial_block_log2(qber: float, n: int) -> int:
    """log2 of the first-pass block size: round(log2(0.73 / Q)), at least 3 (8 bits) and
    no more than the string itself."""
    q = max(qber, 1e-4)
    log2_k = max(3, round(math.log2(0.73 / q)))
    return max(3, min(log2_k, max(3, (n - 1).bit_length())))


@dataclass(frozen=True)
class CascadeLayout:
    """Block sizes and permutations of each pass; both ends derive it from HELLO."""

    n: int
    first_log2: int
    passes: int
    seed: bytes

    def __post_init__(self) -> None:
        if self.n < 1 or not 1 <= self.passes <= MAX_PASSES or not 3 <= self.first_log2 <= 28:
            raise CascadeError("Cascade parameters out of range")
        rng = random.Random(self.seed)  # public randomness: both ends derive the same
        perms = [(1, 0)]
        n = self.n
        root = max(1, math.isqrt(n))
        for _ in range(1, self.passes):
            while True:
                a = rng.randrange(max(1, root // 2), 2 * root + 2)
                if math.gcd(a, n) == 1:
                    break
            perms.append((a, rng.randrange(n)))
        object.__setattr__(self, "_perms", perms)
        object.__setattr__(self, "_inverses", [pow(a, -1, n) for a, _ in perms])

    def log2_size(self, t: int) -> int:
        return self.first_log2 + t

    def permutation(self, t: int) -> tuple[int, int]:
        """(a, b): position q of pass t holds bit (b + a q) mod n."""
        return self._perms[t]  # type: ignore[attr-defined]

    def permute(self, t: int, bits: bytes | bytearray) -> bytes:
        a, b = self.permutation(t)
        n = self.n
        if a == 1 and b == 0:
            return bytes(bits)
        view = bytes(bits)
        parts = []
        start, taken = b, 0
        while taken < n:
            part = view[start::a][: n - taken]  # the last slice stops short of b's
            parts.append(part)
            taken += len(part)
            start = start + len(part) * a - n
        return b"".join(parts)

    def inverse(self, t: int, p: int) -> int:
        """Pass-t position of bit p."""
        a, b = self.permutation(t)
        if a == 1 and b == 0:
            return p
        return ((p - b) * self._inverses[t]) % self.n  # type: ignore[attr-defined]

    def forward(self, t: int, q: int) -> int:
        a, b = self.permutation(t)
        return (b + a * q) % self.n


class _PassParities:
    """Parities of every aligned power-of-two block of one pass's permuted string.

    ``levels[L]`` holds, at bit s for s a multiple of 2^L, the parity of [s, s + 2^L).
    """

    def __init__(self, permuted: bytes, top: int) -> None:
        value = pack_bits(permuted)
        size = (len(permuted) >> 3) + 2
        self.levels: list[bytearray] = [bytearray(value.to_bytes(size, "little"))]
        for level in range(1, top + 1):
            value ^= value >> (1 << (level - 1))
            self.levels.append(bytearray(value.to_bytes(size, "little")))
        self.top = top
        self.n = len(permuted)

    def parity(self, level: int, start: int) -> int:
        return (self.levels[level][start >> 3] >> (start & 7)) & 1

    def flip(self, q: int) -> None:
        for level, arr in enumerate(self.levels):
            s = (q >> level) << level
            arr[s >> 3] ^= 1 << (s & 7)

    def top_parities(self) -> bytes:
        """Parity of each top block, one byte per block (top >= 3: bytes are aligned)."""
        blocks = -(-self.n >> self.top) if self.n else 0
        step = 1 << (self.top - 3)
        return bytes(self.levels[self.top][: blocks * step : step]).translate(_LOW_BIT)


def _encode_keys(keys: array) -> bytes:
    if sys.byteorder == "big":
        keys = array("Q", keys)
        keys.byteswap()
    return keys.tobytes()


def _decode_keys(data: bytes) -> array:
    if len(data) % 8:
        raise CascadeError("parity request length is not a multiple of 8")
    keys = array("Q")
    keys.frombytes(data)
    if sys.byteorder == "big":
        keys.byteswap()
    return keys


# A parity question names one block: start << 10 | pass << 5 | level.
def _key(t: int, level: int, start: int) -> int:
    return (start << 10) | (t << 5) | level


class CascadeAlice:
    """Alice's side: holds her string and answers parity questions about it."""

    def __init__(self, bits: bytes) -> None:
        self._bits = bytes(bits)
        self._layout: CascadeLayout | None = None
        self._passes: list[_PassParities] = []
        self.disclosed_bits = 0

    def __repr__(self) -> str:
        return f"CascadeAlice(n={len(self._bits)}, disclosed={self.disclosed_bits})"

    def handle(self, request: bytes) -> bytes:
        if not request:
            raise CascadeError("empty Cascade message")
        kind = request[0]
        if kind == _HELLO:
            return self._hello(request)
        if self._layout is None:
            raise CascadeError("Cascade message before HELLO")
        if kind == _TOP:
            return self._top(request)
        if kind == _PARITY:
            return self._parity(request[1:])
        raise CascadeError(f"unknown Cascade message kind {kind}")

    def _hello(self, request: bytes) -> bytes:
        if len(request) != _HELLO_FORMAT.size:
            raise CascadeError("malformed Cascade HELLO")
        _, n, first_log2, passes, seed = _HELLO_FORMAT.unpack(request)
        if n != len(self._bits):
            raise CascadeError(f"Bob corrects {n} bits but Alice holds {len(self._bits)}")
        self._layout = CascadeLayout(n, first_log2, passes, seed)
        self._passes = []
        return b"\x01"

    def _top(self, request: bytes) -> bytes:
        assert self._layout is not None
        if len(request) != _TOP_FORMAT.size:
            raise CascadeError("malformed Cascade TOP")
        t = request[1]
        if t != len(self._passes) or t >= self._layout.passes:
            raise CascadeError(f"Cascade pass {t} requested out of order")
        layout = self._layout
        parities = _PassParities(layout.permute(t, self._bits), layout.log2_size(t))
        self._passes.append(parities)
        top = parities.top_parities()
        self.disclosed_bits += len(top)
        return pack_to_bytes(top)

    def _parity(self, body: bytes) -> bytes:
        keys = _decode_keys(body)
        passes = self._passes
        out = bytearray(len(keys))
        try:
            for i, key in enumerate(keys):
                level, t, start = key & 31, (key >> 5) & 31, key >> 10
                p = passes[t]
                if level > p.top or start >= p.n or start & ((1 << level) - 1):
                    raise CascadeError("parity requested for a block that does not exist")
                out[i] = p.parity(level, start)
        except IndexError:
            raise CascadeError("parity requested for a pass not yet run") from None
        self.disclosed_bits += len(keys)
        return pack_to_bytes(bytes(out))


@dataclass(frozen=True)
class CascadeResult:
    corrected: bytes = b""  # Bob's string after correction
    disclosed_bits: int = 0  # parity bits Alice sent
    corrections: int = 0  # bits Bob flipped
    rounds: int = 0  # request/reply round trips

    def __repr__(self) -> str:
        return (
            f"CascadeResult(n={len(self.corrected)}, disclosed_bits={self.disclosed_bits}, "
            f"corrections={self.corrections}, rounds={self.rounds})"
        )


def cascade_bob(
    bits: bytes,
    qber: float,
    request: Callable[[bytes], bytes],
    *,
    passes: int = 4,
    seed: bytes,
) -> CascadeResult:
    """Correct Bob's ``bits`` towards Alice's by asking her parities through ``request``."""
    n = len(bits)
    layout = CascadeLayout(n, initial_block_log2(qber, n), passes, seed)
    rounds = 1
    if request(_HELLO_FORMAT.pack(_HELLO, n, layout.first_log2, passes, seed)) != b"\x01":
        raise CascadeError("Alice did not accept Cascade HELLO")
    bob = bytearray(bits)
    disclosed = corrections = 0
    runs: list[_PassParities] = []
    inverses = [pow(layout.permutation(t)[0], -1, n) for t in range(passes)]
    tops: list[bytes] = []  # Alice's top-block parities per pass, one byte per block
    known: list[dict[int, int]] = []  # Alice's parity of smaller blocks: start << 5 | level
    # Searches in flight: (pass, level, start) -> Alice's parity of that block.
    searches: dict[tuple[int, int, int], int] = {}

    def on_flip(p: int) -> None:
        """Bob flipped bit p: update every pass and queue the searches it makes odd."""
        for t, run in enumerate(runs):
            a_t, b_t = layout.permutation(t)
            q = p if t == 0 else ((p - b_t) * inverses[t]) % n
            kt, top_level, found = known[t], run.top, False
            for level, arr in enumerate(run.levels):
                s = (q >> level) << level
                byte, bit = s >> 3, 1 << (s & 7)
                arr[byte] ^= bit
                if found:
                    continue  # keep flipping the parities of the larger blocks
                known_a = tops[t][s >> level] if level == top_level else kt.get((s << 5) | level)
                if known_a is None:
                    continue
                a = known_a
                if a != bool(arr[byte] & bit):
                    found = True
                    if level == 0:  # a known single bit that differs: fix it at once
                        pending_flips.append((t, s, a))
                    else:
                        searches[(t, level, s)] = a

    # Single bits found wrong: (pass, position, Alice's bit). Re-checked when popped, as
    # two passes may name the same bit.
    pending_flips: list[tuple[int, int, int]] = []

    def flip(t: int, q: int, a: int) -> None:
        nonlocal corrections
        pending_flips.append((t, q, a))
        while pending_flips:
            t, q, a = pending_flips.pop()
            if runs[t].parity(0, q) == a:
                continue
            p = layout.forward(t, q)
            bob[p] ^= 1
            corrections += 1
            on_flip(p)

    for t in range(passes):
        run = _PassParities(layout.permute(t, bob), layout.log2_size(t))
        runs.append(run)
        known.append({})
        n_top = -(-n >> run.top)
        reply = request(_TOP_FORMAT.pack(_TOP, t))
        rounds += 1
        top = unpack_from_bytes(reply, n_top)
        tops.append(top)
        disclosed += n_top
        mine = run.top_parities()
        diff = (int.from_bytes(top, "little") ^ int.from_bytes(mine, "little")).to_bytes(
            n_top, "little"
        )
        pos = diff.find(1)
        while pos >= 0:
            searches[(t, run.top, pos << run.top)] = top[pos]
            pos = diff.find(1, pos + 1)

        while searches:
            # Drop searches whose block is no longer odd, then ask for the left halves.
            # (Parities are read inline: this loop is the hot path.)
            current = [
                (key, a)
                for key, a in searches.items()
                if a != (runs[key[0]].levels[key[1]][key[2] >> 3] >> (key[2] & 7)) & 1
            ]
            searches = {}
            asks = array("Q")
            for (u, level, s), _ in current:
                if ((s << 5) | (level - 1)) not in known[u]:
                    asks.append(_key(u, level - 1, s))
            if asks:
                reply = request(bytes([_PARITY]) + _encode_keys(asks))
                rounds += 1
                answers = unpack_from_bytes(reply, len(asks))
                disclosed += len(asks)
                for key, bit in zip(asks, answers, strict=True):
                    known[(key >> 5) & 31][((key >> 10) << 5) | (key & 31)] = bit
            for (u, level, s), a in current:
                levels = runs[u].levels
                if a == (levels[level][s >> 3] >> (s & 7)) & 1:
                    continue  # made even by a correction earlier in this round
                half = level - 1
                ku = known[u]
                left = ku[(s << 5) | half]
                if left != (levels[half][s >> 3] >> (s & 7)) & 1:
                    child, child_a = s, left
                else:
                    child, child_a = s + (1 << half), a ^ left
                    if child >= n:  # cannot happen: padding has no errors
                        raise CascadeError("Cascade search left the string")
                    ku[(child << 5) | half] = child_a
                if half == 0:
                    flip(u, child, child_a)
                else:
                    searches[(u, half, child)] = child_a
    return CascadeResult(bytes(bob), disclosed, corrections, rounds)
