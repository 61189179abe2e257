"""How fast are crc32c and the copy engine, and what does fusing the crc cost?

Question: is copy + crc32c (fused, one pass) within ~15% of a plain memcpy on one
thread, wherever the destination sits relative to the source (a sweep over
(dst - src) % 4096 finds 4 KiB-aliasing stalls)? And in cache (256 KiB blocks, as many
small tensors are), do the engine's plain and verified (restore) copies avoid the cliff
of libc's memmove, called through ctypes in the same run, at short distances? Prints
tables and one JSON line. Destinations are pre-faulted (written once before timing), as
snapshot segments are.

    PYTHONPATH=src python bench/copy_engine.py [--gib 1] [--repeats 3]

Each crc implementation / fuse mode is chosen once per process, so the script
re-runs itself in child processes with CKPT_CRC_IMPL / CKPT_FUSE_MODE set: "default"
is what ckpt picks on this CPU (folding with VPCLMULQDQ where the CPU has it), the
sse4.2 rows cap it at the crc32 instruction.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np


def best_s(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure(nbytes: int, repeats: int) -> dict:
    """Runs in a child: every measurement for this process's crc impl and fuse mode."""
    from ckpt import _C

    src = np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8)
    dst = np.ones(nbytes, dtype=np.uint8)  # pre-faulted
    chunk_bytes = 4 << 20
    ncrc = _C.num_chunks([nbytes], chunk_bytes)
    crcs = np.zeros(ncrc, dtype=np.uint32)
    jobs = [(src.ctypes.data, dst.ctypes.data, nbytes)]
    out: dict = {"impl": _C.crc32c_impl(), "fuse": _C._fuse_mode()}
    out["crc_gbps"] = nbytes / best_s(lambda: _C.crc32c_addr(src.ctypes.data, nbytes), repeats) / 1e9
    for threads in (1, 2):
        with _C.CopyEngine(threads) as eng:
            copy_s = best_s(lambda: eng.submit(jobs, chunk_bytes, 0).wait(60), repeats)
            fused_s = best_s(lambda: eng.submit(jobs, chunk_bytes, crcs.ctypes.data).wait(60), repeats)
        out[f"memcpy_gbps_t{threads}"] = nbytes / copy_s / 1e9
        out[f"copy_crc_gbps_t{threads}"] = nbytes / fused_s / 1e9
    assert np.array_equal(src, dst)
    assert int(crcs[0]) == _C.crc32c(memoryview(src)[:chunk_bytes])
    out.update(by_offset(src, chunk_bytes, repeats))
    return out


# (dst - src) % 4096 for the offset sweep: where streaming stores and 4 KiB aliasing meet.
OFFSETS = (0, 8, 16, 64, 128, 192, 256, 512, 1024, 2048, 4032, 4080, 4088)


