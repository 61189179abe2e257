"""The codec's CUDA kernel (ckpt._ec_cuda) on a real GPU: the same bytes as the CPU kernels.

Run on a GPU machine: `pytest -m gpu tests/gpu/test_ec_cuda.py`. Skipped (by
tests/conftest.py) where no CUDA device is usable.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

torch = pytest.importorskip("torch")
_ec_cuda = pytest.importorskip("ckpt._ec_cuda")
from ckpt.errors import CodecError  # noqa: E402
from ckpt.redundancy import RSCodec  # noqa: E402

pytestmark = pytest.mark.gpu


def _gpu(arrays: list[np.ndarray]) -> list[torch.Tensor]:
    return [torch.from_numpy(a).cuda() for a in arrays]


def _host(tensors: list[torch.Tensor]) -> list[np.ndarray]:
    torch.cuda.synchronize()
    return [t.cpu().numpy() for t in tensors]


def test_available_agrees_with_torch() -> None:
    assert _ec_cuda.available()
    assert _ec_cuda.device_count() == torch.cuda.device_count()


@pytest.mark.parametrize("k,m", [(4, 2), (8, 2), (10, 4), (12, 6), (3, 9), (100, 28)])
@pytest.mark.parametrize("n", [0, 1, 15, 16, 17, 4096, 1_000_003])
def test_gpu_parity_equals_cpu_parity(k: int, m: int, n: int) -> None:
    rng = np.random.default_rng(k * 1000 + m + n)
    data = [rng.integers(0, 256, n, dtype=np.uint8) for _ in range(k)]
    codec = RSCodec(k, m)
    want = codec.encode(data)
    got = _host(codec.encode(_gpu(data)))
    for a, b in zip(got, want):
        assert (a == b).all(), (k, m, n)


def test_every_coefficient_on_the_gpu_matches_the_cpu() -> None:
    rng = np.random.default_rng(1)
    src = rng.integers(0, 256, 4096 + 3, dtype=np.uint8)
    coefs = bytes(range(256))
    cpu = [np.empty(src.size, np.uint8) for _ in range(256)]
    from ckpt import _ec

    _ec.Plan(coefs, 256, 1, "scalar").apply([src], cpu)
    s = torch.from_numpy(src).cuda()
    out = [torch.empty(src.size, dtype=torch.uint8, device="cuda") for _ in range(256)]
    _ec_cuda.dot(coefs, 256, 1, [s.data_ptr()], [o.data_ptr() for o in out], src.size,
                 torch.cuda.current_stream().cuda_stream, False, 0)
    for c, (g, w) in enumerate(zip(_host(out), cpu)):
        assert (g == w).all(), c


def test_unaligned_device_pointers_take_the_byte_path_and_agree() -> None:
    rng = np.random.default_rng(2)
    k, m, n = 5, 3, 10_001
    data = [rng.integers(0, 256, n, dtype=np.uint8) for _ in range(k)]
    big = torch.from_numpy(np.concatenate([np.zeros(3, np.uint8)] + data)).cuda()
    views = [big[3 + j * n: 3 + (j + 1) * n] for j in range(k)]  # odd offsets
    codec = RSCodec(k, m)
    for a, b in zip(_host(codec.encode(views)), codec.encode(data)):
        assert (a == b).all()


def test_gpu_decode_rebuilds_every_pattern_of_a_small_code() -> None:
    rng = np.random.default_rng(3)
    k, m, n = 6, 3, 65_537
    codec = RSCodec(k, m)
    data = [rng.integers(0, 256, n, dtype=np.uint8) for _ in range(k)]
    shards = data + codec.encode(data)
    gshards = _gpu(shards)
    for lost in itertools.combinations(range(k + m), m):
        damaged = [None if i in lost else s for i, s in enumerate(gshards)]
        for i, r in zip(lost, _host(codec.decode(damaged))):
            assert (r == shards[i]).all(), lost


def test_gpu_update_and_fold_equal_reencoding() -> None:
    rng = np.random.default_rng(4)
    k, m, n = 8, 3, 300_000
    codec = RSCodec(k, m)
    data = [rng.integers(0, 256, n, dtype=np.uint8) for _ in range(k)]
    parity = _gpu(codec.encode(data))
    new = rng.integers(0, 256, n, dtype=np.uint8)
    codec.update(parity, 2, torch.from_numpy(data[2]).cuda(), torch.from_numpy(new).cuda())
    data[2] = new
    for a, b in zip(_host(parity), codec.encode(data)):
        assert (a == b).all()
    folded = [torch.zeros(n, dtype=torch.uint8, device="cuda") for _ in range(m)]
    for j in reversed(range(k)):
        codec.fold(folded, j, torch.from_numpy(data[j]).cuda())
    for a, b in zip(_host(folded), codec.encode(data)):
        assert (a == b).all()


def test_gpu_runs_on_the_current_stream_after_the_producer() -> None:
    n = 64 << 20
    codec = RSCodec(4, 2)
    data = [torch.zeros(n, dtype=torch.uint8, device="cuda") for _ in range(4)]
    torch.cuda._sleep(50_000_000)
    for d in data:
        d.fill_(7)  # queued behind the sleep on the current stream
    parity = codec.encode(data)
    want = codec.encode([np.full(16, 7, np.uint8)] * 4)
    torch.cuda.synchronize()
    assert (parity[0][:16].cpu().numpy() == want[0]).all()


def test_mixed_devices_and_non_contiguous_tensors_are_refused() -> None:
    codec = RSCodec(2, 1)
    g = torch.zeros(64, dtype=torch.uint8, device="cuda")
    with pytest.raises(CodecError, match="one device"):
        codec.encode([g, torch.zeros(64, dtype=torch.uint8)])
    with pytest.raises(CodecError, match="contiguous"):
        codec.encode([g, torch.zeros(128, dtype=torch.uint8, device="cuda")[::2]])
    with pytest.raises(CodecError, match="same length"):
        codec.encode([g, torch.zeros(65, dtype=torch.uint8, device="cuda")])
