"""ckpt._ec arithmetic: GF(2^8) under 0x11d, the Cauchy matrix, inversion, MDS check,
and the per-coefficient tables of the SIMD kernels, each against a reference written here."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from gf_reference import gf_mul_bitwise

from ckpt import _ec
from ckpt.errors import CodecError


@pytest.fixture(scope="module")
def mul_ref() -> np.ndarray:
    return np.array([[gf_mul_bitwise(a, b) for b in range(256)] for a in range(256)], dtype=np.uint8)


def test_multiply_table_matches_bitwise_reference_for_all_65536_pairs(mul_ref: np.ndarray) -> None:
    table = np.frombuffer(_ec.gf_mul_table(), dtype=np.uint8).reshape(256, 256)
    mismatches = np.argwhere(table != mul_ref)
    assert mismatches.size == 0, f"first wrong products (a, b): {mismatches[:5].tolist()}"


def test_inverse_table_gives_one_for_every_nonzero_element() -> None:
    inv = _ec.gf_inv_table()
    assert inv[0] == 0
    for a in range(1, 256):
        assert gf_mul_bitwise(a, inv[a]) == 1, a


def test_cauchy_matrix_known_answers_match_isa_l() -> None:
    assert _ec.cauchy_matrix(4, 2).hex() == "47a77aba" + "a747ba7a"
    assert _ec.cauchy_matrix(8, 2).hex() == "ad9ddd983daa5d96" + "9dad98ddaa3d965d"


def test_cauchy_matrix_is_the_inverse_of_row_xor_column() -> None:
    inv = _ec.gf_inv_table()
    for k, m in [(1, 1), (10, 4), (3, 253), (200, 56)]:
        c = _ec.cauchy_matrix(k, m)
        assert c == bytes(inv[(k + i) ^ j] for i in range(m) for j in range(k))


def _mat_mul(a: bytes, b: bytes, n: int) -> bytes:
    out = bytearray(n * n)
    for i in range(n):
        for j in range(n):
            v = 0
            for t in range(n):
                v ^= gf_mul_bitwise(a[i * n + t], b[t * n + j])
            out[i * n + j] = v
    return bytes(out)


def test_invert_matrix_gives_identity_and_rejects_singular() -> None:
    rng = random.Random(7)
    eye = lambda n: bytes(int(i == j) for i in range(n) for j in range(n))  # noqa: E731
    for n in (1, 2, 5, 9):
        c = _ec.cauchy_matrix(n, n)  # square Cauchy: always invertible
        assert _mat_mul(c, _ec.invert_matrix(c, n), n) == eye(n)
        while True:
            a = bytes(rng.randrange(256) for _ in range(n * n))
            try:
                inv = _ec.invert_matrix(a, n)
                break
            except CodecError:
                continue
        assert _mat_mul(a, inv, n) == eye(n)
    with pytest.raises(CodecError, match="singular"):
        _ec.invert_matrix(bytes([1, 2, 2, 4]), 2)  # row 2 = 2 * row 1


def test_check_mds_accepts_cauchy_and_names_a_singular_submatrix() -> None:
    assert _ec.check_mds(_ec.cauchy_matrix(16, 4), 16, 4)[0] == 1
    # Vandermonde rows (a^i)_j under an identity are not MDS for every size: the
    # check finds some square submatrix with zero determinant.
    k, m = 12, 4
    vand = bytearray(m * k)
    for i in range(m):
        for j in range(k):
            v = 1
            for _ in range(i):
                v = gf_mul_bitwise(v, j + 1)
            vand[i * k + j] = v
    status, rows, cols = _ec.check_mds(bytes(vand), k, m)
    assert status == 0 and len(rows) == len(cols) >= 1
    sub = bytes(vand[r * k + c] for r in rows for c in cols)
    with pytest.raises(CodecError):
        _ec.invert_matrix(sub, len(rows))
    zero = bytearray(_ec.cauchy_matrix(4, 2))
    zero[5] = 0
    assert _ec.check_mds(bytes(zero), 4, 2) == (0, [1], [1])


def test_check_mds_gives_up_beyond_its_budget() -> None:
    assert _ec.check_mds(_ec.cauchy_matrix(100, 20), 100, 20, 1000)[0] == -1


def test_recovery_rows_rebuild_every_shard_of_small_codes(mul_ref: np.ndarray) -> None:
    k, m = 5, 3
    c = _ec.cauchy_matrix(k, m)
    gen = [bytes(int(i == j) for j in range(k)) for i in range(k)] + [c[i * k:(i + 1) * k] for i in range(m)]
    for survivors in itertools.combinations(range(k + m), k):
        rows = _ec.recovery_matrix(c, k, m, list(survivors), list(range(k + m)))
        for w in range(k + m):
            # row w . (generator rows of the survivors) == generator row w
            got = [0] * k
            for j, s in enumerate(survivors):
                f = rows[w * k + j]
                for t in range(k):
                    got[t] ^= int(mul_ref[f, gen[s][t]])
            assert bytes(got) == gen[w], (survivors, w)


def test_nibble_tables_split_every_product(mul_ref: np.ndarray) -> None:
    for c in range(256):
        t = _ec.nibble_table(c)
        assert len(t) == 32
        for x in range(256):
            assert t[x & 15] ^ t[16 + (x >> 4)] == mul_ref[c, x]


def gf2p8affine_reference(x: np.ndarray, matrix: int) -> np.ndarray:
    """gf2p8affineqb(x, A, 0) as the instruction reference defines it: bit i of the result
    is the parity of (byte 7-i of A) AND x."""
    out = np.zeros_like(x)
    for i in range(8):
        row = (matrix >> (8 * (7 - i))) & 0xFF
        bits = np.unpackbits((x & row)[:, None], axis=1).sum(axis=1) & 1
        out |= (bits << i).astype(np.uint8)
    return out


def test_gfni_affine_matrix_multiplies_under_0x11d_for_all_constants(mul_ref: np.ndarray) -> None:
    xs = np.arange(256, dtype=np.uint8)
    for c in range(256):
        got = gf2p8affine_reference(xs, _ec.gfni_matrix(c))
        assert (got == mul_ref[c]).all(), f"coefficient {c:#04x}"
    assert _ec.gfni_matrix(1) == 0x0102040810204080  # the identity matrix


def test_bad_arguments_raise_codec_error() -> None:
    with pytest.raises(CodecError, match="at most 256"):
        _ec.cauchy_matrix(200, 57)
    with pytest.raises(CodecError, match="at least 1"):
        _ec.cauchy_matrix(0, 2)
    with pytest.raises(CodecError, match="expected m\\*k"):
        _ec.check_mds(b"\x01\x02\x03", 2, 2)
    with pytest.raises(CodecError, match="byte"):
        _ec.gfni_matrix(256)
    with pytest.raises(CodecError, match="exactly k"):
        _ec.recovery_matrix(_ec.cauchy_matrix(4, 2), 4, 2, [0, 1, 2], [3])
