"""ckpt.redundancy.RSCodec: encode / decode / update / fold on the kernel level in use
(the default one, or the one CKPT_EC_ISA forces when tests/native/test_ec_kernels.py
re-runs this file per level)."""

from __future__ import annotations

import itertools
import os
import random

import numpy as np
import pytest

from gf_reference import gf_mul_bitwise as gf_mul

from ckpt.errors import CkptError, CodecError
from ckpt.redundancy import RSCodec, available_isas, cauchy_matrix, default_isa


def parity_reference(matrix: bytes, k: int, m: int, data: list[bytes]) -> list[bytes]:
    """Parity by the definition, byte by byte (small inputs only)."""
    table = [[gf_mul(a, b) for b in range(256)] for a in range(256)]
    n = len(data[0])
    out = []
    for i in range(m):
        row = bytearray(n)
        for j in range(k):
            t = table[matrix[i * k + j]]
            for x in range(n):
                row[x] ^= t[data[j][x]]
        out.append(bytes(row))
    return out


def random_shards(rng: np.random.Generator, k: int, n: int) -> list[np.ndarray]:
    return [rng.integers(0, 256, n, dtype=np.uint8) for _ in range(k)]


def test_codec_runs_on_the_default_level_which_honours_the_env_cap() -> None:
    codec = RSCodec(4, 2)
    assert codec.isa == default_isa()
    forced = os.environ.get("CKPT_EC_ISA")
    if forced in available_isas():
        assert codec.isa == forced


@pytest.mark.parametrize("k,m,rows", [
    (4, 2, ["47a77aba", "a747ba7a"]),
    (8, 2, ["ad9ddd983daa5d96", "9dad98ddaa3d965d"]),
])
def test_known_answers_parity_of_unit_vectors_is_the_cauchy_column(k: int, m: int, rows: list[str]) -> None:
    codec = RSCodec(k, m)
    assert codec.matrix.hex() == "".join(rows)
    # Data shard j = one byte 1: parity byte i is C[i][j].
    for j in range(k):
        data = [b"\x01" if t == j else b"\x00" for t in range(k)]
        parity = codec.encode(data)
        assert [bytes(p).hex() for p in parity] == [rows[i][2 * j:2 * j + 2] for i in range(m)]


def test_encode_matches_the_definition_on_random_bytes() -> None:
    rng = np.random.default_rng(1)
    for k, m in [(1, 1), (3, 5), (10, 4), (17, 3)]:
        data = [bytes(d) for d in random_shards(rng, k, 131)]
        codec = RSCodec(k, m)
        assert [bytes(p) for p in codec.encode(data)] == parity_reference(codec.matrix, k, m, data)


def test_every_erasure_pattern_up_to_m_decodes_for_all_k_to_16_and_m_to_4() -> None:
    rng = np.random.default_rng(2)
    for k in range(1, 17):
        for m in range(1, 5):
            codec = RSCodec(k, m)
            data = random_shards(rng, k, 67)
            shards = data + codec.encode(data)
            for e in range(1, m + 1):
                for lost in itertools.combinations(range(k + m), e):
                    damaged = [None if i in lost else s for i, s in enumerate(shards)]
                    rebuilt = codec.decode(damaged)
                    for i, r in zip(lost, rebuilt):
                        assert (r == shards[i]).all(), (k, m, lost, i)


def test_200_random_codes_with_random_erasures_round_trip() -> None:
    rng = random.Random(3)
    nrng = np.random.default_rng(3)
    for _ in range(200):
        k = rng.randint(1, 64)
        m = rng.randint(1, min(32, 256 - k))
        n = rng.choice([0, 1, 63, 64, 65, 500, 4097])
        codec = RSCodec(k, m)
        data = random_shards(nrng, k, n)
        shards = data + codec.encode(data)
        lost = rng.sample(range(k + m), rng.randint(1, m))
        damaged = [None if i in lost else s for i, s in enumerate(shards)]
        # lost=None rebuilds every missing shard in index order; an explicit list, in its order
        if rng.random() < 0.5:
            order, rebuilt = sorted(lost), codec.decode(damaged)
        else:
            order, rebuilt = lost, codec.decode(damaged, lost=lost)
        assert len(rebuilt) == len(order)
        for i, r in zip(order, rebuilt):
            assert (r == shards[i]).all(), (k, m, n, lost)


