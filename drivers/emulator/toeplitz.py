"""Toeplitz hashing: the two-universal family used for privacy amplification and for the
verification hash of the emulated QKD link's post-processing.

Convention. A Toeplitz matrix ``T`` with ``m`` rows and ``n`` columns is fixed by a seed of
``n + m - 1`` bits ``s_0 .. s_{n+m-2}``::

    T[i][j] = s[i - j + n - 1]                       (constant along each diagonal)
    y_i     = XOR_j T[i][j] x_j          for 0 <= i < m

Bit ``k`` of a Python ``int`` is ``s_k`` (resp. ``x_k``, ``y_k``). Writing ``c = s (x) x``
for the carry-less product (polynomial product over GF(2)), ``c_k = XOR_j s[k - j] x_j``, so

    y_i = c_{i + n - 1}          i.e.  y = (clmul(s, x) >> (n - 1)) mod 2^m.

The family {x -> T x} over uniformly random seeds is two-universal (collision probability
2^-m for any two distinct inputs), which is what the leftover hash lemma needs.

Privacy amplification uses the *modified* Toeplitz matrix ``[T' | I_m]`` (Hayashi and
Tsurumaru, 2016): with ``x = x1 + 2^(n-m) x2`` (``x1`` the low ``n - m`` bits),
``y = T' x1 XOR x2`` where ``T'`` is an m x (n - m) Toeplitz matrix (seed of n - 1 bits).
It stays two-universal (if x1 = x1' and x != x' then y != y'; otherwise ``T'`` alone
collides with probability 2^-m) and the product it needs is about half as long.

Four ways of computing it, all tested against each other:

* ``toeplitz_hash_reference``: the definition, bit by bit (O(n m) Python steps; tests only).
* ``toeplitz_hash_parity``: one ``int.bit_count`` parity per output bit over a shifted seed
  window (O(m n / 64) machine steps): fast for short outputs (the 64-bit verification tag).
* ``toeplitz_hash``: the carry-less product computed through an *integer* product in
  which every bit is spread over a field wide enough to hold the count of terms (Kronecker
  substitution): the integer product of the spread operands has, in field ``k``, the
  integer ``sum_j s[k-j] x_j`` with no carry into the next field, and its parity is
  ``c_k``. CPython's ``int`` multiplication is Karatsuba (O(N^1.58)); ``decimal`` (libmpdec)
  multiplies huge numbers with a number-theoretic transform (O(N log N)). So for large
  inputs the spread is done in decimal digits (``d`` digits per bit, ``10^d`` above the
  largest count) and the parity of a field is the parity of its last decimal digit.
* ``toeplitz_hash_bits`` / ``modified_toeplitz_hash_bits``: on bit arrays (numpy), the
  product as a cyclic convolution by real FFT (numpy's pocketfft) of length ``L >= n + m - 1``
  (then no wrap-around reaches the outputs used: ``c_k`` for ``k >= n - 1`` gets
  ``c_(k+L)`` only, and ``k + L > 2 (n + m) - 3``, the last index of the full product).
  The convolution of two 0/1 vectors holds integers below ``min(n, m) + 1``; double
  precision FFT computes them with an error of order ``eps L log2 L`` times the largest
  value (``eps = 2^-53``: below 1e-8 for L = 2^22; measured 4e-10 at L = 2^21), so
  rounding is exact with a wide margin. Each call checks the distance to the nearest
  integer on an evenly spread sample of the outputs (all of them up to 65536) and refuses
  (``ArithmeticError``) above 1/4, which no size this code runs at comes near.
"""

from __future__ import annotations

import decimal

import numpy as np

__all__ = [
    "FFT_ROUNDING_LIMIT",
    "clmul",
    "clmul_decimal",
    "clmul_int",
    "modified_toeplitz_hash",
    "modified_toeplitz_hash_bits",
    "toeplitz_hash",
    "toeplitz_hash_bits",
    "toeplitz_hash_parity",
    "toeplitz_hash_reference",
    "toeplitz_tag",
]

#: Below this many bits in the shorter operand the integer route is faster (measured).
_DECIMAL_THRESHOLD = 2048

_CONTEXT = decimal.Context(
    prec=decimal.MAX_PREC, Emax=decimal.MAX_EMAX, Emin=decimal.MIN_EMIN, traps=[]
)
#: Last decimal digit -> parity bit, as text for int(..., 2).
_DIGIT_PARITY = str.maketrans("0123456789", "0101010101")


def _check(seed: int, x: int, n: int, m: int) -> None:
    if n < 1 or m < 1:
        raise ValueError("Toeplitz hash needs at least one input and one output bit")
    if x >> n or seed >> (n + m - 1) or x < 0 or seed < 0:
        raise ValueError("seed must have n + m - 1 bits and input n bits")


def toeplitz_hash_reference(seed: int, x: int, n: int, m: int) -> int:
    """The definition: y_i = XOR_j s[i - j + n - 1] x_j, one bit at a time."""
    _check(seed, x, n, m)
    y = 0
    for i in range(m):
        bit = 0
        for j in range(n):
            bit ^= (seed >> (i - j + n - 1)) & (x >> j) & 1
        y |= bit << i
    return y


def toeplitz_hash_parity(seed: int, x: int, n: int, m: int) -> int:
    """Row ``i`` of T, read against x, is seed bits i .. i+n-1 reversed; reversing x
    instead turns each output bit into the parity of (seed >> i) & reversed(x)."""
    _check(seed, x, n, m)
    rx = int(format(x, f"0{n}b")[::-1], 2)  # bit j of x -> bit n-1-j
    mask = (1 << n) - 1
    y = 0
    for i in range(m):
        y |= (((seed >> i) & mask & rx).bit_count() & 1) << i
    return y