def by_offset(src: np.ndarray, chunk_bytes: int, repeats: int) -> dict:
    """One thread, fused copy and memcpy, for each relative placement of dst and src."""
    from ckpt import _C

    nbytes = min(src.nbytes, 256 << 20)
    dst = np.ones(nbytes + 8192, dtype=np.uint8)
    s0, d0 = src.ctypes.data, -(-dst.ctypes.data // 4096) * 4096 + src.ctypes.data % 4096
    crcs = np.zeros(_C.num_chunks([nbytes], chunk_bytes), dtype=np.uint32)
    fused, plain = {}, {}
    with _C.CopyEngine(1) as eng:
        for off in OFFSETS:
            jobs = [(s0, d0 + off, nbytes)]
            plain[off] = nbytes / best_s(lambda: eng.submit(jobs, chunk_bytes, 0).wait(60), repeats) / 1e9
            fused[off] = nbytes / best_s(
                lambda: eng.submit(jobs, chunk_bytes, crcs.ctypes.data).wait(60), repeats) / 1e9
            assert int(crcs[0]) == _C.crc32c(memoryview(src)[:chunk_bytes])
    return {"copy_crc_gbps_t1_by_offset": fused, "memcpy_gbps_t1_by_offset": plain,
            "copy_crc_gbps_t1_worst_offset": min(fused.values()),
            "memcpy_gbps_t1_worst_offset": min(plain.values())}


# (dst - src) % 4096 for the in-cache sweep: glibc's rep movsb is slow at 1..63 on Zen 3.
IN_CACHE_OFFSETS = (0, 1, 8, 16, 31, 32, 48, 63, 64, 128, 2048, 4095)


def in_cache_by_offset(repeats: int, block_bytes: int = 256 << 10, jobs: int = 32) -> dict:
    """GB/s of one thread copying one in-cache block `jobs` times per call, by placement:
    libc memmove (ctypes) next to the engine's plain copy and verified copy."""
    import ctypes

    from ckpt import _C

    src = np.random.default_rng(1).integers(0, 255, block_bytes, dtype=np.uint8)
    dst = np.ones(block_bytes + 8192, dtype=np.uint8)
    expected = np.array([_C.crc32c(src)] * jobs, dtype=np.uint32)
    actual = np.zeros(jobs, dtype=np.uint32)
    s0 = src.ctypes.data
    d_base = -(-dst.ctypes.data // 4096) * 4096 + s0 % 4096
    rows = {}
    with _C.CopyEngine(1) as eng:
        for off in IN_CACHE_OFFSETS:
            d0 = d_base + off
            batch = [(s0, d0, block_bytes)] * jobs

            def libc() -> None:
                for _ in range(jobs):
                    ctypes.memmove(d0, s0, block_bytes)

            runs = {"libc_memmove": libc,
                    "engine_copy": lambda: eng.submit(batch, 1 << 30, 0).wait(60),
                    "engine_verified_copy": lambda: eng.verified_copy(
                        batch, 1 << 30, expected.ctypes.data, actual.ctypes.data).wait(60)}
            rows[off] = {name: jobs * block_bytes / best_s(run, repeats) / 1e9
                         for name, run in runs.items()}
            out = np.frombuffer((ctypes.c_uint8 * block_bytes).from_address(d0), dtype=np.uint8)
            assert np.array_equal(out, src) and (actual == expected).all()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    nbytes = int(args.gib * (1 << 30))
    if args.child:
        print(json.dumps(measure(nbytes, args.repeats)))
        return
    variants = {"default": {}, "sse4.2 inline": {"CKPT_CRC_IMPL": "sse4.2"},
                "sse4.2 blocked": {"CKPT_CRC_IMPL": "sse4.2", "CKPT_FUSE_MODE": "blocked"},
                "scalar": {"CKPT_CRC_IMPL": "scalar"}}
    rows = {}
    for label, env in variants.items():
        res = subprocess.run([sys.executable, __file__, "--child", "--gib", str(args.gib),
                              "--repeats", str(args.repeats)], env={**os.environ, **env},
                             check=True, capture_output=True, text=True)
        rows[label] = json.loads(res.stdout.strip().splitlines()[-1])
    cols = ["crc_gbps", "memcpy_gbps_t1", "copy_crc_gbps_t1", "memcpy_gbps_t2", "copy_crc_gbps_t2",
            "memcpy_gbps_t1_worst_offset", "copy_crc_gbps_t1_worst_offset"]
    heads = [c.replace("_worst_offset", "_worst") for c in cols]
    print(f"{'variant':16s} " + " ".join(f"{c:>17s}" for c in heads))
    for label, r in rows.items():
        print(f"{label:16s} " + " ".join(f"{r[c]:17.2f}" for c in cols))
    print("\nfused copy + crc, 1 thread, GB/s by (dst - src) % 4096:")
    print(f"{'variant':16s} " + " ".join(f"{o:>6d}" for o in OFFSETS))
    for label, r in rows.items():
        print(f"{label:16s} " + " ".join(f"{r['copy_crc_gbps_t1_by_offset'][str(o)]:6.2f}"
                                         for o in OFFSETS))
    cache_rows = in_cache_by_offset(max(args.repeats, 5))
    print("\nin cache: one thread copying a 256 KiB block 32 times, GB/s by (dst - src) % 4096:")
    names = ("libc_memmove", "engine_copy", "engine_verified_copy")
    print(f"{'offset':>6s} " + " ".join(f"{n:>21s}" for n in names))
    for off, r in cache_rows.items():
        print(f"{off:6d} " + " ".join(f"{r[n]:21.2f}" for n in names))
    worst = {n: min(r[n] for r in cache_rows.values()) for n in names}
    best = {n: max(r[n] for r in cache_rows.values()) for n in names}
    print("worst / best placement: " + ", ".join(f"{n} {worst[n]:.2f} / {best[n]:.2f}" for n in names))
    default = rows["default"]  # what ckpt picks on this CPU (its "impl" says which)
    summary = {
        "bench": "copy_engine", "bytes": nbytes, "machine": platform.machine(),
        "cpus": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__,
        "results": rows,
        "crc_hw_over_scalar": rows["sse4.2 inline"]["crc_gbps"] / rows["scalar"]["crc_gbps"],
        "crc_default_over_sse42": default["crc_gbps"] / rows["sse4.2 inline"]["crc_gbps"],
        "fused_default_over_sse42_t1": (default["copy_crc_gbps_t1"]
                                        / rows["sse4.2 inline"]["copy_crc_gbps_t1"]),
        "fused_over_memcpy_t1": default["copy_crc_gbps_t1"] / default["memcpy_gbps_t1"],
        "fused_over_memcpy_t2": default["copy_crc_gbps_t2"] / default["memcpy_gbps_t2"],
        "in_cache_gbps_by_offset": cache_rows,
        "in_cache_worst_over_best": {n: worst[n] / best[n] for n in names},
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
