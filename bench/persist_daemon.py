"""How fast does the snapshot daemon persist a sealed slot, end to end, compared with dd?

Starts a real daemon process (``python -m ckpt.daemon.server`` on a Unix socket),
registers a job with a ``persist_dir``, seals a ~1 GiB payload (``ckpt.format.pack``,
float32 tensors of 4 MiB) into its segment as a trainer does, and times
``Persist(wait=True)`` (pin, stage, crc check, compression probe, O_DIRECT write,
fsync, atomic commit) as the trainer sees it, and as the daemon logs it. The first
persist of a job is reported apart (it sets up the daemon's per-job buffers); later
ones persist a new step each. ``dd if=/dev/zero bs=16M count=128 oflag=direct`` on
the same filesystem runs before and after; ratios are to the better dd (the disk is
shared and noisy). Prints a table and one JSON line.

    PYTHONPATH=src python bench/persist_daemon.py [--dir DIR] [--gib 1.0] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ckpt import _C, __version__
from ckpt.control.client import DaemonClient
from ckpt.format.pack import pack_payload

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from persist import dd_gbps  # noqa: E402  (same dd as bench/persist.py)

LOGGED_PERSIST_RE = re.compile(r"persisted job (\S+) step (\d+) ranks \[[^\]]*\] in ([\d.]+) s"
                        r"(?: \(staging ([\d.]+) s, writing ([\d.]+) s\))?")


def start_daemon(tmp: Path) -> tuple[subprocess.Popen, DaemonClient, Path]:
    run = tmp / "run"
    run.mkdir(mode=0o700)
    sock, log = run / "daemon.sock", tmp / "daemon.log"
    env = dict(os.environ)
    src = str(Path(_C.__file__).absolute().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    proc = subprocess.Popen([sys.executable, "-m", "ckpt.daemon.server", "--socket", str(sock),
                             "--state-dir", str(tmp / "state"), "--log-file", str(log)],
                            env=env, stdin=subprocess.DEVNULL)
    client = DaemonClient(sock, timeout_s=10)
    deadline = time.monotonic() + 30
    while not client.ping(timeout_s=1.0):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"daemon did not start: {log.read_text() if log.exists() else ''}")
        time.sleep(0.1)
    return proc, client, log


def payload_for(step: int, arrays: dict[str, np.ndarray]) -> bytearray:
    buf, _ = pack_payload(arrays, step=step, job="bench", chunk_bytes=4 << 20)
    return buf


def seal(seg, step: int, payload: bytearray) -> tuple[int, int]:
    committed = seg.committed()
    slot = 0 if committed is None else 1 - committed[0]
    deadline = time.monotonic() + 60
    while not seg.try_lock(slot, os.getpid(), "write"):  # a reader (persist) still pins it
        if time.monotonic() > deadline:
            raise RuntimeError(f"slot {slot} stayed pinned for 60 s")
        time.sleep(0.01)
    seg.mark_writing(slot)
    view = seg.slot_view(slot)
    view[:len(payload)] = payload
    view.release()
    data_offset = int.from_bytes(payload[40:48], "little")
    seq = seg.seal(slot, step, len(payload), _C.crc32c(memoryview(payload)[:data_offset]))
    seg.unlock(slot, os.getpid())
    return slot, seq


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=os.path.join(os.path.dirname(__file__), ".."),
                        help="a directory on the filesystem to measure (default: the repo's)")
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--repeat", type=int, default=3, help="persists after the first")
    parser.add_argument("--keep", type=int, default=2, help="retention of the job (0: keep all)")
    parser.add_argument("--data", choices=("random", "normal"), default="normal",
                        help="random bit patterns, or normal-distributed float32 (weights)")
    args = parser.parse_args()
    n = int(args.gib * (1 << 30)) // 4
    rng = np.random.default_rng(0)
    data = (rng.integers(0, 2**32, n, dtype=np.uint32).view(np.float32) if args.data == "random"
            else rng.standard_normal(n, dtype=np.float32))
    arrays = {f"model/layers.{i}.weight": a
              for i, a in enumerate(np.split(data, max(1, n // (1 << 20))))}
    payload = payload_for(0, arrays)
    job = f"bench-{os.getpid()}"
    with tempfile.TemporaryDirectory(dir=args.dir, prefix=".bench-persist-daemon-") as tmp_s:
        tmp = Path(tmp_s)
        dd = dd_gbps(tmp_s)
        proc, client, log = start_daemon(tmp)
        runs = []
        try:
            reg = client.register(job, 0, 1, os.getpid(), len(payload),
                                  persist_dir=tmp / "ckpt", keep=args.keep)
            seg = _C.Segment.open(reg.segment_name)
            try:
                for step in range(1, args.repeat + 2):
                    payload = payload_for(step, arrays)
                    slot, seq = seal(seg, step, payload)
                    client.commit(job, 0, slot, step, seq)
                    t0 = time.perf_counter()
                    outcome = client.persist(job, rank=0, step=step, wait=True, timeout_s=300)
                    elapsed = time.perf_counter() - t0
                    if not outcome.done:
                        raise RuntimeError(f"persist of step {step} failed: {outcome.error}")
                    runs.append({"step": step, "rpc_s": round(elapsed, 3)})
            finally:
                seg.close()
                client.release(job)
        finally:
            client.close()
            proc.terminate()
            proc.wait(30)
        logged = {int(m.group(2)): m.groups()[2:]
                  for m in LOGGED_PERSIST_RE.finditer(log.read_text()) if m.group(1) == job}
        dd_after = dd_gbps(tmp_s)
    data_bytes = n * 4
    best_dd = max(dd, dd_after)
    for r in runs:
        total_s, staging_s, writing_s = logged.get(r["step"], (None, None, None))
        r["daemon_s"] = float(total_s) if total_s else None
        r["staging_s"] = float(staging_s) if staging_s else None
        r["writing_s"] = float(writing_s) if writing_s else None
        r["GBps"] = round(data_bytes / r["rpc_s"] / 1e9, 3)
        r["ratio_to_dd"] = round(r["GBps"] / best_dd, 3)
    first, later = runs[0], runs[1:]
    best_later = max(later, key=lambda r: r["GBps"]) if later else first
    print(f"daemon persist of {args.gib:.2f} GiB {args.data} float32 (4 MiB tensors) via "
          f"Persist(wait); dd oflag=direct before/after: {dd:.3f}/{dd_after:.3f} GB/s")
    print(f"{'step':>5} {'rpc s':>8} {'daemon s':>9} {'staging s':>10} {'writing s':>10} "
          f"{'GB/s':>7} {'vs dd':>7}")
    for r in runs:
        nan = float("nan")
        print(f"{r['step']:>5} {r['rpc_s']:>8.3f} {r['daemon_s'] or nan:>9.3f} "
              f"{r['staging_s'] or nan:>10.3f} {r['writing_s'] or nan:>10.3f} "
              f"{r['GBps']:>7.3f} {r['ratio_to_dd']:>7.2f}" + ("  (first)" if r is first else ""))
    print(json.dumps({"bench": "persist_daemon", "gib": args.gib, "data": args.data,
                      "dd_GBps": round(dd, 3), "dd_after_GBps": round(dd_after, 3),
                      "first_ratio_to_dd": first["ratio_to_dd"],
                      "best_ratio_to_dd": best_later["ratio_to_dd"], "runs": runs,
                      "machine": platform.machine(), "cpus": os.cpu_count(),
                      "python": platform.python_version(), "ckpt": __version__,
                      "crc32c": _C.crc32c_impl()}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