def clmul_int(a: int, b: int) -> int:
    """Carry-less product via one integer product of bit-spread operands."""
    if not a or not b:
        return 0
    la, lb = a.bit_length(), b.bit_length()
    w = min(la, lb).bit_length() + 1  # a field holds counts up to min(la, lb) < 2^w
    gap = "0" * (w - 1)  # joining the binary digits with w - 1 zeros spreads them
    sa = int(gap.join(format(a, "b")), 2)
    sb = int(gap.join(format(b, "b")), 2)
    prod = sa * sb
    total = la + lb - 1
    # The lowest bit of each w-bit field is that field's parity.
    text = format(prod, f"0{total * w}b")
    return int(text[w - 1 :: w], 2)


def clmul_decimal(a: int, b: int) -> int:
    """Carry-less product via one NTT-based decimal product of digit-spread operands."""
    if not a or not b:
        return 0
    la, lb = a.bit_length(), b.bit_length()
    d = len(str(min(la, lb)))  # 10^d > largest field count min(la, lb)
    gap = "0" * (d - 1)
    da = _CONTEXT.create_decimal(gap.join(format(a, "b")))
    db = _CONTEXT.create_decimal(gap.join(format(b, "b")))
    prod = _CONTEXT.multiply(da, db)
    total = la + lb - 1
    text = format(prod, "f").zfill(total * d)
    return int(text[d - 1 :: d].translate(_DIGIT_PARITY), 2)


def clmul(a: int, b: int) -> int:
    """Carry-less (GF(2)[x]) product of two non-negative integers."""
    if min(a.bit_length(), b.bit_length()) < _DECIMAL_THRESHOLD:
        return clmul_int(a, b)
    return clmul_decimal(a, b)


def toeplitz_hash(seed: int, x: int, n: int, m: int) -> int:
    """Toeplitz hash of the n-bit ``x`` to m bits with an (n + m - 1)-bit seed."""
    _check(seed, x, n, m)
    return (clmul(seed, x) >> (n - 1)) & ((1 << m) - 1)


def modified_toeplitz_hash(seed: int, x: int, n: int, m: int) -> int:
    """``[T' | I_m] x`` for the n-bit ``x`` with an (n - 1)-bit seed; needs m < n."""
    if not 0 < m < n:
        raise ValueError("modified Toeplitz hashing needs 0 < m < n")
    if seed < 0 or seed >> (n - 1) or x < 0 or x >> n:
        raise ValueError("seed must have n - 1 bits and input n bits")
    width = n - m
    x1, x2 = x & ((1 << width) - 1), x >> width
    return toeplitz_hash(seed, x1, width, m) ^ x2


#: Largest distance from an integer an FFT convolution value may show before it is refused.
FFT_ROUNDING_LIMIT = 0.25
#: How many outputs of one FFT product are checked against that limit.
_CHECKED_OUTPUTS = 65536


def _fast_length(size: int) -> int:
    """Smallest 2^a 3^b 5^c >= size (pocketfft is fastest on such lengths)."""
    best = 1 << max(0, (size - 1).bit_length())
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            p = p35
            while p < size:
                p *= 2
            best = min(best, p)
            p35 *= 3
        p5 *= 5
    return best


def toeplitz_hash_bits(seed: np.ndarray, x: np.ndarray, m: int) -> np.ndarray:
    """Toeplitz hash of bit array ``x`` (n bits, 0/1 uint8) to m bits with an
    (n + m - 1)-bit seed, by FFT convolution (see the module doc)."""
    n = len(x)
    if n < 1 or m < 1 or len(seed) != n + m - 1:
        raise ValueError("seed must have n + m - 1 bits and input n bits")
    length = _fast_length(n + m - 1)
    product = np.fft.irfft(
        np.fft.rfft(seed.astype(np.float64), length) * np.fft.rfft(x.astype(np.float64), length),
        length,
    )[n - 1 : n - 1 + m]
    step = max(1, m // _CHECKED_OUTPUTS)
    sample = product[::step]
    if float(np.abs(sample - np.rint(sample)).max()) > FFT_ROUNDING_LIMIT:
        raise ArithmeticError("FFT convolution too inexact to round: input too long")
    # Counts are below 2^31: round to int32, keep the low bit.
    return (np.rint(product).astype(np.int32) & 1).astype(np.uint8)


def modified_toeplitz_hash_bits(seed: np.ndarray, x: np.ndarray, m: int) -> np.ndarray:
    """``[T' | I_m] x`` on bit arrays: x (n bits), an (n - 1)-bit seed, m < n outputs."""
    n = len(x)
    if not 0 < m < n:
        raise ValueError("modified Toeplitz hashing needs 0 < m < n")
    if len(seed) != n - 1:
        raise ValueError("seed must have n - 1 bits")
    width = n - m
    return toeplitz_hash_bits(seed, x[:width], m) ^ x[width:]


def toeplitz_tag(seed: int, x: np.ndarray, m: int) -> int:
    """``toeplitz_hash_parity`` of bit array ``x`` (short outputs: the verification tag)."""
    n = len(x)
    if n < 1 or m < 1 or seed < 0 or seed >> (n + m - 1):
        raise ValueError("seed must have n + m - 1 bits and input at least one bit")
    rx = int.from_bytes(np.packbits(x[::-1], bitorder="little").tobytes(), "little")
    y = 0
    for i in range(m):
        y |= (((seed >> i) & rx).bit_count() & 1) << i
    return y
