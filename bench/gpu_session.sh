#!/usr/bin/env bash
# The GPU measurements of issue 2 in ONE device call: versions, build with nvcc, the GPU
# tests, bench/snapshot_stall.py --device cuda. Each step has its own time limit and log,
# $OUT/<step>.log; a failed step does not stop the next; $OUT/summary.txt has each rc.
# The steps together stay under GPU_SESSION_BUDGET_S (510 s): run it with timeout_s=600.
#
#   bash bench/gpu_session.sh                 # on the GPU machine, from anywhere in the repo
#   bash bench/gpu_session.sh --dry           # print the steps and the values they would use
#   bash bench/gpu_session.sh --fetch-wheels  # HERE, before the call: wheels the GPU image lacks
#   bash bench/gpu_session.sh --step NAME     # one step, no time limit (e.g. to rerun bench)
#
# The device tool's call: run(command="bash bench/gpu_session.sh", carry=[".whl"], timeout_s=600).
# Nothing can be fetched on the GPU machine: --fetch-wheels puts zstandard (not in the image) and
# the grpcio/protobuf that ckpt's generated code needs (>= 1.85.1 / 7.35.1) into .whl/ here.
set -euo pipefail

SELF="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
cd "$(dirname "$SELF")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/gpu-out}
BUDGET_S=${GPU_SESSION_BUDGET_S:-510}

# Which python. The GPU image's python3 already holds a CUDA build of torch (and pyarrow, grpcio,
# psutil, numpy, pytest, pybind11, setuptools); nothing can be installed from an index there.
# So no venv: `pip install -c constraints.txt` would pull the CPU torch that constraints.txt pins,
# and `python3 -m venv --system-site-packages` made from a python that is itself a venv (the
# image's is) sees the base interpreter's site-packages, not that venv's torch. Instead: that
# python3 as it is, the repo's src/ (extensions built in place) and the carried wheels, unpacked
# into $SITE, in front of its packages on PYTHONPATH (the ckpt daemon inherits it).
PY=${GPU_PYTHON:-python3}
GPU_PYTHON_VERSION=${GPU_PYTHON_VERSION:-3.12}  # the image's python3 (--fetch-wheels)
SITE=/tmp/ckpt-site
export PYTHONPATH="$SITE:$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

# The bench's state. 4 GiB: its pinned D2H copy takes ~0.09 s on an H200 (PCIe Gen5, ~50 GB/s),
# far above the ~1 ms resolution of the copy timing, and 3% of the GPU's memory; a step at the
# bench's cuda batch (8192 rows) is ~0.3 s, so none/ckpt take ~20 s, and the modes that write
# the state to disk every step (dcp_async, dcp_async_shm, torch_save: ~3-5 s a step at 4 GiB)
# plus persist/restore/dcp.load keep the run near 2-3 minutes; their time grows with the state.
BENCH_STATE_GIB=4
# /dev/shm holds ckpt's segment (2 slots x 1.25 headroom) and DCP's shared-memory staging copy:
# 3.5 x the state; 4 x leaves room. A smaller /dev/shm makes the state smaller.
SHM_PER_STATE=4

# name:limit_s, in order of need: the bench right after the copy tests; what the budget cannot
# fit any more is skipped (and said so in summary.txt). Seven files in $OUT: the device tool
# brings back at most eight.
STEPS=(env:120 build:240 test_cuda_copy:120 bench:330 test_ec_cuda:180 bench_copy_threads4:150)

step_env() {
  echo "== machine"; nproc; free -g; df -h /dev/shm /tmp /var/tmp "$ROOT" || true
  echo "== nvidia-smi"; nvidia-smi || echo "nvidia-smi failed (rc $?)"
  echo "== nvcc"; nvcc --version || echo "nvcc is not on PATH; setup.py also looks in \$CUDA_HOME and /usr/local/cuda*"
  # setup.py builds the CUDA extensions only where it finds the static cudart beside nvcc.
  find /usr/local -maxdepth 4 -name libcudart_static.a 2>/dev/null || true
  echo "== python"; command -v "$PY"; "$PY" --version
  install_wheels
  check_python_deps
}

