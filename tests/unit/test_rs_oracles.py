"""ckpt's Reed-Solomon codec checked against codecs written by other people.

- reedsolo (pure Python): its systematic RS encoder defines a parity matrix (the ecc bytes
  of each unit message); given that matrix, ckpt's parity must be reedsolo's ecc byte
  column by byte column, and reedsolo must rebuild ckpt's output from the same erasures.
- pyeclib's `isa_l_rs_cauchy` (Intel ISA-L): after each fragment's 80-byte header, its
  parity payloads must equal ckpt's default Cauchy parity byte for byte, and each side must
  decode the other's parity.
- zfec (C, its own Vandermonde-derived matrix): same as reedsolo, on bigger buffers.

A shard here is one of the k data or m parity buffers of the codec; a byte column is the
k + m bytes at one offset across them, i.e. one codeword.
"""

from __future__ import annotations

import numpy as np
import pytest
import reedsolo

from ckpt.redundancy import RSCodec, available_isas

PYECLIB_HEADER_BYTES = 80


def random_shards(rng: np.random.Generator, k: int, shard_bytes: int) -> list[np.ndarray]:
    return [rng.integers(0, 256, shard_bytes, dtype=np.uint8) for _ in range(k)]


def stack(buffers) -> np.ndarray:
    return np.stack([np.frombuffer(b, dtype=np.uint8) for b in buffers])


# ----------------------------------------------------------------------------- reedsolo


def reedsolo_codec(m: int) -> reedsolo.RSCodec:
    rs = reedsolo.RSCodec(nsym=m)  # defaults: GF(2^8), generator 2, first consecutive root 0
    # ckpt's field is GF(2^8) modulo 0x11d: the oracle must be in the same field.
    assert (rs.prim, rs.c_exp) == (0x11D, 8)
    return rs


def reedsolo_parity_matrix(rs: reedsolo.RSCodec, k: int, m: int) -> np.ndarray:
    """m x k: column j is reedsolo's ecc of the unit message e_j (its encoder is linear)."""
    columns = []
    for j in range(k):
        unit = bytearray(k)
        unit[j] = 1
        codeword = rs.encode(bytes(unit))
        assert codeword[:k] == unit  # systematic: message first, then m ecc bytes
        columns.append(list(codeword[k:]))
    return np.array(columns, dtype=np.uint8).T.copy()


# (k, m, shard bytes): total data <= 64 KiB (reedsolo is ~35-100 us per codeword); odd
# lengths leave a tail after the SIMD blocks.
REEDSOLO_CASES = [(2, 1, 4099), (4, 2, 16384), (5, 3, 3001), (8, 2, 8192), (10, 4, 6553), (16, 4, 1027)]


@pytest.mark.parametrize("k,m,shard_bytes", REEDSOLO_CASES)
def test_parity_equals_reedsolo_ecc_for_every_byte_column(k, m, shard_bytes):
    rng = np.random.default_rng(k * 100 + m)
    rs = reedsolo_codec(m)
    matrix = reedsolo_parity_matrix(rs, k, m)
    codec = RSCodec(k, m, matrix=matrix)
    assert codec.matrix == matrix.tobytes()
    data = random_shards(rng, k, shard_bytes)

    parity = stack(codec.encode(data))

    columns = stack(data).T  # one k-byte message per byte offset
    ecc = np.array([list(rs.encode(col.tobytes())[k:]) for col in columns], dtype=np.uint8)
    mismatched = np.flatnonzero((ecc.T != parity).any(axis=0))
    assert mismatched.size == 0, (
        f"RS({k},{m}): ckpt parity differs from reedsolo ecc in {mismatched.size} of "
        f"{shard_bytes} byte columns, first at offset {mismatched[:1]}")


@pytest.mark.parametrize("k,m,shard_bytes", REEDSOLO_CASES)
def test_reedsolo_rebuilds_ckpt_output_from_the_same_erasures(k, m, shard_bytes):
    rng = np.random.default_rng(k * 1000 + m)
    rs = reedsolo_codec(m)
    codec = RSCodec(k, m, matrix=reedsolo_parity_matrix(rs, k, m))
    data = random_shards(rng, k, shard_bytes)
    encoded = data + list(codec.encode(data))
    codewords = stack(encoded).T  # (bytes, k + m): one codeword per byte offset
    patterns = [list(range(m)),  # data shards only: every survivor row is needed
                sorted(rng.choice(k + m, size=m, replace=False).tolist())]
    for lost in patterns:
        shards = [None if i in lost else encoded[i] for i in range(k + m)]

        rebuilt_by_ckpt = stack(codec.decode(shards, lost=lost))

        assert np.array_equal(rebuilt_by_ckpt, codewords[:, lost].T), f"ckpt, lost {lost}"
        erased = codewords.copy()
        erased[:, lost] = 0
        for offset, (codeword, original) in enumerate(zip(erased, codewords)):
            _, full, _ = rs.decode(bytearray(codeword.tobytes()), erase_pos=lost, only_erasures=True)
            assert bytes(full) == original.tobytes(), f"reedsolo, lost {lost}, byte column {offset}"


# ----------------------------------------------------------------------------- pyeclib / ISA-L


@pytest.fixture(scope="module")
def ec_driver():
    """ECDriver factory for pyeclib's ISA-L Cauchy backend; skips when it is not installed."""
    ec_iface = pytest.importorskip(
        "pyeclib.ec_iface", reason="pyeclib (ships ISA-L) not installed: pip install pyeclib")

    def make(k: int, m: int):
        try:
            return ec_iface.ECDriver(k=k, m=m, ec_type="isa_l_rs_cauchy")
        except Exception as e:  # pyeclib raises its own ECDriverError / ECBackendNotAvailable
            pytest.skip(f"pyeclib is installed but its isa_l_rs_cauchy backend is not usable: {e}")

    return make


