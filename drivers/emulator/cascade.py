"""Cascade error correction (Brassard and Salvail, 1993) between Alice, who answers parity
questions, and Bob, who asks them and corrects his string; every parity Alice discloses is
counted, and only those.

Roles. ``CascadeAlice`` is a sans-IO responder: ``handle(request) -> reply`` on byte
strings. ``cascade_bob`` drives the protocol through a ``request(bytes) -> bytes`` callable,
so the same code runs over an in-memory call or a TCP connection.

Block schedule ("Cascade opt. (8)" of Martinez-Mateo, Pacher, Peev, Ciurana and Martin,
"Demystifying the information reconciliation protocol Cascade", QIC 15, 453 (2015)), from
the estimated QBER Q with ``a = log2(1 / Q) - 1/2``::

    k_1 = 2^ceil(a),  k_2 = 2^ceil((a + 12) / 2),  k_3 = 4096,  k_t = n / 2 for t >= 4

and 14 passes, with sub-block reuse: every parity Bob has learned (asked, or implied as
parent XOR left half) is kept, and a search never asks for a block whose parity it knows.
Its leak is within ~10 % of the Shannon limit ``n h(Q)`` up to 10 % QBER, where the
original schedule (``k_1 = 0.73 / Q``, doubling, 4 passes) leaks ~20 % more.

Layout of each pass. Pass 0 keeps the string's order, blocks of ``k_1`` in a row. Passes 1
and 2 read the string in a fixed pseudo-random order (a permutation of ``0 .. 2^L - 1``
drawn once from SHAKE-256 of a constant label, restricted to ``0 .. n - 1``; errors are
independent of it, so it needs no fresh randomness) and cut it into blocks of ``k_t``.
Every later pass splits the string in two halves by a random mask (bit p is in half
``mask[p]``) drawn from SHAKE-256 of the 32-byte seed Bob announces; a sub-block of a half
is that half's bits within a range of string positions.

Protocol. HELLO (n, passes, QBER in parts per million, seed), then for each pass TOP
(Alice replies with the parity of every top block of the pass) and PARITY requests: a list
of 64-bit block names ``(2 t + h) << 58 | start << 29 | end`` (pass t, half h of a split
pass, range [start, end) of the pass's order or, for a split pass, of string positions),
one parity bit each in the reply. Bob keeps, for every pass, which top blocks are odd (his
parity differs from Alice's); a flip toggles the block holding that bit in every pass.
While any block is odd he bisects all odd blocks of all passes at once against his string
as it stands (one PARITY request per level for every search), flips the bits the searches
end on (each distinct bit once), and starts over. Before the last pass he opens the next
pass once fewer than a tenth of the current pass's searches remain: the long tail of lone
cascade chains would otherwise cost a round trip per level each, and runs on beside the
next pass's searches. Bisection splits ``[s, e)`` at ``s + ceil((e - s) / 2)``; Alice's
parity of the right half is the parent's XOR the left's.

Vectorised: Alice holds prefix XORs of her string in each ordered pass's order and the
halves of split passes packed in 64-bit words, so a parity is two lookups or one XOR
reduction. Bob keeps his bits in each ordered pass's order (following his flips), prefix
XORs along the rows of the blocks he searches, and every parity he has learned in a dense
array by block and position in the block's bisection tree; his searches advance
together, a few array operations per level.
"""

from __future__ import annotations

import functools
import hashlib
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "CascadeAlice",
    "CascadeError",
    "CascadeLayout",
    "CascadeResult",
    "block_schedule",
    "cascade_bob",
]

_HELLO, _TOP, _PARITY = 1, 2, 3
_HELLO_FORMAT = struct.Struct("<BIBI32s")  # kind, n, passes, QBER ppm, seed
_TOP_FORMAT = struct.Struct("<BB")  # kind, pass
MAX_PASSES = 31
DEFAULT_PASSES = 14
#: Move on to the next pass once fewer than 1 / _MOVE_ON of a pass's searches remain.
_MOVE_ON = 10
#: Positions fit 29 bits in a block name.
MAX_BITS = (1 << 29) - 1
_FIELD = np.uint64(MAX_BITS)
_U58, _U29 = np.uint64(58), np.uint64(29)


