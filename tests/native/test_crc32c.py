"""crc32c: known vectors, the hardware path against the scalar oracle, combine."""

from __future__ import annotations

import os
import platform
import random
import subprocess
import sys

import numpy as np
import pytest

from ckpt import _C

# Known crc32c values (RFC 3720 appendix B.4 and the usual check string).
VECTORS = [
    (b"", 0x00000000),
    (b"a", 0xC1D04330),
    (b"123456789", 0xE3069283),
    (bytes(32), 0x8A9136AA),
    (b"\xff" * 32, 0x62A8AB43),
    (bytes(range(32)), 0x46DD794E),
    (bytes(range(31, -1, -1)), 0x113FDB5C),
]


@pytest.mark.parametrize("data,expected", VECTORS)
def test_crc32c_matches_known_vectors(data: bytes, expected: int) -> None:
    assert _C.crc32c(data) == expected
    assert _C._crc32c_scalar(data) == expected


def _crc_instruction() -> tuple[str, bool]:
    """(name of the hardware path, whether this CPU has it), read the way the kernel
    reports it: cpuinfo flags on x86-64, the AT_HWCAP word of the auxiliary vector
    (what getauxval reads) on aarch64."""
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64"):
        with open("/proc/cpuinfo") as f:
            flags = set(next(line for line in f if line.startswith("flags")).split())
        folds = {"avx512f", "vpclmulqdq", "pclmulqdq"} <= flags
        capped = os.environ.get("CKPT_CRC_IMPL") == "sse4.2"
        return ("vpclmulqdq" if folds and not capped else "sse4.2"), "sse4_2" in flags
    if machine in ("aarch64", "arm64"):
        with open("/proc/self/auxv", "rb") as f:
            auxv = np.frombuffer(f.read(), dtype=np.uint64).reshape(-1, 2)
        at_hwcap, hwcap_crc32 = 16, 1 << 7
        return "armv8-crc", bool(int(auxv[auxv[:, 0] == at_hwcap][0, 1]) & hwcap_crc32)
    return "none", False


def test_crc32c_impl_follows_the_cpu_and_the_env_override() -> None:
    name, present = _crc_instruction()
    forced = os.environ.get("CKPT_CRC_IMPL") == "scalar"
    assert _C.crc32c_impl() == (name if present and not forced else "scalar")


def test_hardware_crc_equals_scalar_on_random_lengths_and_unaligned_starts() -> None:
    rng = random.Random(1234)
    buf = np.random.default_rng(5).integers(0, 256, 70_000 + 64, dtype=np.uint8).tobytes()
    lengths = [0, 1, 7, 8, 9, 255, 256, 767, 768, 769, 24_575, 24_576, 24_577, 70_000]
    lengths += [rng.randrange(0, 70_001) for _ in range(60)]
    for n in lengths:
        start = rng.randrange(0, 16)
        view = memoryview(buf)[start : start + n]
        assert _C.crc32c(view) == _C._crc32c_scalar(view), (n, start)


def test_every_length_around_the_folding_rounds_equals_scalar_at_any_start() -> None:
    # Runs of 2 KiB and more are folded 256 bytes a round; the rest of a run, and
    # shorter runs, take the crc32 instruction. Every split between the two, every start.
    buf = np.random.default_rng(6).integers(0, 256, 8192 + 64, dtype=np.uint8).tobytes()
    for n in list(range(1792, 2816)) + [4095, 4096, 4097, 8191, 8192]:
        start = n % 64
        view = memoryview(buf)[start:start + n]
        assert _C.crc32c(view) == _C._crc32c_scalar(view), (n, start)
        assert _C.crc32c(view, 0x12345678) == _C._crc32c_scalar(view, 0x12345678), n


def test_crc32c_continues_from_a_previous_value() -> None:
    data = os.urandom(100_003)
    whole = _C.crc32c(data)
    for cut in (0, 1, 50_000, 100_003):
        assert _C.crc32c(data[cut:], _C.crc32c(data[:cut])) == whole


def test_crc32c_combine_joins_two_crcs() -> None:
    a, b = os.urandom(12_345), os.urandom(70_001)
    assert _C.crc32c_combine(_C.crc32c(a), _C.crc32c(b), len(b)) == _C.crc32c(a + b)
    assert _C.crc32c_combine(_C.crc32c(a), _C.crc32c(b""), 0) == _C.crc32c(a)