install_wheels() {
  local wheels
  shopt -s nullglob
  wheels=("$ROOT"/.whl/*.whl)
  shopt -u nullglob
  if ((${#wheels[@]} == 0)); then
    echo "== no wheels in .whl/ (none carried): using the image's packages as they are"
    return 0
  fi
  echo "== unpacking ${#wheels[@]} carried wheel(s) into $SITE"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "${wheels[@]}"
}

check_python_deps() {
  echo "== python packages (pyproject.toml's lower bounds)"
  "$PY" - <<'EOF'
import importlib
import sys

from packaging.version import Version

NEED = [("torch", "2.4"), ("pyarrow", "14"), ("zstandard", "0.22"), ("psutil", "5.9"),
        # ckpt/control/ckpt_pb2*.py refuse older runtimes than the generator's
        ("grpc", "1.85.1"), ("google.protobuf", "7.35.1"), ("numpy", "1.24"), ("tqdm", "4.60"),
        ("pybind11", "2.10"), ("setuptools", "64"), ("pytest", "7")]
problems = []
for name, least in NEED:
    try:
        module = importlib.import_module(name)
    except ImportError as exc:
        problems.append(f"{name}: {exc}")
        continue
    version = module.__version__
    old = Version(version.split("+")[0]) < Version(least)
    print(f"{name:<18}{version:<22}{'OLDER THAN ' + least if old else ''}")
    if old:
        problems.append(f"{name} {version} < {least}")
import torch

cuda = torch.cuda.is_available()
print(f"torch CUDA build {torch.version.cuda}, available: {cuda}"
      + (f", {torch.cuda.get_device_name()}" if cuda else ""))
if not cuda:
    problems.append("torch.cuda.is_available() is False")
if problems:
    print("PROBLEMS: " + "; ".join(problems))
    print("fix: run `bash bench/gpu_session.sh --fetch-wheels` on a machine with PyPI, then "
          "the device call with carry=['.whl']")
    sys.exit(1)
EOF
}

step_build() {
  "$PY" setup.py build_ext --inplace -j "$(nproc)"
  # setup.py marks the CUDA extensions optional (a failing nvcc only warns): check them here.
  ls -l src/ckpt/_C_cuda*.so src/ckpt/_ec_cuda*.so
  "$PY" -c "from ckpt import _C_cuda, _ec_cuda
print('_C_cuda.available():', _C_cuda.available(), ' _ec_cuda.available():', _ec_cuda.available())
assert _C_cuda.available() and _ec_cuda.available(), 'the CUDA extensions see no GPU'"
}

# pytest skips GPU tests where no device is usable or the extension is missing, and exits 0:
# say so with an rc instead. $1: the extension the tests need.
require_gpu() {
  "$PY" -c "import torch; from ckpt import $1
assert torch.cuda.is_available() and $1.available(), 'no usable CUDA device for torch and ckpt.$1'"
}

step_test_cuda_copy() {
  require_gpu _C_cuda
  "$PY" -m pytest -q -rs -m gpu tests/gpu/test_cuda_copy.py tests/gpu/test_checkpointer_cuda.py
}

# The codec's CUDA kernel: its tests, then bench/erasure_cuda.py (GB/s next to a d2d copy).
step_test_ec_cuda() {
  require_gpu _ec_cuda
  local rc=0
  "$PY" -m pytest -q -rs -m gpu tests/gpu/test_ec_cuda.py || rc=$?
  "$PY" bench/erasure_cuda.py --gib 1 || rc=$?
  return "$rc"
}

step_bench() {
  run_bench
}

# The same with 4 copy workers and only none/ckpt. The chunk crcs of CUDA state are computed on
# the GPU (csrc/cuda_crc.cu), so the CPU workers only copy the few CPU tensors (AdamW's step
# counters): this run should match the one above. If it is faster, something on the CPU side
# still gates the snapshot.
step_bench_copy_threads4() {
  run_bench --copy-threads 4 --skip dcp_async,dcp_async_shm,torch_save
}

run_bench() {
  local workdir state_gib
  workdir=$(bench_workdir)
  grow_shm
  state_gib=$(bench_state_gib)
  echo "== state ${state_gib} GiB (wanted ${BENCH_STATE_GIB}), work directory ${workdir}"
  # TMPDIR: the bench makes (and removes) its work directory there, on a disk that takes O_DIRECT.
  TMPDIR=$workdir "$PY" bench/snapshot_stall.py --device cuda --state-gib "$state_gib" \
    --steps 6 --rounds 3 --batch 8192 "$@"
}

# The bench compares persist with `dd oflag=direct`, which tmpfs refuses: the first of these
# directories whose filesystem takes an O_DIRECT write.
bench_workdir() {
  local dir
  for dir in /var/tmp/ckpt-gpu /tmp/ckpt-gpu "$ROOT/.gpu-bench"; do
    mkdir -p "$dir" 2>/dev/null || continue
    if dd if=/dev/zero of="$dir/probe" bs=1M count=1 oflag=direct status=none 2>/dev/null; then
      rm -f "$dir/probe"
      echo "$dir"
      return 0
    fi
    rm -f "$dir/probe"
  done
  echo "no directory here takes O_DIRECT writes; the bench's dd baseline will fail" >&2
  echo /tmp
}

shm_gib() {  # $1: avail or used
  df -k --output="$1" /dev/shm | tail -n 1 | awk '{ printf "%d\n", $1 / 1048576 }'
}

# The machine's /dev/shm may be sized from the memory it booted with (it grows later): make
# room for the bench's state (root, on a machine that is given back after the call).
grow_shm() {
  local need_gib=$((BENCH_STATE_GIB * SHM_PER_STATE))
  if (($(shm_gib avail) < need_gib)); then
    echo "== /dev/shm has $(shm_gib avail) GiB free, the bench wants ${need_gib}: remounting it larger"
    mount -o remount,size=$(($(shm_gib used) + need_gib + 4))G /dev/shm ||
      echo "remount failed: the state will be smaller"
  fi
}

bench_state_gib() {
  df -k --output=avail /dev/shm | tail -n 1 | awk -v want="$BENCH_STATE_GIB" -v per="$SHM_PER_STATE" \
    '{ s = $1 / 1048576 / per; if (s > want) s = want; printf "%.2f\n", s }'
}

run_step() {
  local name=$1 cap_s=$2 left_s limit_s rc t0 note=""
  left_s=$((BUDGET_S - SECONDS))
  limit_s=$((cap_s < left_s ? cap_s : left_s))
  if ((limit_s < 20)); then
    printf '%-22s skipped: %ss of the %ss budget left\n' "$name" "$left_s" "$BUDGET_S" >>"$OUT/summary.txt"
    return 0
  fi
  echo "======== $name (limit ${limit_s}s)"
  t0=$SECONDS
  set +e
  timeout --kill-after=10 "$limit_s" bash "$SELF" --step "$name" 2>&1 | tee "$OUT/$name.log"
  rc=${PIPESTATUS[0]}
  set -e
  if ((rc == 124 || rc == 137)); then note="  TIMED OUT"; fi
  printf '%-22s rc=%-4s %4ss (limit %ss)%s\n' "$name" "$rc" $((SECONDS - t0)) "$limit_s" "$note" \
    >>"$OUT/summary.txt"
}

# The steps build into src/ and may resize /dev/shm: only where there is a GPU.
require_gpu_machine() {
  if ! nvidia-smi -L >/dev/null 2>&1 && [[ ! -e /dev/nvidiactl ]]; then
    echo "no NVIDIA GPU here (nvidia-smi -L fails, no /dev/nvidiactl): this script is for the GPU" \
      "machine; --dry shows its steps" >&2
    exit 2
  fi
}

run_all() {
  local step
  require_gpu_machine
  mkdir -p "$OUT"
  : >"$OUT/summary.txt"
  for step in "${STEPS[@]}"; do
    run_step "${step%%:*}" "${step##*:}"
  done
  echo "======== summary ($OUT/summary.txt)"
  cat "$OUT/summary.txt"
}

dry_run() {
  local step
  echo "python: $PY  PYTHONPATH=$PYTHONPATH  OUT=$OUT  budget: ${BUDGET_S}s"
  echo "bench: state $(bench_state_gib) GiB with /dev/shm as it is now (wanted ${BENCH_STATE_GIB})"
  for step in "${STEPS[@]}"; do
    echo "---- ${step%%:*} (limit ${step##*:}s, log \$OUT/${step%%:*}.log)"
    declare -f "step_${step%%:*}" | sed '1,2d;$d'
  done
  echo "---- run_bench (the bench steps' command)"
  declare -f run_bench | sed '1,2d;$d'
}

fetch_wheels() {
  local pins
  mapfile -t pins < <(grep -E '^(zstandard|grpcio|protobuf)==' constraints.txt)
  mkdir -p .whl
  rm -f .whl/zstandard-*.whl .whl/grpcio-*.whl .whl/protobuf-*.whl  # one version of each
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$GPU_PYTHON_VERSION" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d .whl "${pins[@]}"
  ls -l .whl
}

case "${1:-}" in
  "") run_all ;;
  --dry) dry_run ;;
  --fetch-wheels) fetch_wheels ;;
  --step)
    declare -F "step_${2:-}" >/dev/null || { echo "no step '${2:-}'; steps: ${STEPS[*]%%:*}" >&2; exit 2; }
    require_gpu_machine
    "step_$2"
    ;;
  *) echo "usage: bash bench/gpu_session.sh [--dry | --fetch-wheels | --step NAME]" >&2; exit 2 ;;
esac
