#!/usr/bin/env bash
# Build ckpt's native modules for aarch64 and run the native test files on an aarch64
# CPython under qemu-user, on an x86-64 Debian/Ubuntu machine (root, for apt).
#
#   bash tests/cross/aarch64.sh [WORKDIR]      (default /tmp/ckpt-aarch64; ~5 min)
#
# What it shows: _C (crc32c, copy engine, segments) and _ec (the codec) build for
# aarch64 with no source changes, import on an aarch64 Python, pick the ARMv8 crc32c
# instruction and the scalar codec, and pass their tests against the same oracles.
# Tests that start `sys.executable` in a subprocess, or fork a process with worker
# threads, are deselected: without binfmt_misc the subprocess cannot exec an aarch64
# binary, and qemu-user 7.2 aborts on fork-with-threads (cpu_exec assertion). Timing
# checks under emulation say nothing about real hardware and are deselected too.
# Not part of .ci/run: it needs apt, a cross compiler and ~300 MB of packages.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/../.." && pwd)"
WORK="${1:-/tmp/ckpt-aarch64}"
ROOT="$WORK/root" SITE="$WORK/site" SRC="$WORK/src"
PY="${PYTHON:-python3}"
mkdir -p "$WORK/debs" "$WORK/wheels"

echo "== toolchain: g++-aarch64-linux-gnu, qemu-user"
if ! command -v aarch64-linux-gnu-g++ >/dev/null || ! command -v qemu-aarch64 >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q g++-aarch64-linux-gnu qemu-user >/dev/null
fi

echo "== sysroot: Debian's arm64 CPython 3.11 and its libraries, unpacked (not installed)"
if [ ! -x "$ROOT/usr/bin/python3.11" ]; then
  dpkg --print-foreign-architectures | grep -qx arm64 || dpkg --add-architecture arm64
  apt-get update -q >/dev/null
  (cd "$WORK/debs" && for p in python3.11-minimal libpython3.11-minimal libpython3.11-stdlib \
      libpython3.11-dev libpython3.11 libexpat1 zlib1g libffi8 libssl3 libbz2-1.0 liblzma5 \
      libsqlite3-0 libncursesw6 libtinfo6 libreadline8 libuuid1 libcrypt1 libnsl2 libtirpc3 \
      libdb5.3 libgdbm6 libstdc++6 libgcc-s1 libc6; do
    apt-get download -q "$p:arm64" >/dev/null 2>&1 || { echo "apt-get download $p:arm64 failed"; exit 1; }
  done)
  rm -rf "$ROOT" && mkdir -p "$ROOT"
  for d in "$WORK"/debs/*.deb; do dpkg -x "$d" "$ROOT"; done
fi

echo "== aarch64 wheels from PyPI: numpy, pytest, psutil, reedsolo (and pybind11's headers)"
if [ ! -d "$SITE/numpy" ]; then
  "$PY" -m pip download -q -d "$WORK/wheels" --python-version 3.11 --implementation cp --abi cp311 \
    --platform manylinux2014_aarch64 --platform manylinux_2_17_aarch64 --platform manylinux_2_28_aarch64 \
    --only-binary=:all: numpy pytest psutil reedsolo pybind11 2>&1 | grep -v '^WARNING: Location' || true
  ls "$WORK"/wheels/numpy-*aarch64*.whl >/dev/null 2>&1 \
    || { echo "pip could not download the aarch64 wheels (see above)"; exit 1; }
  rm -rf "$SITE" && mkdir -p "$SITE"
  for w in "$WORK"/wheels/*.whl; do "$PY" -m zipfile -e "$w" "$SITE" >/dev/null; done
fi

echo "== cross-build _C and _ec (the flags of setup.py)"
rm -rf "$SRC" && mkdir -p "$SRC" && cp -r "$REPO/src/ckpt" "$SRC/" && rm -f "$SRC"/ckpt/*.so
C="$REPO/csrc"
PBI="$SITE/pybind11/include"
FLAGS=(-O3 -fvisibility=hidden -Wall -Wno-unused-function -Werror -std=c++17 -fPIC -shared -pthread
       -I"$C" -I"$PBI" -I"$ROOT/usr/include/python3.11" -I"$ROOT/usr/include")
aarch64-linux-gnu-g++ "${FLAGS[@]}" "$C"/bindings.cc "$C"/crc32c.cc "$C"/copy_engine.cc "$C"/segment.cc \
  -lrt -o "$SRC/ckpt/_C.cpython-311-aarch64-linux-gnu.so" &
aarch64-linux-gnu-g++ "${FLAGS[@]}" -I"$C/ec" "$C"/ec/ec_bindings.cc "$C"/ec/gf.cc "$C"/ec/cpu.cc \
  "$C"/ec/plan.cc "$C"/ec/pool.cc "$C"/ec/kernels_scalar.cc "$C"/ec/kernels_ssse3.cc \
  "$C"/ec/kernels_avx2.cc "$C"/ec/kernels_avx512.cc "$C"/ec/kernels_gfni.cc "$C"/ec/kernels_neon.cc \
  -o "$SRC/ckpt/_ec.cpython-311-aarch64-linux-gnu.so" &
wait %1 && wait %2

run() {
  qemu-aarch64 -L "$ROOT" -E PYTHONPATH="$SRC:$SITE" -E CKPT_CRC_IMPL="${CKPT_CRC_IMPL:-}" \
    -E CKPT_EC_ISA="${CKPT_EC_ISA:-}" \
    "$ROOT/usr/bin/python3.11" "$@"
}
echo "== on aarch64:"
run -c "import platform; from ckpt import _C, _ec; print(platform.machine(), 'crc32c:', _C.crc32c_impl(),
'codec kernels:', _ec.available_isas())"
T="$REPO/tests"
# These start sys.executable (scalar_crc, env_cap, forced_level), fork with threads
# (forked_child) or time things (crawl); the forced levels are run directly below.
DESELECT="not scalar_crc and not env_cap and not forced_level and not forked_child and not crawl"
run -m pytest -q -p no:cacheprovider -k "$DESELECT" "$T/native/test_crc32c.py" \
  "$T/native/test_copy_engine.py" "$T/native/test_segment.py" "$T/native/test_ec_gf.py" \
  "$T/native/test_ec_kernels.py" "$T/unit/test_rs_codec.py" "$T/unit/test_rs_oracles.py"
echo "== again with the scalar crc32c forced"
CKPT_CRC_IMPL=scalar run -m pytest -q -p no:cacheprovider -k "$DESELECT" "$T/native/test_crc32c.py" \
  "$T/native/test_copy_engine.py"
echo "== the codec's tests again with the scalar kernel forced (CKPT_EC_ISA=scalar)"
CKPT_EC_ISA=scalar run -m pytest -q -p no:cacheprovider -m "not slow" "$T/unit/test_rs_codec.py"
