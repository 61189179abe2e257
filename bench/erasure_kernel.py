"""How fast is the codec's native kernel alone, without the Python call around it?

Question: at each kernel level, how many GB/s of data does ``ckpt._ec.Plan.apply`` reach on
one thread for RS(k, m) encode, by data size (from L1-sized to L2-sized), next to a numpy
copy of the same bytes measured in the same run? ``bench/erasure.py`` times the end-to-end
``RSCodec`` call; the difference is the fixed cost of that call (~1 us).

    python bench/erasure_kernel.py [--codes 8,2] [--isas avx2,gfni] [--sizes-kib 32,128,256,1024]
    python bench/erasure_kernel.py --overhead [--codes 8,2]

Best of 7 samples of 200 calls each, after 20 warm-up calls. Prints a table and one JSON
line per measurement. ``--overhead`` instead times the fixed cost of one call on 64-byte
shards (the kernel's own work is a few ns): ``Plan.apply``, ``RSCodec.encode(out=)`` and
``RSCodec.decode(out=)`` with m data shards lost; median and best of 7 samples of 20000 calls.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import numpy as np

from ckpt import _ec
from ckpt.redundancy import RSCodec
from erasure import prefaulted  # bench/erasure.py: buffers placed for a fair memcpy ceiling


def best_call_s(fn, calls: int = 200, samples: int = 7) -> float:
    for _ in range(20):
        fn()
    best = float("inf")
    for _ in range(samples):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls)
    return best


def call_us(fn, calls: int = 20000, samples: int = 7) -> tuple[float, float]:
    """(median, best) microseconds per call."""
    for _ in range(1000):
        fn()
    per_call = []
    for _ in range(samples):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        per_call.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(per_call), min(per_call)


def overhead(codes: list[tuple[int, int]], isa: str) -> None:
    print(f"{'code':9s} {'call':14s} {'median us':>9s} {'best us':>8s}")
    for k, m in codes:
        data = [np.zeros(64, np.uint8) for _ in range(k)]
        parity = [np.zeros(64, np.uint8) for _ in range(m)]
        rebuilt = [np.zeros(64, np.uint8) for _ in range(m)]
        shards = [None] * m + data[m:] + parity  # the first m data shards lost
        plan = _ec.Plan(_ec.cauchy_matrix(k, m), m, k, isa)
        codec = RSCodec(k, m, threads=1, isa=isa)
        calls = {"Plan.apply": lambda: plan.apply(data, parity),
                 "RSCodec.encode": lambda: codec.encode(data, out=parity),
                 "RSCodec.decode": lambda: codec.decode(shards, out=rebuilt)}
        for name, fn in calls.items():
            median_us, best_us = call_us(fn)
            print(f"RS({k},{m})".ljust(9), f"{name:14s} {median_us:9.3f} {best_us:8.3f}")
            print(json.dumps({"bench": "erasure_call_overhead", "code": f"RS({k},{m})", "isa": isa,
                              "call": name, "shard_bytes": 64, "median_us": median_us, "best_us": best_us,
                              "python": platform.python_version(), "numpy": np.__version__}))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--codes", default="8,2", help="k,m pairs separated by ';'")
    p.add_argument("--isas", default=",".join(_ec.available_isas()))
    p.add_argument("--sizes-kib", default="32,128,256,1024", help="data sizes (k shards together)")
    p.add_argument("--overhead", action="store_true", help="time the fixed cost of a call instead")
    args = p.parse_args()
    codes = [tuple(int(x) for x in c.split(",")) for c in args.codes.split(";")]
    if args.overhead:
        overhead(codes, _ec.default_isa())
        return 0
    print(f"{'code':9s} {'isa':7s} {'data KiB':>8s} {'kernel GB/s':>11s} {'memcpy GB/s':>11s} {'ratio':>6s}")
    for k, m in codes:
        for size_kib in (int(s) for s in args.sizes_kib.split(",")):
            shard = size_kib * 1024 // k // 64 * 64
            data = prefaulted(k * shard)
            data[:] = np.random.default_rng(0).integers(0, 256, k * shard, dtype=np.uint8)
            shards = [data[j * shard:(j + 1) * shard] for j in range(k)]
            parity = [prefaulted(shard) for _ in range(m)]
            copy_dst = prefaulted(data.nbytes, like=data)
            memcpy_gbps = data.nbytes / best_call_s(lambda: np.copyto(copy_dst, data)) / 1e9
            for isa in args.isas.split(","):
                plan = _ec.Plan(_ec.cauchy_matrix(k, m), m, k, isa)
                gbps = data.nbytes / best_call_s(lambda: plan.apply(shards, parity, False, 1)) / 1e9
                print(f"RS({k},{m})".ljust(9), f"{isa:7s} {size_kib:8d} {gbps:11.2f} "
                      f"{memcpy_gbps:11.2f} {gbps / memcpy_gbps:6.2f}")
                print(json.dumps({"bench": "erasure_kernel", "code": f"RS({k},{m})", "isa": isa,
                                  "data_bytes": int(data.nbytes), "threads": 1, "gbps": gbps,
                                  "memcpy_gbps": memcpy_gbps, "vs_memcpy": gbps / memcpy_gbps,
                                  "machine": platform.processor() or platform.machine(),
                                  "python": platform.python_version(), "numpy": np.__version__}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