@pytest.mark.parametrize("data,expected", VECTORS)
def test_the_gpu_split_algorithm_matches_known_vectors(data: bytes, expected: int) -> None:
    for parts in (1, 2, 256):
        assert _C.crc32c_split(data, parts) == expected


def test_the_gpu_split_algorithm_equals_crc32c_for_any_length_start_and_split() -> None:
    """crc32c_split.h is what cuda_crc.cu runs per chunk (one piece per thread, joined by
    one thread): pieces of 4-byte multiples, empty trailing pieces, unaligned starts."""
    rng = random.Random(3)
    data = os.urandom((4 << 20) + 64)
    lengths = [1, 3, 4, 5, 255, 256, 1023, 1024, 1025, 4096 * 256 - 4, 4 << 20] + \
        [rng.randrange(1, 1 << 20) for _ in range(12)]
    for n in lengths:
        for parts in (1, 3, 64, 256, 1024):
            start = rng.randrange(4)
            view = memoryview(data)[start:start + n]
            assert _C.crc32c_split(view, parts) == _C.crc32c(view), (n, parts, start)
    with pytest.raises(_C.NativeError, match="parts must be between 1 and 4096"):
        _C.crc32c_split(b"abc", 0)


def test_crc32c_addr_reads_raw_memory_and_accepts_numpy() -> None:
    arr = np.frombuffer(os.urandom(4099), dtype=np.uint8).copy()
    assert _C.crc32c_addr(arr.ctypes.data, arr.nbytes) == _C.crc32c(arr) == _C.crc32c(arr.tobytes())
    assert _C.crc32c_addr(0, 0) == 0


def test_crc32c_rejects_bad_input_with_native_error() -> None:
    with pytest.raises(_C.NativeError, match="contiguous buffer"):
        _C.crc32c("text is not bytes")
    with pytest.raises(_C.NativeError, match="nbytes"):
        _C.crc32c_addr(1, -5)
    with pytest.raises(_C.NativeError, match="null"):
        _C.crc32c_addr(0, 10)
    noncontig = np.arange(100, dtype=np.uint8)[::2]
    with pytest.raises(_C.NativeError):
        _C.crc32c(noncontig)


def test_native_error_is_the_ckpt_error_class() -> None:
    from ckpt import errors

    assert _C.NativeError is errors.NativeError
    assert issubclass(_C.NativeError, RuntimeError)


@pytest.mark.parametrize("impl", ["scalar", "sse4.2"])
def test_native_suite_passes_with_the_crc_capped(impl: str) -> None:
    if os.environ.get("CKPT_CRC_IMPL"):
        pytest.skip("already a capped run")
    if impl == "sse4.2" and _C.crc32c_impl() != "vpclmulqdq":
        pytest.skip("no folding on this CPU: the default run is the sse4.2 (or scalar) run")
    here = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "CKPT_CRC_IMPL": impl}
    check = subprocess.run([sys.executable, "-c", "from ckpt import _C; print(_C.crc32c_impl())"],
                           env=env, capture_output=True, text=True, check=True)
    assert check.stdout.strip() == impl
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
         os.path.join(here, "test_crc32c.py"), os.path.join(here, "test_copy_engine.py")],
        env=env, capture_output=True, text=True, timeout=240,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


def test_cuda_extension_imports_without_a_gpu() -> None:
    # Built where nvcc exists; importing must not need a GPU or a driver.
    _C_cuda = pytest.importorskip("ckpt._C_cuda")
    assert isinstance(_C_cuda.available(), bool)
    assert _C_cuda.device_count() >= 0
    if not _C_cuda.available():
        with pytest.raises(_C_cuda.NativeError, match="no usable CUDA device"):
            _C_cuda.CudaCopier(0)


def test_the_scalar_oracle_refuses_a_strided_view_instead_of_reading_past_it() -> None:
    data = bytes(range(256)) * 4
    with pytest.raises(_C.NativeError, match="contiguous"):
        _C._crc32c_scalar(memoryview(data)[::2])