def test_decode_rebuilds_only_the_shards_asked_for_in_that_order() -> None:
    rng = np.random.default_rng(4)
    codec = RSCodec(6, 3)
    data = random_shards(rng, 6, 1000)
    shards = data + codec.encode(data)
    damaged = list(shards)
    damaged[1] = damaged[4] = damaged[7] = None
    rebuilt = codec.decode(damaged, lost=[7, 1])
    assert len(rebuilt) == 2
    assert (rebuilt[0] == shards[7]).all() and (rebuilt[1] == shards[1]).all()
    # A present shard may be asked for too (to verify it): it is recomputed from the others.
    again = codec.decode(shards, lost=[2])
    assert (again[0] == shards[2]).all()
    assert codec.decode(shards) == []


def test_decode_caches_one_plan_per_erasure_pattern() -> None:
    rng = np.random.default_rng(5)
    codec = RSCodec(4, 2)
    data = random_shards(rng, 4, 64)
    shards = data + codec.encode(data)
    damaged = [None, shards[1], None, shards[3], shards[4], shards[5]]
    codec.decode(damaged)
    codec.decode(damaged)
    codec.decode(damaged, lost=[0])
    assert len(codec._patterns) == 2


def test_update_equals_reencoding_with_the_new_shard() -> None:
    rng = np.random.default_rng(6)
    for k, m in [(4, 2), (8, 3), (10, 4), (5, 7)]:
        codec = RSCodec(k, m)
        data = random_shards(rng, k, 10_001)
        parity = codec.encode(data)
        for index in (0, k - 1, k // 2):
            new = rng.integers(0, 256, 10_001, dtype=np.uint8)
            codec.update(parity, index, data[index], new)
            data[index] = new
            for got, want in zip(parity, codec.encode(data)):
                assert (got == want).all(), (k, m, index)


def test_folding_shards_in_any_order_gives_the_parity() -> None:
    rng = np.random.default_rng(7)
    codec = RSCodec(6, 3)
    data = random_shards(rng, 6, 5000)
    parity = [np.zeros(5000, np.uint8) for _ in range(3)]
    for j in [3, 0, 5, 1, 4, 2]:
        codec.fold(parity, j, data[j])
    for got, want in zip(parity, codec.encode(data)):
        assert (got == want).all()


def test_out_buffers_are_filled_in_place_and_returned() -> None:
    rng = np.random.default_rng(8)
    codec = RSCodec(4, 2)
    data = random_shards(rng, 4, 999)
    want = codec.encode(data)
    out = [bytearray(999), np.full(999, 7, np.uint8)]
    got = codec.encode(data, out=out)
    assert got[0] is out[0] and got[1] is out[1]
    assert bytes(out[0]) == want[0].tobytes() and (out[1] == want[1]).all()
    damaged = data[:1] + [None, None] + data[3:] + want
    rebuilt = [np.empty(999, np.uint8), bytearray(999)]
    assert codec.decode(damaged, out=rebuilt)[1] is rebuilt[1]
    assert (rebuilt[0] == data[1]).all() and bytes(rebuilt[1]) == data[2].tobytes()


def test_numpy_and_cpu_torch_tensors_are_used_without_copies() -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(9)
    codec = RSCodec(4, 2)
    data = random_shards(rng, 4, 4096)
    want = codec.encode(data)
    as_float = [torch.from_numpy(d.copy()).view(torch.float32) for d in data]  # any dtype: bytes count
    out = [torch.zeros(1024, dtype=torch.float32) for _ in range(2)]
    got = codec.encode(as_float, out=out)
    assert got[0] is out[0]
    assert (out[0].view(torch.uint8).numpy() == want[0]).all()
    assert (codec.encode([torch.from_numpy(d) for d in data])[1] == want[1]).all()
    # 2-D numpy shards are their bytes in C order.
    as_2d = [d.reshape(64, 64) for d in data]
    assert (codec.encode(as_2d)[0] == want[0]).all()
    # decode into a tensor slice of a bigger tensor (a view: written in place)
    big = torch.zeros(3, 4096, dtype=torch.uint8)
    codec.decode([None] + data[1:] + want, out=[big[1]])
    assert (big[1].numpy() == data[0]).all() and int(big[0].sum()) == 0
    with pytest.raises(CodecError, match="non-contiguous"):
        codec.encode([torch.zeros(8192, dtype=torch.uint8)[::2]] + [torch.from_numpy(d) for d in data[1:]])


def test_multi_threaded_codec_equals_single_threaded() -> None:
    rng = np.random.default_rng(10)
    data = random_shards(rng, 8, (2 << 20) + 13)
    one = RSCodec(8, 3, threads=1).encode(data)
    many = RSCodec(8, 3, threads=4).encode(data)
    for a, b in zip(one, many):
        assert (a == b).all()


def test_caller_matrix_is_used_and_checked_for_mds() -> None:
    rng = np.random.default_rng(11)
    k, m = 5, 2
    custom = [[1, 1, 1, 1, 1], [1, 2, 4, 8, 16]]  # XOR row + powers of 2 (MDS for k=5)
    codec = RSCodec(k, m, matrix=custom)
    assert codec.matrix == bytes([1, 1, 1, 1, 1, 1, 2, 4, 8, 16])
    data = random_shards(rng, k, 300)
    parity = codec.encode(data)
    assert [bytes(p) for p in parity] == parity_reference(codec.matrix, k, m, [bytes(d) for d in data])
    shards = data + parity
    for lost in itertools.combinations(range(k + m), 2):
        damaged = [None if i in lost else s for i, s in enumerate(shards)]
        for i, r in zip(lost, codec.decode(damaged)):
            assert (r == shards[i]).all()
    assert RSCodec(k, m, matrix=np.array(custom, dtype=np.uint8)).matrix == codec.matrix
    assert RSCodec(k, m, matrix=codec.matrix).matrix == codec.matrix
    with pytest.raises(CodecError, match="not MDS"):
        RSCodec(3, 2, matrix=[[1, 1, 1], [1, 1, 2]])  # columns 0 and 1 equal: a 2x2 singular submatrix
    with pytest.raises(CodecError, match="not MDS"):
        RSCodec(3, 1, matrix=[[1, 0, 1]])
    with pytest.raises(CodecError, match="shape"):
        RSCodec(3, 2, matrix=[[1, 2, 3]])
    with pytest.raises(CodecError, match="0, 255"):
        RSCodec(2, 1, matrix=[[1, 256]])


def test_errors_name_the_problem() -> None:
    codec = RSCodec(4, 2)
    good = [bytes(10)] * 4
    with pytest.raises(CodecError, match="same length"):
        codec.encode([bytes(10), bytes(10), bytes(11), bytes(10)])
    with pytest.raises(CodecError, match="expected k=4"):
        codec.encode(good[:3])
    with pytest.raises(CodecError, match="at least k=4"):
        codec.decode([bytes(10), None, None, None, bytes(10), bytes(10)])
    with pytest.raises(CodecError, match="expected k \\+ m = 6"):
        codec.decode(good)
    with pytest.raises(CodecError, match="at most 256"):
        RSCodec(200, 57)
    with pytest.raises(CodecError, match="at least 1"):
        RSCodec(0, 2)
    with pytest.raises(CodecError, match="at least 1"):
        RSCodec(3, 0)
    with pytest.raises(CodecError, match="read-only"):
        codec.encode(good, out=[bytearray(10), bytes(10)])
    with pytest.raises(CodecError, match="expected 10"):
        codec.encode(good, out=[bytearray(10), bytearray(9)])
    with pytest.raises(CodecError, match="expected m=2"):
        codec.encode(good, out=[bytearray(10)])
    with pytest.raises(CodecError, match="not a shard index"):
        codec.decode(good + [None, None], lost=[6])
    with pytest.raises(CodecError, match="twice"):
        codec.decode(good + [None, None], lost=[4, 4])
    with pytest.raises(CodecError, match="not a data shard index"):
        codec.update([bytearray(10)] * 2, 4, bytes(10), bytes(10))
    with pytest.raises(CodecError, match="old"):
        codec.update([bytearray(10), bytearray(10)], 0, bytes(9), bytes(10))
    with pytest.raises(CodecError, match="not usable|not a kernel level"):
        RSCodec(4, 2, isa="sse9")
    missing = [lv for lv in ("avx512", "gfni") if lv not in available_isas()]
    for lv in missing:
        with pytest.raises(CodecError, match="available here: scalar"):
            RSCodec(4, 2, isa=lv)
    assert issubclass(CodecError, CkptError) and issubclass(CodecError, ValueError)


def test_every_available_level_gives_the_same_parity_through_the_codec() -> None:
    rng = np.random.default_rng(12)
    data = random_shards(rng, 10, 70_001)
    want = RSCodec(10, 4, isa="scalar").encode(data)
    for level in available_isas():
        got = RSCodec(10, 4, isa=level).encode(data)
        assert all((a == b).all() for a, b in zip(got, want)), level


def test_cauchy_matrix_helper_is_the_codec_default() -> None:
    assert cauchy_matrix(10, 4) == RSCodec(10, 4).matrix
