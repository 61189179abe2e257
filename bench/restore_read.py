"""Reading a sealed slot for a restore: through a fresh mapping, or with pread()?

Question: a restoring trainer opens the daemon's segment and copies one slot into its
live tensors with each chunk's crc32c. Through a mapping (``CopyEngine.submit`` from the
slot's address), every 4 KiB page is faulted in on first touch and unmapped afterwards;
``CopyEngine.read_file`` preads the same bytes from the segment's file instead, so
nothing is mapped. This times both on one segment, alternating, and reports medians of
the copy alone and of copy + close (the unmap), with their ratio.

    PYTHONPATH=src python bench/restore_read.py [--gib 1.13] [--repeats 10]

The destination is pre-faulted (live tensors exist before a restore). Prints a table and
one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import numpy as np

from ckpt import _C

CHUNK_BYTES = 4 << 20  # the snapshot layout's default chunk


def make_segment(nbytes: int) -> str:
    name = f"/ckpt-bench-restore-read-{os.getpid()}"
    seg = _C.Segment.create(name, nbytes)
    np.frombuffer(seg.slot_view(0), dtype=np.uint8)[:] = np.random.default_rng(0).integers(
        0, 256, nbytes, dtype=np.uint8)
    seg.close()
    return name


def read_once(name: str, how: str, engine, dst: np.ndarray, crcs: np.ndarray
              ) -> tuple[float, float]:
    """(copy seconds, copy + close seconds) of one read of slot 0 on a fresh open."""
    t0 = time.perf_counter()
    seg = _C.Segment.open(name, populate=False)
    if how == "mapped":
        ticket = engine.submit([(seg.slot_address(0), dst.ctypes.data, dst.nbytes)],
                               CHUNK_BYTES, crcs.ctypes.data)
    else:
        offset = seg.slot_address(0) - seg.base_address
        ticket = engine.read_file(seg.fileno(), [(offset, dst.ctypes.data, dst.nbytes)],
                                  CHUNK_BYTES, crcs.ctypes.data)
    ticket.wait(None)
    t1 = time.perf_counter()
    seg.close()
    return t1 - t0, time.perf_counter() - t0


def run(nbytes: int, repeats: int, threads: int) -> dict:
    name = make_segment(nbytes)
    try:
        dst = np.ones(nbytes, dtype=np.uint8)
        crcs = np.zeros(-(-nbytes // CHUNK_BYTES), dtype=np.uint32)
        times: dict[str, list[tuple[float, float]]] = {"mapped": [], "read_file": []}
        with _C.CopyEngine(threads) as engine:
            read_once(name, "mapped", engine, dst, crcs)  # page cache and code warm
            reference = crcs.copy()
            for _ in range(repeats):
                for how in times:
                    crcs[:] = 0
                    times[how].append(read_once(name, how, engine, dst, crcs))
                    if not np.array_equal(crcs, reference):
                        raise SystemExit(f"{how}: crcs differ from the first read")
    finally:
        _C.Segment.unlink(name)
    out = {how: {"copy_s": statistics.median(c for c, _ in v),
                 "copy_close_s": statistics.median(t for _, t in v)} for how, v in times.items()}
    out["ratio_copy_close"] = out["read_file"]["copy_close_s"] / out["mapped"]["copy_close_s"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gib", type=float, default=1.13, help="slot size (the 1.13 GiB bench state)")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="engine workers (restore uses every core)")
    args = ap.parse_args()
    nbytes = max(4096, int(args.gib * (1 << 30)) // 4096 * 4096)
    r = run(nbytes, args.repeats, args.threads)
    print(f"slot {nbytes / (1 << 30):.2f} GiB, {args.threads} workers, medians of "
          f"{args.repeats} alternating reads")
    print(f"{'read':>10} {'copy s':>8} {'+ close s':>10} {'GB/s':>6}")
    for how in ("mapped", "read_file"):
        m = r[how]
        print(f"{how:>10} {m['copy_s']:8.4f} {m['copy_close_s']:10.4f} "
              f"{nbytes / m['copy_close_s'] / 1e9:6.1f}")
    print(f"read_file / mapped (copy + close): {r['ratio_copy_close']:.2f}")
    print(json.dumps({"bench": "restore_read", "machine": platform.node(),
                      "cpu_cores": os.cpu_count(), "crc_impl": _C.crc32c_impl(),
                      "slot_bytes": nbytes, "threads": args.threads, "repeats": args.repeats,
                      **r}))


if __name__ == "__main__":
    main()