class CascadeError(Exception):
    """A Cascade message is malformed or out of order (a bug or a corrupted channel)."""


def block_schedule(qber: float, n: int, passes: int) -> list[int]:
    """Top-block size of each pass; 0 marks a pass split in two random halves."""
    q = min(max(qber, 1e-5), 0.25)
    a = math.log2(1.0 / q) - 0.5
    sizes = [2 ** math.ceil(a), 2 ** math.ceil((a + 12.0) / 2.0), 4096]
    sizes = [max(1, min(k, n)) for k in sizes]
    return (sizes + [0] * passes)[:passes]


#: Ordered passes read a string padded with zeros to a multiple of this, so one fixed
#: permutation serves every block length in a range (the padding is known to be zero).
_PAD = 1 << 16


@functools.lru_cache(maxsize=4)
def _order(t: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(order, inverse): a fixed pseudo-random permutation of 0 .. size - 1 for pass t;
    position q of the pass holds bit order[q]."""
    label = b"qkdd cascade order %d %d" % (t, size)
    keys = np.frombuffer(hashlib.shake_256(label).digest(4 * size), dtype="<u4")
    order = np.argsort(keys, kind="stable").astype(np.int32)
    inverse = np.empty(size, dtype=np.int32)
    inverse[order] = np.arange(size, dtype=np.int32)
    return order, inverse


def _padded(n: int) -> int:
    return -(-n // _PAD) * _PAD


def _words(bits: np.ndarray) -> np.ndarray:
    """Bits packed little-endian into 64-bit words (zero padded)."""
    packed = np.packbits(bits, bitorder="little")
    pad = -len(packed) % 8
    if pad:
        packed = np.concatenate([packed, np.zeros(pad, dtype=np.uint8)])
    return packed.view("<u8")


def _range_parity(words: np.ndarray, lo: int, hi: int) -> int:
    """Parity of bits lo .. hi - 1 of ``words``."""
    wl, wh = lo >> 6, hi >> 6
    head = ~np.uint64(0) << np.uint64(lo & 63)
    tail = (np.uint64(1) << np.uint64(hi & 63)) - np.uint64(1)
    if wl == wh:
        return int(words[wl] & head & tail).bit_count() & 1
    acc = int(words[wl] & head) ^ int(np.bitwise_xor.reduce(words[wl + 1 : wh]))
    if hi & 63:
        acc ^= int(words[wh] & tail)
    return acc.bit_count() & 1


def _pack(bits: np.ndarray) -> bytes:
    return np.packbits(bits, bitorder="little").tobytes()


def _unpack(data: bytes, n: int) -> np.ndarray:
    if len(data) != (n + 7) // 8:
        raise CascadeError(f"expected {(n + 7) // 8} bytes for {n} parities, got {len(data)}")
    return np.unpackbits(np.frombuffer(data, np.uint8), count=n, bitorder="little")


def _prefix(bits: np.ndarray) -> np.ndarray:
    """P[i] = XOR of bits[:i] (length n + 1)."""
    out = np.zeros(len(bits) + 1, dtype=np.uint8)
    np.bitwise_xor.accumulate(bits, out=out[1:])
    return out


def _names(code: np.ndarray | int, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    code = np.asarray(code, dtype=np.uint64)
    return (code << _U58) | (starts.astype(np.uint64) << _U29) | ends.astype(np.uint64)


@dataclass(frozen=True)
class CascadeLayout:
    """Block sizes, orders and masks of each pass; both ends derive it from HELLO."""

    n: int
    passes: int
    qber_ppm: int
    seed: bytes
    sizes: list[int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not 1 <= self.n <= MAX_BITS or not 1 <= self.passes <= MAX_PASSES:
            raise CascadeError("Cascade parameters out of range")
        if not 0 <= self.qber_ppm <= 500_000 or len(self.seed) != 32:
            raise CascadeError("Cascade QBER or seed out of range")
        sizes = block_schedule(self.qber_ppm / 1e6, self.n, self.passes)
        if self.n < 2:  # nothing to split
            sizes = [1] * self.passes
        object.__setattr__(self, "sizes", sizes)

    def is_split(self, t: int) -> bool:
        return self.sizes[t] == 0

    @property
    def padded(self) -> int:
        """Length of the (zero padded) string that passes 1 and 2 permute."""
        return _padded(self.n)

    def order(self, t: int) -> tuple[np.ndarray, np.ndarray] | None:
        """(order, inverse) of an ordered pass over the padded string, None for pass 0
        (the string's order, no padding)."""
        return None if t == 0 else _order(t, self.padded)

    def permuted(self, t: int, bits: np.ndarray) -> np.ndarray:
        """``bits`` in the order of ordered pass t (padded with zeros for t > 0)."""
        ordered = self.order(t)
        if ordered is None:
            return bits
        padded = np.zeros(self.padded, dtype=np.uint8)
        padded[: self.n] = bits
        return padded[ordered[0]]

    def mask(self, t: int) -> np.ndarray:
        """Split pass t: the half of each bit, packed in 64-bit words."""
        raw = hashlib.shake_256(self.seed + b"split%d" % t).digest((self.n + 7) // 8)
        bits = np.unpackbits(np.frombuffer(raw, np.uint8), count=self.n, bitorder="little")
        return _words(bits)

    def starts(self, t: int) -> np.ndarray:
        """Start of every top block of ordered pass t, then its end."""
        if t == 0:
            return np.append(np.arange(0, self.n, self.sizes[t], dtype=np.int64), self.n)
        # Blocks of k_t real bits on average: the padding is spread through the order.
        step = max(1, round(self.sizes[t] * self.padded / self.n))
        return np.append(np.arange(0, self.padded, step, dtype=np.int64), self.padded)


def _half_of(mask: np.ndarray, bits: np.ndarray) -> np.ndarray:
    return ((mask[bits >> 6] >> (bits & 63).astype(np.uint64)) & np.uint64(1)).astype(np.int64)


class CascadeAlice:
    """Alice's side: holds her string and answers parity questions about it."""

    def __init__(self, bits: bytes) -> None:
        self._bits = np.frombuffer(bytes(bits), dtype=np.uint8)
        self._layout: CascadeLayout | None = None
        self._ran = 0
        self._prefixes: list[np.ndarray | None] = []
        self._halves: list[tuple[np.ndarray, np.ndarray] | None] = []
        self._words: np.ndarray | None = None  # the string packed, for split passes
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
        _, n, passes, qber_ppm, seed = _HELLO_FORMAT.unpack(request)
        if n != len(self._bits):
            raise CascadeError(f"Bob corrects {n} bits but Alice holds {len(self._bits)}")
        self._layout = CascadeLayout(n, passes, qber_ppm, seed)
        self._ran, self._prefixes, self._halves = 0, [], []
        return b"\x01"

    def _top(self, request: bytes) -> bytes:
        layout = self._layout
        assert layout is not None
        if len(request) != _TOP_FORMAT.size:
            raise CascadeError("malformed Cascade TOP")
        t = request[1]
        if t != self._ran or t >= layout.passes:
            raise CascadeError(f"Cascade pass {t} requested out of order")
        self._ran += 1
        if layout.is_split(t):
            if self._words is None:
                self._words = _words(self._bits)
            words, mask = self._words, layout.mask(t)
            halves = (words & ~mask, words & mask)
            self._prefixes.append(None)
            self._halves.append(halves)
            top = np.array([_range_parity(h, 0, layout.n) for h in halves], dtype=np.uint8)
        else:
            prefix = _prefix(layout.permuted(t, self._bits))
            self._prefixes.append(prefix)
            self._halves.append(None)
            starts = layout.starts(t)
            top = prefix[starts[1:]] ^ prefix[starts[:-1]]
        self.disclosed_bits += len(top)
        return _pack(top)

    def _parity(self, body: bytes) -> bytes:
        if len(body) % 8:
            raise CascadeError("parity request length is not a multiple of 8")
        names = np.frombuffer(body, dtype="<u8")
        codes = (names >> _U58).astype(np.int64)
        starts = ((names >> _U29) & _FIELD).astype(np.int64)
        ends = (names & _FIELD).astype(np.int64)
        assert self._layout is not None
        if len(names) and (
            (codes >> 1).max() >= self._ran
            or (starts >= ends).any()
            or ends.max() > self._layout.padded
        ):
            raise CascadeError("parity requested for a block that does not exist")
        out = np.empty(len(names), dtype=np.uint8)
        one_pass = len(codes) and codes.min() == codes.max()
        for code in codes[:1] if one_pass else np.unique(codes):
            sel = slice(None) if one_pass else np.flatnonzero(codes == code)
            t, half = int(code) >> 1, int(code) & 1
            prefix = self._prefixes[t]
            if prefix is not None:
                if half or ends[sel].max() >= len(prefix):
                    raise CascadeError("parity requested for a block that does not exist")
                out[sel] = prefix[ends[sel]] ^ prefix[starts[sel]]
            else:
                halves = self._halves[t]
                assert halves is not None
                if ends[sel].max() > self._layout.n:
                    raise CascadeError("parity requested for a block that does not exist")
                for i in np.arange(len(names))[sel]:
                    out[i] = _range_parity(halves[half], int(starts[i]), int(ends[i]))
        self.disclosed_bits += len(names)
        return _pack(out)


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


class _OrderedPass:
    """Bob's view of pass 0, 1 or 2: his bits in the pass's order (zero padded to whole
    blocks, kept up to date as he flips), which blocks are odd, and every parity of
    Alice's he has learned, by block and heap position in the block's bisection tree
    (root 1, children 2h and 2h + 1; -1 while unknown)."""

    def __init__(self, layout: CascadeLayout, t: int, bob: np.ndarray) -> None:
        self.t = t
        starts = layout.starts(t)
        self.end = int(starts[-1])  # n for pass 0, the padded length after
        self.step = int(starts[1] - starts[0])
        self.blocks = len(starts) - 1
        ordered = layout.order(t)
        self.order = None if ordered is None else ordered[0]
        self.inverse = None if ordered is None else ordered[1]
        self.bits = np.zeros(self.blocks * self.step, dtype=np.uint8)
        self.bits[: self.end] = layout.permuted(t, bob)
        self.heap = 1 << (max(0, (self.step - 1).bit_length()) + 1)
        self.known = np.full(self.blocks * self.heap, -1, dtype=np.int8)
        self.odd = np.zeros(self.blocks, dtype=bool)

    def top_parities(self) -> np.ndarray:
        return np.bitwise_xor.reduce(self.bits.reshape(self.blocks, self.step), axis=1)

    def flip(self, bits: np.ndarray) -> None:
        """Bob flipped these string positions: follow them here."""
        q = bits if self.inverse is None else self.inverse[bits]
        self.bits[q] ^= 1
        toggled, times = np.unique(q // self.step, return_counts=True)
        self.odd[toggled[(times & 1) == 1]] ^= True


class _SplitPass:
    """Bob's view of a pass split in two random halves; learned parities by
    (half, heap position) in a dict (these passes have few searches)."""

    def __init__(self, layout: CascadeLayout, t: int) -> None:
        self.t = t
        self.mask = layout.mask(t)
        self.known: dict[tuple[int, int], int] = {}
        self.odd = np.zeros(2, dtype=bool)

    def flip(self, bits: np.ndarray) -> None:
        toggled, times = np.unique(_half_of(self.mask, bits), return_counts=True)
        self.odd[toggled[(times & 1) == 1]] ^= True


def cascade_bob(
    bits: bytes,
    qber: float,
    request: Callable[[bytes], bytes],
    *,
    passes: int = DEFAULT_PASSES,
    seed: bytes,
) -> CascadeResult:
    """Correct Bob's ``bits`` towards Alice's by asking her parities through ``request``."""
    n = len(bits)
    qber_ppm = min(500_000, max(0, round(qber * 1e6)))
    layout = CascadeLayout(n, passes, qber_ppm, seed)
    if request(_HELLO_FORMAT.pack(_HELLO, n, passes, qber_ppm, seed)) != b"\x01":
        raise CascadeError("Alice did not accept Cascade HELLO")
    rounds = 1
    bob = np.frombuffer(bytes(bits), dtype=np.uint8).copy()
    disclosed = corrections = 0
    runs: list[_OrderedPass | _SplitPass] = []

    for t in range(passes):
        run: _OrderedPass | _SplitPass
        if layout.is_split(t):
            run = _SplitPass(layout, t)
            words = _words(bob)
            mine = np.array(
                [_range_parity(words & ~run.mask, 0, n), _range_parity(words & run.mask, 0, n)],
                dtype=np.uint8,
            )
        else:
            run = _OrderedPass(layout, t, bob)
            mine = run.top_parities()
        runs.append(run)
        reply = request(_TOP_FORMAT.pack(_TOP, t))
        rounds += 1
        alice_top = _unpack(reply, len(mine))
        disclosed += len(mine)
        run.odd = mine != alice_top
        if isinstance(run, _SplitPass):
            run.known.update({(half, 1): int(alice_top[half]) for half in (0, 1)})
        else:
            run.known[np.arange(run.blocks) * run.heap + 1] = alice_top
        # Search until every block is even; before the last pass, move on once few
        # searches remain (each cascade step waits for the one before it: a long tail of
        # lone chains costs round trips, and the next pass starts new chains beside them).
        started = sum(int(r.odd.sum()) for r in runs)
        while (pending := sum(int(r.odd.sum()) for r in runs)) and (
            t == passes - 1 or pending * _MOVE_ON > started
        ):
            found, asked, steps = _search_odd_blocks(runs, bob, request)
            disclosed += asked
            rounds += steps
            found = np.unique(found)
            bob[found] ^= 1
            corrections += len(found)
            for r in runs:
                r.flip(found)
    return CascadeResult(bob.tobytes(), disclosed, corrections, rounds)


class _Searches:
    """The bisections running in one pass: block, range [s, e) in the pass's order (or,
    split, of string positions), heap position, Alice's parity of the range."""

    def __init__(self, run: _OrderedPass | _SplitPass, bob: np.ndarray) -> None:
        self.run = run
        blocks = np.flatnonzero(run.odd)
        self.block = blocks
        self.h = np.ones(len(blocks), dtype=np.int64)
        if isinstance(run, _OrderedPass):
            self.s = blocks * run.step
            self.e = np.minimum(self.s + run.step, run.end)
            self.a = run.known[blocks * run.heap + 1].astype(np.uint8)
            # Bob's parities within each searched block, from a prefix along its row.
            rows = run.bits.reshape(run.blocks, run.step)[blocks]
            self.prefix = np.zeros((len(blocks), run.step + 1), dtype=np.uint8)
            np.bitwise_xor.accumulate(rows, axis=1, out=self.prefix[:, 1:])
            self.row = np.arange(len(blocks))
        else:
            self.s = np.zeros(len(blocks), dtype=np.int64)
            self.e = np.full(len(blocks), len(bob), dtype=np.int64)
            self.a = np.array([run.known[(int(b), 1)] for b in blocks], dtype=np.uint8)
            words = _words(bob)
            self.halves = (words & ~run.mask, words & run.mask)

    def keep(self, mask: np.ndarray) -> None:
        for name in ("block", "h", "s", "e", "a") + (
            ("row",) if isinstance(self.run, _OrderedPass) else ()
        ):
            setattr(self, name, getattr(self, name)[mask])

    def finished_bits(self, done: np.ndarray) -> np.ndarray:
        positions = self.s[done]
        run = self.run
        if isinstance(run, _OrderedPass) and run.order is not None:
            return run.order[positions].astype(np.int64)
        return positions

    def left_known(self) -> tuple[np.ndarray, np.ndarray]:
        run = self.run
        if isinstance(run, _OrderedPass):
            values = run.known[self.block * run.heap + 2 * self.h]
            # Unknown (-1) reads as 1 here and is overwritten with Alice's answer.
            return values >= 0, (values & 1).astype(np.uint8)
        found = np.zeros(len(self.h), dtype=bool)
        values = np.zeros(len(self.h), dtype=np.uint8)
        for i, (b, h) in enumerate(zip(self.block.tolist(), self.h.tolist(), strict=True)):
            v = run.known.get((b, 2 * h))
            if v is not None:
                found[i], values[i] = True, v
        return found, values

    def names(self, m: np.ndarray) -> np.ndarray:
        run = self.run
        code = 2 * run.t + (self.block if isinstance(run, _SplitPass) else 0)
        return _names(code, self.s, m)

    def learn(self, sel: np.ndarray, left: np.ndarray, right: np.ndarray) -> None:
        run = self.run
        if isinstance(run, _OrderedPass):
            base = self.block[sel] * run.heap + 2 * self.h[sel]
            run.known[base] = left
            run.known[base + 1] = right
            return
        for b, h, lv, rv in zip(
            self.block[sel].tolist(),
            self.h[sel].tolist(),
            left.tolist(),
            right.tolist(),
            strict=True,
        ):
            run.known[(b, 2 * h)], run.known[(b, 2 * h + 1)] = lv, rv

    def mine(self, m: np.ndarray) -> np.ndarray:
        run = self.run
        if isinstance(run, _OrderedPass):
            base = self.block * run.step
            return self.prefix[self.row, m - base] ^ self.prefix[self.row, self.s - base]
        out = np.zeros(len(m), dtype=np.uint8)
        for i in range(len(m)):
            out[i] = _range_parity(self.halves[int(self.block[i])], int(self.s[i]), int(m[i]))
        return out


def _search_odd_blocks(
    runs: list[_OrderedPass | _SplitPass], bob: np.ndarray, request: Callable[[bytes], bytes]
) -> tuple[np.ndarray, int, int]:
    """Bisect every odd top block of every pass against Bob's string as it stands.

    Returns (the bits the searches end on, in the string's order; parities asked; round
    trips). Each search ends on a bit where Bob's string differs from Alice's; searches
    of one call never meet (one per block), so none needs what another learns.
    """
    groups = [_Searches(run, bob) for run in runs if run.odd.any()]
    asked = steps = 0
    done: list[np.ndarray] = []
    while True:
        pending = []
        for g in groups:
            finished = g.e - g.s == 1
            if finished.any():
                done.append(g.finished_bits(finished))
                g.keep(~finished)
            if len(g.s):
                m = g.s + (g.e - g.s + 1) // 2
                found, left = g.left_known()
                pending.append((g, m, found, left))
        if not pending:
            break
        asks = [g.names(m)[~found] for g, m, found, _ in pending]
        total = sum(len(a) for a in asks)
        answers = np.zeros(0, dtype=np.uint8)
        if total:
            reply = request(bytes([_PARITY]) + np.concatenate(asks).astype("<u8").tobytes())
            answers = _unpack(reply, total)
            steps += 1
            asked += total
        offset = 0
        for (g, m, found, left), ask in zip(pending, asks, strict=True):
            unknown = ~found
            left[unknown] = answers[offset : offset + len(ask)]
            offset += len(ask)
            right = g.a ^ left
            if unknown.any():  # the right half was known whenever the left one was
                g.learn(unknown, left[unknown], right[unknown])
            go_left = g.mine(m) != left
            g.s, g.e = np.where(go_left, g.s, m), np.where(go_left, m, g.e)
            g.a = np.where(go_left, left, right)
            g.h = 2 * g.h + (~go_left)
    found_bits = np.concatenate(done) if done else np.zeros(0, dtype=np.int64)
    return found_bits, asked, steps
