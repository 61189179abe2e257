"""How fast is the codec's CUDA kernel on shards already on the GPU?

Question: for RS(4,2), RS(8,2) and RS(10,4), how many GB/s of data (k x shard bytes / time)
do ``RSCodec.encode`` and ``RSCodec.decode`` (m data shards lost) reach on CUDA tensors, next
to a device-to-device copy of the same bytes (``torch.Tensor.copy_``) measured in the same run?
Each figure is the best of 7 samples, each timed with CUDA events around 20 calls on the
current stream, after 3 warm-up calls. The parity is checked against the CPU codec on a
slice after timing.

    python bench/erasure_cuda.py [--gib 1] [--codes "4,2;8,2;10,4"]

Prints a table and one JSON line per measurement. Needs a CUDA device and ckpt._ec_cuda.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys

import numpy as np
import torch

from ckpt.redundancy import RSCodec

CALLS = 20
SAMPLES = 7


def best_call_s(fn) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(SAMPLES):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(CALLS):
            fn()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3 / CALLS)
    return best


def check_parity(codec: RSCodec, shards: list[torch.Tensor], parity: list[torch.Tensor]) -> None:
    """The GPU parity of the first 1 MiB of every shard equals the CPU codec's."""
    n = min(1 << 20, shards[0].numel())
    host = [s[:n].cpu().numpy() for s in shards]
    want = RSCodec(codec.k, codec.m).encode(host)
    got = [p[:n].cpu().numpy() for p in parity]
    if not all(np.array_equal(a, b) for a, b in zip(want, got)):
        raise SystemExit(f"RS({codec.k},{codec.m}): GPU parity differs from the CPU codec's")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gib", type=float, default=1.0, help="data bytes per code (k shards together)")
    p.add_argument("--codes", default="4,2;8,2;10,4", help="k,m pairs separated by ';'")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: run this on a GPU machine (see bench/gpu_session.sh)", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name()
    print(f"device: {name}")
    print(f"{'code':9s} {'op':7s} {'GB/s':>8s} {'d2d copy GB/s':>14s} {'vs copy':>8s}")
    for k, m in (tuple(int(x) for x in c.split(",")) for c in args.codes.split(";")):
        shard = int(args.gib * (1 << 30)) // k // 256 * 256
        gen = torch.Generator(device="cuda").manual_seed(k * 100 + m)
        shards = [torch.randint(0, 256, (shard,), dtype=torch.uint8, device="cuda", generator=gen)
                  for _ in range(k)]
        parity = [torch.empty(shard, dtype=torch.uint8, device="cuda") for _ in range(m)]
        rebuilt = [torch.empty(shard, dtype=torch.uint8, device="cuda") for _ in range(m)]
        flat = torch.cat(shards)
        copy_dst = torch.empty_like(flat)
        copy_s = best_call_s(lambda: copy_dst.copy_(flat))
        codec = RSCodec(k, m)
        encode_s = best_call_s(lambda: codec.encode(shards, out=parity))
        check_parity(codec, shards, parity)
        survivors = [None] * m + shards[m:] + parity
        decode_s = best_call_s(lambda: codec.decode(survivors, out=rebuilt))
        torch.cuda.synchronize()
        if not all(torch.equal(a, b) for a, b in zip(rebuilt, shards[:m])):
            raise SystemExit(f"RS({k},{m}): GPU decode did not rebuild the lost shards")
        data_bytes = k * shard
        copy_gbps = data_bytes / copy_s / 1e9
        for op, seconds in (("encode", encode_s), ("decode", decode_s)):
            gbps = data_bytes / seconds / 1e9
            print(f"RS({k},{m})".ljust(9), f"{op:7s} {gbps:8.1f} {copy_gbps:14.1f} {gbps / copy_gbps:8.2f}")
            print(json.dumps({"bench": "erasure_cuda", "code": f"RS({k},{m})", "op": op, "device": name,
                              "data_bytes": data_bytes, "best_s": seconds, "gbps": gbps,
                              "d2d_copy_gbps": copy_gbps, "vs_copy": gbps / copy_gbps,
                              "torch": torch.__version__, "python": platform.python_version()}))
        del shards, parity, rebuilt, flat, copy_dst
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
