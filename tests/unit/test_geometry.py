"""ckpt.snapshot.geometry: local piece, global shape and offsets of each state tensor."""

from __future__ import annotations

import json
import os
import sys
import subprocess
import textwrap
from pathlib import Path

import torch

from ckpt.snapshot.geometry import geometry_of

SRC = str(Path(__file__).resolve().parents[2] / "src")


def test_plain_tensor_is_whole_at_offset_zero():
    t = torch.zeros(5, 3)
    g = geometry_of("model/w", t)
    assert g.local is t and g.global_shape == (5, 3) and g.offsets == (0, 0)
    assert g.nbytes == 60 and g.dtype_name == "float32"


_WORKER = textwrap.dedent("""
    import json, os, sys
    import torch, torch.distributed as dist
    torch.set_num_threads(1)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor, Shard, Replicate
    from ckpt.snapshot.geometry import geometry_of
    rank = int(sys.argv[1])
    dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=rank, world_size=2)
    mesh = init_device_mesh("cpu", (2,))
    full = torch.arange(5 * 4, dtype=torch.float32).reshape(5, 4)
    out = {}
    for name, placement in (("rows", Shard(0)), ("cols", Shard(1)), ("repl", Replicate())):
        d = distribute_tensor(full, mesh, [placement])
        g = geometry_of(name, d)
        assert g.local.data_ptr() == d.to_local().data_ptr()  # the live shard, no copy
        sl = tuple(slice(o, o + n) for o, n in zip(g.offsets, g.shape))
        assert torch.equal(full[sl], g.local)
        out[name] = [list(g.shape), list(g.global_shape), list(g.offsets)]
    print(json.dumps(out), flush=True)
    dist.barrier()  # neither rank tears gloo down while its peer still talks to it
    dist.destroy_process_group()
""")


def test_dtensor_shards_report_global_shape_and_offsets(tmp_path):
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    store = tmp_path / "store"
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(r), str(store)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    # Uneven dim-0 split of 5 rows: torch.chunk semantics, 3 + 2.
    assert results[0]["rows"] == [[3, 4], [5, 4], [0, 0]]
    assert results[1]["rows"] == [[2, 4], [5, 4], [3, 0]]
    assert results[0]["cols"] == [[5, 2], [5, 4], [0, 0]]
    assert results[1]["cols"] == [[5, 2], [5, 4], [0, 2]]
    assert results[0]["repl"] == results[1]["repl"] == [[5, 4], [5, 4], [0, 0]]
