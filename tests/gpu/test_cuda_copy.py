"""ckpt._C_cuda on a real GPU: D2H/H2D copies on a side stream, ordered by events.

Run on a GPU machine: `pytest -m gpu tests/gpu`. Skipped (by tests/conftest.py)
where no CUDA device is usable.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
_C_cuda = pytest.importorskip("ckpt._C_cuda")
from ckpt import _C  # noqa: E402

pytestmark = pytest.mark.gpu


def _pinned_host(nbytes: int) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8).pin_memory()


def test_available_and_device_count_agree_with_torch() -> None:
    assert _C_cuda.available()
    assert _C_cuda.device_count() == torch.cuda.device_count()


def test_d2h_waits_for_compute_stream_and_copies_exactly() -> None:
    n = 64 << 20
    compute = torch.cuda.current_stream()
    side = torch.cuda.Stream()
    src = torch.zeros(n // 4, dtype=torch.float32, device="cuda")
    # Queue slow work on the compute stream that produces the bytes to copy: the
    # copy must see its result, not the zeros, because the side stream waits on it.
    torch.cuda._sleep(50_000_000)
    src.add_(torch.arange(n // 4, device="cuda", dtype=torch.float32))
    dst = _pinned_host(n)
    ticket = _C_cuda.CudaCopier(0).d2h([(src.data_ptr(), dst.data_ptr(), n)], side.cuda_stream, compute.cuda_stream)
    assert ticket.bytes_total == n
    assert ticket.wait(60.0)
    assert ticket.done()
    expected = torch.arange(n // 4, dtype=torch.float32).numpy().view(np.uint8)
    assert np.array_equal(dst.numpy(), expected)


def test_make_stream_wait_orders_compute_after_copy_without_blocking_host() -> None:
    n = 32 << 20
    side = torch.cuda.Stream()
    compute = torch.cuda.current_stream()
    src = torch.full((n,), 3, dtype=torch.uint8, device="cuda")
    dst = _pinned_host(n)
    torch.cuda.synchronize()  # the 3s are in place: the copy below does not wait for compute
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)  # delay the copy on the side stream
    ticket = _C_cuda.CudaCopier(0).d2h([(src.data_ptr(), dst.data_ptr(), n)], side.cuda_stream, None)
    ticket.make_stream_wait(compute.cuda_stream)
    assert not ticket.done()  # the host was not blocked
    src.fill_(9)  # on compute: must run after the copy read the 3s
    torch.cuda.synchronize()
    assert ticket.done()
    assert int(dst[0]) == 3 and int(dst[-1]) == 3
    assert int(src[0].item()) == 9


def test_h2d_into_registered_shm_round_trips_bytes() -> None:
    n = 8 << 20
    host = np.random.default_rng(0).integers(0, 256, n, dtype=np.uint8)
    _C_cuda.host_register(host.ctypes.data, n)
    try:
        dev = torch.empty(n, dtype=torch.uint8, device="cuda")
        side = torch.cuda.Stream()
        t = _C_cuda.CudaCopier(0).h2d([(host.ctypes.data, dev.data_ptr(), n)], side.cuda_stream,
                                      torch.cuda.current_stream().cuda_stream)
        assert t.wait(60.0)
        assert np.array_equal(dev.cpu().numpy(), host)
        assert _C.crc32c(dev.cpu().numpy()) == _C.crc32c(host)
    finally:
        _C_cuda.host_unregister(host.ctypes.data)


def test_bad_device_and_null_addresses_raise_native_error() -> None:
    with pytest.raises(_C_cuda.NativeError, match="devices"):
        _C_cuda.CudaCopier(torch.cuda.device_count() + 5)
    side = torch.cuda.Stream()
    with pytest.raises(_C_cuda.NativeError, match="null"):
        _C_cuda.CudaCopier(0).d2h([(0, 1, 8)], side.cuda_stream, None)
    with pytest.raises(_C_cuda.NativeError, match="side_stream"):
        _C_cuda.CudaCopier(0).d2h([], 0, None)
    with pytest.raises(_C_cuda.NativeError, match="cudaHostUnregister"):
        _C_cuda.host_unregister(12345678)


def test_d2h_checksums_every_chunk_on_the_device_like_the_cpu_engine() -> None:
    """crc_out gets one crc32c per chunk_bytes-chunk of each source, in job order, each job
    starting a new chunk: the numbering CopyEngine.submit uses for CPU tensors."""
    chunk = 1 << 20
    sizes = [3 * chunk, chunk + 5, 17, 4 * chunk - 4]
    gen = torch.Generator(device="cuda").manual_seed(0)
    base = torch.randint(0, 256, (sum(sizes) + 64,), dtype=torch.uint8, device="cuda", generator=gen)
    starts = [1, 3 * chunk + 8, 4 * chunk + 40, 4 * chunk + 61]  # unaligned device sources too
    srcs = [base[s:s + n] for s, n in zip(starts, sizes)]
    dst = _pinned_host(sum(sizes))
    chunks = [-(-n // chunk) for n in sizes]
    crcs = torch.zeros(sum(chunks), dtype=torch.int32).pin_memory()
    jobs, off = [], 0
    for t in srcs:
        jobs.append((t.data_ptr(), dst.data_ptr() + off, t.numel()))
        off += t.numel()
    side = torch.cuda.Stream()
    ticket = _C_cuda.CudaCopier(0).d2h(jobs, side.cuda_stream, torch.cuda.current_stream().cuda_stream,
                                       chunk, crcs.data_ptr())
    assert ticket.wait(60.0)
    host = dst.numpy()
    want, off = [], 0
    for n in sizes:
        want += [_C.crc32c(host[off + c:off + min(c + chunk, n)]) for c in range(0, n, chunk)]
        off += n
    assert crcs.numpy().view(np.uint32).tolist() == want
    assert np.array_equal(host, torch.cat(srcs).cpu().numpy())
    with pytest.raises(_C_cuda.NativeError, match="both chunk_bytes and crc_out"):
        _C_cuda.CudaCopier(0).d2h(jobs, side.cuda_stream, None, chunk, 0)
    with pytest.raises(_C_cuda.NativeError, match="multiple of 4"):
        _C_cuda.CudaCopier(0).d2h(jobs, side.cuda_stream, None, 6, crcs.data_ptr())