def pyeclib_split(data: bytes, k: int) -> tuple[list[np.ndarray], int]:
    """pyeclib's split for ISA-L (w=8): zero-pad to k * ceil(n / k), k consecutive pieces."""
    shard_bytes = max(1, -(-len(data) // k))
    padded = np.zeros(k * shard_bytes, dtype=np.uint8)
    padded[:len(data)] = np.frombuffer(data, dtype=np.uint8)
    return [padded[j * shard_bytes:(j + 1) * shard_bytes] for j in range(k)], shard_bytes


def payload(fragment: bytes) -> np.ndarray:
    return np.frombuffer(fragment, dtype=np.uint8)[PYECLIB_HEADER_BYTES:]


@pytest.mark.parametrize("k,m", [(k, m) for k in range(1, 17) for m in range(1, 5)])
def test_default_matrix_is_isa_l_cauchy_matrix(ec_driver, k, m):
    driver = ec_driver(k, m)
    columns = []
    for j in range(k):  # one byte per shard: the parity payloads are column j of C
        unit = bytearray(k)
        unit[j] = 1
        fragments = driver.encode(bytes(unit))
        columns.append([payload(fragments[k + i])[0] for i in range(m)])
    isa_l_matrix = np.array(columns, dtype=np.uint8).T
    assert RSCodec(k, m).matrix.hex() == isa_l_matrix.tobytes().hex()


PYECLIB_SIZES = [1, 1000, 4097, 65537, 1 << 20]


@pytest.mark.parametrize("isa", available_isas())
@pytest.mark.parametrize("k,m", [(4, 2), (8, 2), (10, 4), (6, 3), (12, 4)])
def test_parity_equals_isa_l_fragment_payloads(ec_driver, isa, k, m):
    rng = np.random.default_rng(k * 10 + m)
    driver = ec_driver(k, m)
    codec = RSCodec(k, m, isa=isa)
    for size in PYECLIB_SIZES:
        data = rng.bytes(size)
        fragments = driver.encode(data)
        shards, shard_bytes = pyeclib_split(data, k)
        assert len(fragments) == k + m
        assert all(len(f) == PYECLIB_HEADER_BYTES + shard_bytes for f in fragments)
        for j in range(k):  # the split above is how pyeclib lays out the data
            assert np.array_equal(payload(fragments[j]), shards[j]), f"size {size}: data fragment {j}"

        parity = codec.encode(shards)

        for i in range(m):
            assert np.array_equal(parity[i], payload(fragments[k + i])), (
                f"{isa}, RS({k},{m}), {size} bytes: parity {i} differs from ISA-L's fragment payload")


@pytest.mark.parametrize("k,m", [(4, 2), (8, 2), (10, 4)])
def test_ckpt_and_isa_l_each_decode_the_others_parity(ec_driver, k, m):
    rng = np.random.default_rng(7 + k + m)
    driver = ec_driver(k, m)
    codec = RSCodec(k, m)
    data = rng.bytes(k * 65536 + 13)
    fragments = driver.encode(data)
    shards, _ = pyeclib_split(data, k)
    lost = list(range(m))  # data shards

    # ckpt rebuilds the lost data from ISA-L's parity.
    survivors = [None if i in lost else payload(f) for i, f in enumerate(fragments)]
    rebuilt = codec.decode(survivors, lost=lost)
    for i, shard in zip(lost, rebuilt):
        assert np.array_equal(shard, shards[i]), f"ckpt could not rebuild shard {i} from ISA-L parity"

    # pyeclib rebuilds the data from ckpt's parity (under pyeclib's own fragment headers).
    parity = codec.encode(shards)
    ckpt_fragments = [fragments[k + i][:PYECLIB_HEADER_BYTES] + bytes(parity[i]) for i in range(m)]
    assert driver.decode(fragments[m:k] + ckpt_fragments) == data


# ----------------------------------------------------------------------------- zfec


def zfec_parity_matrix(zfec, k: int, m: int) -> np.ndarray:
    encoder = zfec.Encoder(k, k + m)
    columns = []
    for j in range(k):
        units = tuple(bytes([int(i == j)]) for i in range(k))
        columns.append([b[0] for b in encoder.encode(units, tuple(range(k, k + m)))])
    return np.array(columns, dtype=np.uint8).T.copy()


@pytest.mark.parametrize("k,m", [(3, 2), (8, 2), (10, 4), (16, 4)])
def test_parity_and_decode_agree_with_zfec(k, m):
    zfec = pytest.importorskip("zfec", reason="zfec not installed: pip install zfec")
    rng = np.random.default_rng(k * 7 + m)
    matrix = zfec_parity_matrix(zfec, k, m)
    codec = RSCodec(k, m, matrix=matrix)
    data = random_shards(rng, k, 256 * 1024 + 5)
    encoder = zfec.Encoder(k, k + m)

    parity = codec.encode(data)

    expected = encoder.encode(tuple(data), tuple(range(k, k + m)))
    for i in range(m):
        assert np.array_equal(parity[i], np.frombuffer(expected[i], dtype=np.uint8)), f"parity {i}"
    # zfec rebuilds the first m data shards from ckpt's parity. Check blocks go in the lost
    # primaries' slots: given a primary away from its own index, zfec moves its bytes.
    blocks = tuple(bytes(p) for p in parity) + tuple(bytes(d) for d in data[m:])
    primaries = zfec.Decoder(k, k + m).decode(blocks, tuple(range(k, k + m)) + tuple(range(m, k)))
    for j in range(m):
        assert np.array_equal(np.frombuffer(primaries[j], dtype=np.uint8), data[j]), f"zfec, shard {j}"
