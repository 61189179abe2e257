"""GF(2^8) arithmetic the slow, obvious way: the oracle the codec's tables are checked against."""

from __future__ import annotations


def gf_mul_bitwise(a: int, b: int) -> int:
    """Russian-peasant multiplication modulo x^8 + x^4 + x^3 + x^2 + 1 (0x11d)."""
    p = 0
    while b:
        if b & 1:
            p ^= a
        b >>= 1
        a <<= 1
        if a & 0x100:
            a ^= 0x11D
    return p
