"""A keyed pseudo-random permutation of ``[0, n)`` evaluated per position: the global order for any dataset size.

``torch.randperm(n)`` materialises 8 bytes per sample in every rank, every epoch (8 GB for 10**9 windows, nothing at
all for 10**12). This is a Feistel network over the ``b`` bits of ``n - 1`` (unbalanced when ``b`` is odd, so every
value stays below ``2**63`` and fits an int64 tensor), made a permutation of exactly ``[0, n)`` by cycle-walking:
a value that lands in ``[n, 2**b)`` is permuted again until it falls inside (``2**b < 2n``, so under two rounds of
walking on average). Vectorised over a tensor of positions; no state but the round keys.

The round function is an integer hash of the half and a 32-bit round key whose products stay below ``2**63`` (the
multipliers are below ``2**31``, the operands below ``2**32``): torch's int64 arithmetic never overflows here.
Six rounds: four are what Luby and Rackoff need from a good round function; two more cost little.
"""

from __future__ import annotations

import torch

ROUNDS = 6
MAX_N = 2**63
_M32 = 0xFFFFFFFF
_MUL1, _MUL2 = 0x7FEB352D, 0x2C1B3C6D  # odd, below 2**31
_GOLDEN = 0x9E3779B97F4A7C15
_MASK64 = (1 << 64) - 1


def _splitmix(z: int) -> int:
    z = (z + _GOLDEN) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def round_keys(key: int, rounds: int = ROUNDS) -> list[tuple[int, int]]:
    """Two 32-bit keys per round, from any integer ``key`` (splitmix64 steps: unrelated keys for near keys)."""
    keys, z = [], key & _MASK64
    for _ in range(rounds):
        z = _splitmix(z)
        keys.append((z & _M32, z >> 32))
    return keys


def _mix(v: torch.Tensor, k1: int, k2: int) -> torch.Tensor:
    """A 32-bit hash of ``v`` (``0 <= v < 2**32``) under the round keys: xor, multiply, xor-shift, twice."""
    h = (v ^ k1) * _MUL1 & _M32
    h = h ^ (h >> 15)
    h = (h ^ k2) * _MUL2 & _M32
    return h ^ (h >> 16)


class KeyedPermutation:
    """A permutation of ``[0, n)`` for ``1 <= n <= 2**63``, keyed by an integer: ``perm(positions)`` maps a long
    tensor of positions (each in ``[0, n)``) to their values. O(1) memory; the same (n, key) gives the same map."""

    def __init__(self, n: int, key: int) -> None:
        if not 1 <= n <= MAX_N:
            raise ValueError(f"a keyed permutation needs 1 <= n <= 2**63, not {n}")
        self.n = n
        bits = max(2, (n - 1).bit_length())
        self.hi_bits, self.lo_bits = bits // 2, bits - bits // 2  # lo gets the odd bit
        self.keys = round_keys(key)
        self.walks = n < 1 << bits  # n a power of two: the network's range is [0, n) already

    def _once(self, x: torch.Tensor) -> torch.Tensor:
        """One pass of the network over ``[0, 2**bits)``: a bijection of that range."""
        wh, wl = self.hi_bits, self.lo_bits
        hi, lo = x >> wl, x & ((1 << wl) - 1)
        for k1, k2 in self.keys:
            # (hi: wh bits, lo: wl bits) -> (lo, hi ^ F(lo)): the widths swap every round, the value stays invertible
            hi, lo = lo, hi ^ (_mix(lo, k1, k2) & ((1 << wh) - 1))
            wh, wl = wl, wh
        return (hi << wl) | lo  # after an even number of rounds (wh, wl) are as they started

    def __call__(self, positions: torch.Tensor) -> torch.Tensor:
        out = self._once(positions)
        if not self.walks:
            return out
        outside = out >= self.n
        while bool(outside.any()):  # cycle-walking: stays a permutation of [0, n)
            where = outside.nonzero().squeeze(1)
            walked = self._once(out[where])
            out[where] = walked
            outside = torch.zeros_like(outside)
            outside[where] = walked >= self.n
        return out
