"""How fast is ckpt's Reed-Solomon codec next to memcpy and the codecs people would pick?

Question: on the same data, in one run, how many GB/s of data (k x shard bytes / time)
do ckpt's encode and decode (m data shards lost, the expensive case) reach at each kernel
level and on 1 and 2 threads, against the memcpy ceiling (numpy copy of the same bytes
into a pre-faulted buffer), pyeclib (`isa_l_rs_cauchy`, `liberasurecode_rs_vand`; the
end-to-end Python call), zfec and reedsolo (pure Python: measured on a small input and
extrapolated, labelled so)? Codes RS(4,2), RS(8,2), RS(10,4); data in cache (256 KiB of
data) and in DRAM (>= 1 GiB of data). Each figure is the best of N timed samples after a
warm-up; in-cache samples loop over enough calls to last a few milliseconds. In cache N is
60 by default: on the shared CI VM the vector throughput halves for seconds at a time
(a fixed shuffle/xor loop measured 5 and 11 ops/ns within a minute; presumably a neighbour
on the same physical core), so a handful of 3 ms samples often sees no undisturbed stretch.

    python bench/erasure.py [--dram-gib 1] [--repeats 60] [--quick]

Prints a table per (code, place), the targets of issue 3 (met / not met), and one JSON
line per measurement with the machine and the versions. Outputs are checked after
timing: ckpt's parity must equal pyeclib isa_l_rs_cauchy's fragment payloads, and every
decoder must give back the lost shards.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import metadata
from typing import Callable

import numpy as np

CACHE_DATA_BYTES = 256 << 10
REEDSOLO_DATA_BYTES = 8 << 10  # reedsolo runs ~35 us per 6-byte codeword: keep it small
SAMPLE_MIN_S = 0.003  # in-cache samples repeat the call until one sample lasts this long
SAMPLES_BUDGET_S = 12.0  # a slow codec on 1 GiB gets fewer samples (never fewer than 2)
PYECLIB_HEADER_BYTES = 80
CODES = ((4, 2), (8, 2), (10, 4))
FLAGS_OF_INTEREST = ("ssse3", "avx2", "avx512f", "avx512bw", "avx512vbmi", "gfni", "vaes", "vpclmulqdq")

# Targets of issue 3 (GB/s of data).
TARGET_CACHE_PER_CORE = {"avx2": 20.0, "gfni": 40.0}
TARGET_DRAM_RS82 = {1: 9.0, 2: 17.0}
TARGET_VS_PYECLIB = 10.0


@dataclass
class Workload:
    """One code in one place: k data shards (views of one random buffer) and what each op needs."""

    k: int
    m: int
    place: str  # "cache" | "dram"
    shard_bytes: int
    data: np.ndarray  # k * shard_bytes, contiguous; shard j = data[j*S:(j+1)*S]

    @property
    def code(self) -> str:
        return f"RS({self.k},{self.m})"

    @property
    def data_bytes(self) -> int:
        return self.k * self.shard_bytes

    @property
    def shards(self) -> list[np.ndarray]:
        s = self.shard_bytes
        return [self.data[j * s:(j + 1) * s] for j in range(self.k)]

    @property
    def lost(self) -> list[int]:
        return list(range(self.m))  # data shards: every survivor row must be inverted


@dataclass
class Result:
    codec: str
    threads: int
    op: str  # "encode" | "decode"
    seconds: float
    data_bytes: int
    note: str = ""

    @property
    def gbps(self) -> float:
        return self.data_bytes / self.seconds / 1e9


# ----------------------------------------------------------------------------- timing


def best_call_s(fn: Callable[[], object], repeats: int, min_sample_s: float) -> float:
    """Best per-call time over `repeats` samples, after one warm-up call.

    A sample loops over as many calls as it takes to last `min_sample_s` (the count is
    fixed from the warm-up), so microsecond calls are not lost in timer noise. Calls
    slower than SAMPLES_BUDGET_S / repeats get fewer samples, at least 2.
    """
    t0 = time.perf_counter()
    fn()
    warm_s = time.perf_counter() - t0
    calls = max(1, int(min_sample_s / max(warm_s, 1e-7)))
    repeats = min(repeats, max(2, int(SAMPLES_BUDGET_S / max(warm_s, 1e-7))))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls)
    return best


def prefaulted(nbytes: int, like: np.ndarray | None = None) -> np.ndarray:
    """A zeroed buffer at the same address modulo 4096 as ``like`` (default: page-aligned).

    The placement matters for the memcpy ceiling: glibc's memcpy (rep movsb for a few KiB
    up to the L2 size) runs ~14x slower on AMD Zen 3 when the destination is 1..63 bytes
    ahead of the source modulo 4 KiB, which numpy's 16-byte aligned buffers hit by chance.
    """
    raw = np.zeros(nbytes + 4096, dtype=np.uint8)
    want = 0 if like is None else like.ctypes.data % 4096
    start = (want - raw.ctypes.data) % 4096
    return raw[start:start + nbytes]


# ----------------------------------------------------------------------------- codecs
# Each bench_* returns its Results and checks its own output after timing.


def bench_memcpy(w: Workload, repeats: int, min_s: float, pool: ThreadPoolExecutor,
                 threads: tuple[int, ...]) -> list[Result]:
    """The ceiling: copy the k data shards (the same bytes) into a pre-faulted buffer."""
    dst = prefaulted(w.data_bytes, like=w.data)
    out = [Result("memcpy (numpy copy)", 1, "copy",
                  best_call_s(lambda: np.copyto(dst, w.data), repeats, min_s), w.data_bytes)]
    if 2 in threads and w.place == "dram":  # in cache, thread hand-off costs more than the copy
        half = w.data_bytes // 2
        parts = [(dst[:half], w.data[:half]), (dst[half:], w.data[half:])]

        def copy2() -> None:
            for f in [pool.submit(np.copyto, d, s) for d, s in parts]:
                f.result()

        out.append(Result("memcpy (numpy copy)", 2, "copy", best_call_s(copy2, repeats, min_s),
                          w.data_bytes, "2 Python threads, numpy releases the GIL"))
    assert np.array_equal(dst, w.data)
    return out


def bench_ckpt(w: Workload, isa: str, threads: int, repeats: int, min_s: float,
               ref_parity: list[np.ndarray] | None) -> tuple[list[Result], list[np.ndarray]]:
    from ckpt.redundancy import RSCodec

    codec = RSCodec(w.k, w.m, threads=threads, isa=isa)
    shards = w.shards
    parity = [prefaulted(w.shard_bytes) for _ in range(w.m)]
    enc_s = best_call_s(lambda: codec.encode(shards, out=parity), repeats, min_s)
    if ref_parity is not None:
        for i in range(w.m):
            assert np.array_equal(parity[i], ref_parity[i]), f"ckpt {isa} parity {i} differs from the scalar one"
    survivors: list = [None] * w.m + shards[w.m:] + parity
    rebuilt = [prefaulted(w.shard_bytes) for _ in range(w.m)]
    dec_s = best_call_s(lambda: codec.decode(survivors, lost=w.lost, out=rebuilt), repeats, min_s)
    for i in w.lost:
        assert np.array_equal(rebuilt[i], shards[i]), f"ckpt {isa} did not rebuild shard {i}"
    name = f"ckpt {isa}"
    return ([Result(name, threads, "encode", enc_s, w.data_bytes),
             Result(name, threads, "decode", dec_s, w.data_bytes)], parity)


def ckpt_call_overhead(w: Workload, isa: str, repeats: int) -> Result:
    """Fixed cost of one encode call (64-byte shards): what an in-cache figure pays per call."""
    from ckpt.redundancy import RSCodec

    codec = RSCodec(w.k, w.m, threads=1, isa=isa)
    shards = [s[:64] for s in w.shards]
    parity = [prefaulted(64) for _ in range(w.m)]
    seconds = best_call_s(lambda: codec.encode(shards, out=parity), repeats, SAMPLE_MIN_S)
    return Result(f"ckpt {isa}", 1, "call_overhead", seconds, w.k * 64, "encode of 64-byte shards")


def bench_pyeclib(w: Workload, ec_type: str, repeats: int, min_s: float,
                  ckpt_parity: list[np.ndarray] | None) -> list[Result]:
    """End-to-end Python calls: encode(bytes) -> k+m fragments; reconstruct(k survivors, lost)."""
    from pyeclib.ec_iface import ECDriver

    driver = ECDriver(k=w.k, m=w.m, ec_type=ec_type)
    blob = w.data.tobytes()  # pyeclib takes bytes; k*S bytes split into k consecutive S-byte payloads
    enc_s = best_call_s(lambda: driver.encode(blob), repeats, min_s)
    frags = driver.encode(blob)
    assert len(frags[0]) == PYECLIB_HEADER_BYTES + w.shard_bytes
    if ckpt_parity is not None and ec_type == "isa_l_rs_cauchy":
        for i in range(w.m):
            payload = np.frombuffer(frags[w.k + i], dtype=np.uint8)[PYECLIB_HEADER_BYTES:]
            assert np.array_equal(payload, ckpt_parity[i]), f"pyeclib parity {i} differs from ckpt's"
    survivors = frags[w.m:]
    dec_s = best_call_s(lambda: driver.reconstruct(survivors, w.lost), repeats, min_s)
    rebuilt = driver.reconstruct(survivors, w.lost)
    for i, frag in zip(w.lost, rebuilt):
        assert np.array_equal(np.frombuffer(frag, dtype=np.uint8)[PYECLIB_HEADER_BYTES:], w.shards[i])
    name = f"pyeclib {ec_type}"
    return [Result(name, 1, "encode", enc_s, w.data_bytes, "end-to-end Python call"),
            Result(name, 1, "decode", dec_s, w.data_bytes, "reconstruct(), end-to-end Python call")]


def bench_zfec(w: Workload, repeats: int, min_s: float) -> list[Result]:
    import zfec

    shards = tuple(w.shards)
    check_nums = tuple(range(w.k, w.k + w.m))
    encoder = zfec.Encoder(w.k, w.k + w.m)
    enc_s = best_call_s(lambda: encoder.encode(shards, check_nums), repeats, min_s)
    checks = encoder.encode(shards, check_nums)
    # Check blocks in the lost primaries' slots: zfec's decode moves the bytes of a primary block
    # that is not at its own index (it rewrote our input buffers when given them in plain order).
    blocks = tuple(checks) + tuple(shards[w.m:])
    nums = check_nums + tuple(range(w.m, w.k))
    decoder = zfec.Decoder(w.k, w.k + w.m)
    dec_s = best_call_s(lambda: decoder.decode(blocks, nums), repeats, min_s)
    primaries = decoder.decode(blocks, nums)
    for i in w.lost:
        assert np.array_equal(np.frombuffer(primaries[i], dtype=np.uint8), shards[i])
    return [Result("zfec", 1, "encode", enc_s, w.data_bytes),
            Result("zfec", 1, "decode", dec_s, w.data_bytes, "decode() returns all k primaries")]


def bench_reedsolo(w: Workload, data: np.ndarray, repeats: int) -> list[Result]:
    """reedsolo as a stripe codec: one codeword per byte column (k data symbols, m ecc).

    Measured on REEDSOLO_DATA_BYTES of data; the cost is linear in the bytes, so GB/s
    extrapolates to any size.
    """
    import reedsolo

    shard_bytes = REEDSOLO_DATA_BYTES // w.k
    columns = [bytes(c) for c in data[:w.k * shard_bytes].reshape(w.k, shard_bytes).T]
    rs = reedsolo.RSCodec(nsym=w.m)  # GF(2^8), prim 0x11d, fcr 0, generator 2
    enc_s = best_call_s(lambda: [rs.encode(c) for c in columns], repeats, 0.0)
    codewords = [rs.encode(c) for c in columns]
    for cw in codewords:
        cw[:w.m] = bytes(w.m)
    lost = w.lost
    dec_s = best_call_s(lambda: [rs.decode(cw, erase_pos=lost, only_erasures=True) for cw in codewords],
                        repeats, 0.0)
    got = rs.decode(codewords[0], erase_pos=lost, only_erasures=True)[0]
    assert bytes(got) == columns[0]
    note = f"measured on {w.k * shard_bytes} B, extrapolated"
    return [Result("reedsolo (pure Python)*", 1, "encode", enc_s, w.k * shard_bytes, note),
            Result("reedsolo (pure Python)*", 1, "decode", dec_s, w.k * shard_bytes, note)]


# ----------------------------------------------------------------------------- machine


def machine_info() -> dict:
    model, flags = platform.processor(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model in ("", platform.processor()):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    return {"cpu": model, "arch": platform.machine(), "cores": os.cpu_count(),
            "flags": [f for f in FLAGS_OF_INTEREST if f in flags],
            "loadavg_start": round(os.getloadavg()[0], 2)}


def versions() -> dict:
    out = {"python": platform.python_version(), "numpy": np.__version__}
    for dist in ("ckpt", "pyeclib", "zfec", "reedsolo"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def optional_codecs() -> dict[str, str]:
    """Which of the other codecs import here; a missing one is skipped with its reason."""
    missing = {}
    for mod in ("pyeclib.ec_iface", "zfec", "reedsolo"):
        try:
            __import__(mod)
        except ImportError as e:
            missing[mod.split(".")[0]] = str(e)
    return missing


# ----------------------------------------------------------------------------- report


def print_table(w: Workload, results: list[Result], memcpy: dict[int, float],
                pyeclib_isal: dict[str, float]) -> None:
    print(f"\n== {w.code}, {w.place}: {w.data_bytes / 2**20:.2f} MiB of data "
          f"({w.k} x {w.shard_bytes} B shards), decode with data shards {w.lost} lost ==")
    head = (f"{'codec':34s} {'thr':>3s} {'encode GB/s':>11s} {'decode GB/s':>11s} "
            f"{'enc/memcpy':>10s} {'dec/memcpy':>10s} {'enc/pyeclib':>11s} {'dec/pyeclib':>11s}")
    print(head)
    rows: dict[tuple[str, int], dict[str, Result]] = {}
    for r in results:
        if r.op != "call_overhead":
            rows.setdefault((r.codec, r.threads), {})[r.op] = r
    for (codec, thr), ops in rows.items():
        if "copy" in ops:
            print(f"{codec:34s} {thr:3d} {ops['copy'].gbps:11.4g} {'':>11s}")
            continue
        cells = []
        for op in ("encode", "decode"):
            cells.append(f"{ops[op].gbps:11.4g}" if op in ops else f"{'-':>11s}")
        for base in (lambda op: memcpy.get(thr, memcpy.get(1)), lambda op: pyeclib_isal.get(op)):
            for op in ("encode", "decode"):
                b = base(op)
                cells.append(f"{ops[op].gbps / b:10.3g}x" if op in ops and b else f"{'-':>10s} ")
        print(f"{codec:34s} {thr:3d} " + " ".join(cells))
    for r in results:
        if r.op == "call_overhead":
            print(f"{r.codec} fixed cost per call: {r.seconds * 1e6:.2f} us (encode of 64-byte shards)")
    if any(r.codec.startswith("reedsolo") for r in results):
        print(f"* reedsolo measured on {REEDSOLO_DATA_BYTES >> 10} KiB of data, extrapolated "
              "(cost is linear in the bytes)")


def json_line(w: Workload, r: Result, memcpy: dict[int, float], pyeclib_isal: dict[str, float],
              machine: dict, vers: dict) -> str:
    base_copy = memcpy.get(r.threads, memcpy.get(1))
    rec = {"bench": "erasure", "code": w.code, "k": w.k, "m": w.m, "place": w.place,
           "codec": r.codec, "threads": r.threads, "op": r.op,
           "data_bytes": r.data_bytes, "shard_bytes": r.data_bytes // w.k,
           "best_s": r.seconds, "gbps": r.gbps,
           "vs_memcpy": r.gbps / base_copy if base_copy and r.op in ("encode", "decode") else None,
           "vs_pyeclib_isa_l": (r.gbps / pyeclib_isal[r.op]) if r.op in pyeclib_isal else None,
           "note": r.note, "machine": machine, "versions": vers}
    return json.dumps(rec)


def check_targets(all_results: dict[tuple[str, str], list[Result]], default_isa: str | None) -> list[str]:
    """The targets of issue 3, each with the measured figure and met / not met."""
    lines = []

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    for (code, place), results in all_results.items():
        by = {(r.codec, r.threads, r.op): r for r in results}
        if place == "cache":
            for isa, target in TARGET_CACHE_PER_CORE.items():
                for op in ("encode", "decode"):
                    r = by.get((f"ckpt {isa}", 1, op))
                    if r is None:
                        if op == "encode":
                            lines.append(f"in cache, {isa} >= {target:g} GB/s per core, {code}: n/a "
                                         f"({isa} not available on this CPU/build)")
                        continue
                    lines.append(f"in cache, {isa} >= {target:g} GB/s per core, {code} {op}: "
                                 f"{r.gbps:.2f} -> {verdict(r.gbps >= target)}")
        if place == "dram" and code == "RS(8,2)" and default_isa:
            for thr, target in TARGET_DRAM_RS82.items():
                for op in ("encode", "decode"):
                    r = by.get((f"ckpt {default_isa}", thr, op))
                    if r is not None:
                        lines.append(f"in DRAM, RS(8,2) {op} >= {target:g} GB/s on {thr} thread(s): "
                                     f"{r.gbps:.2f} -> {verdict(r.gbps >= target)}")
        for op in ("encode", "decode"):
            py = by.get(("pyeclib isa_l_rs_cauchy", 1, op))
            for thr in (1, 2):
                r = by.get((f"ckpt {default_isa}", thr, op))
                if py is not None and r is not None:
                    ratio = r.gbps / py.gbps
                    lines.append(f">= {TARGET_VS_PYECLIB:g}x pyeclib isa_l end-to-end, {code} {place} {op}, "
                                 f"ckpt {thr} thr: {ratio:.1f}x -> {verdict(ratio >= TARGET_VS_PYECLIB)}")
    return lines


# ----------------------------------------------------------------------------- main


def make_workloads(places: list[str], codes: list[tuple[int, int]], dram_bytes: int) -> tuple[list[Workload], np.ndarray]:
    """Every workload views one random buffer, so every codec sees the same bytes."""
    specs = []
    for place in places:
        target = CACHE_DATA_BYTES if place == "cache" else dram_bytes
        for k, m in codes:
            if place == "cache":  # at most 256 KiB, shards a multiple of 64 B
                shard = target // k // 64 * 64
            else:  # at least the asked-for size, shards a multiple of 4 KiB
                shard = -(-target // (k * 4096)) * 4096
            specs.append((k, m, place, shard))
    total = max(k * s for k, _, _, s in specs)
    data = np.frombuffer(np.random.default_rng(1234).bytes(total), dtype=np.uint8)
    return [Workload(k, m, place, s, data[:k * s]) for k, m, place, s in specs], data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dram-gib", type=float, default=1.0, help="data size of the DRAM case (default 1)")
    ap.add_argument("--repeats", type=int, default=60,
                    help="timed samples per figure, best kept (DRAM: at most 3)")
    ap.add_argument("--places", default="cache,dram")
    ap.add_argument("--codes", default="4,2;8,2;10,4", help="k,m pairs separated by ';'")
    ap.add_argument("--isas", default=None, help="ckpt kernel levels (default: every available one)")
    ap.add_argument("--threads", default="1,2", help="ckpt thread counts")
    ap.add_argument("--skip", default="", help="codecs to leave out: ckpt,pyeclib,zfec,reedsolo,memcpy")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: RS(4,2) in cache only, 2 repeats, best and scalar ckpt levels")
    args = ap.parse_args()
    if args.quick:
        args.places, args.codes, args.repeats = "cache", "4,2", 2
    places = [p for p in args.places.split(",") if p]
    codes = [tuple(int(x) for x in c.split(",")) for c in args.codes.split(";") if c]
    threads = tuple(int(t) for t in args.threads.split(","))
    skip = set(filter(None, args.skip.split(",")))

    missing = optional_codecs()
    for name, why in missing.items():
        print(f"skipping {name}: {why}")
    skip |= set(missing)
    isas: list[str] = []
    default_isa = None
    if "ckpt" not in skip:
        import ckpt.redundancy as red

        avail = red.available_isas()
        default_isa = red.default_isa()
        isas = args.isas.split(",") if args.isas else list(avail)
        if args.quick:
            isas = sorted({avail[0], default_isa}, key=avail.index)
        print(f"ckpt kernels available: {avail}; default: {default_isa}; measuring: {isas}")

    machine, vers = machine_info(), versions()
    print(f"machine: {machine}\nversions: {vers}")
    workloads, _ = make_workloads(places, codes, int(args.dram_gib * (1 << 30)))
    pool = ThreadPoolExecutor(2)
    all_results: dict[tuple[str, str], list[Result]] = {}
    json_lines: list[str] = []
    for w in workloads:
        min_s = SAMPLE_MIN_S if w.place == "cache" else 0.0
        repeats = args.repeats if w.place == "cache" else max(2, min(args.repeats, 3))
        results: list[Result] = []
        if "memcpy" not in skip:
            results += bench_memcpy(w, repeats, min_s, pool, threads)
        ckpt_parity = None
        for isa in isas:
            for t in threads:
                res, parity = bench_ckpt(w, isa, t, repeats, min_s, ckpt_parity)
                results += res
                ckpt_parity = ckpt_parity if ckpt_parity is not None else parity
        if "pyeclib" not in skip:
            for ec_type in ("isa_l_rs_cauchy", "liberasurecode_rs_vand"):
                results += bench_pyeclib(w, ec_type, repeats, min_s, ckpt_parity)
        if "zfec" not in skip:
            results += bench_zfec(w, repeats, min_s)
        if "reedsolo" not in skip and w.place == places[0]:
            results += bench_reedsolo(w, w.data, 2)
        if default_isa and w.place == "cache":
            results.append(ckpt_call_overhead(w, default_isa, repeats))
        memcpy = {r.threads: r.gbps for r in results if r.op == "copy"}
        pyeclib_isal = {r.op: r.gbps for r in results if r.codec == "pyeclib isa_l_rs_cauchy"}
        print_table(w, results, memcpy, pyeclib_isal)
        all_results[(w.code, w.place)] = results
        json_lines += [json_line(w, r, memcpy, pyeclib_isal, machine, vers) for r in results]

    print("\n== targets (issue 3) ==")
    for line in check_targets(all_results, default_isa):
        print(line)
    print(f"load average at the end: {os.getloadavg()[0]:.2f} (1 min), cores: {os.cpu_count()}")
    print()
    for line in json_lines:
        print(line)


if __name__ == "__main__":
    main()
