"""Builds ckpt's native extensions.

* ``ckpt._C`` (always): crc32c, the copy engine and shm segments, C++17, -O3.
  No global ``-march``: SIMD paths carry per-function target attributes and are
  chosen at run time, so one wheel runs on every x86-64.
* ``ckpt._ec`` (always): the Reed-Solomon codec (csrc/ec). Its SIMD kernel files
  carry target pragmas and are chosen at run time from cpuid. ``CKPT_EC_NO_TABLE_SIMD=1``
  leaves out the table-lookup (PSHUFB: ssse3, avx2, avx512) kernels entirely.
* ``ckpt._C_cuda`` (when ``nvcc`` is found via ``$CUDA_HOME``, ``PATH`` or
  ``/usr/local/cuda*``; ``CKPT_NO_CUDA=1`` skips it): ``csrc/*.cu`` compiled by
  nvcc for sm_80 and sm_90 plus PTX, linked against the static cudart so that
  importing it needs no GPU and no driver. ``ckpt._ec_cuda`` likewise, from
  ``csrc/ec/ec_cuda.cu``: the codec's kernel for shards already on a GPU.

No torch at build time: the extensions take raw pointers and stream handles.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("csrc")
CUDA_ARCHS = ("80", "90")


def _has_cudart(root: str) -> bool:
    return os.path.isfile(os.path.join(root, "include", "cuda_runtime.h")) and any(
        os.path.isfile(os.path.join(root, lib, "libcudart_static.a")) for lib in ("lib64", "lib")
    )


def find_cuda() -> tuple[str, str] | None:
    """Return (nvcc, cuda_root), or None when CUDA is absent or CKPT_NO_CUDA is set.

    nvcc comes from $CUDA_HOME, PATH, or /usr/local/cuda*; the root is the first of
    those that holds cuda_runtime.h and the static cudart (PATH may hold a wrapper
    script, so the root is not always nvcc's parent).
    """
    if os.environ.get("CKPT_NO_CUDA", "") not in ("", "0"):
        return None
    roots = [os.environ[v] for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    on_path = shutil.which("nvcc")
    if on_path:
        roots.append(os.path.dirname(os.path.dirname(os.path.realpath(on_path))))
    roots += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    nvccs = [os.path.join(r, "bin", "nvcc") for r in roots] + ([on_path] if on_path else [])
    nvcc = next((n for n in nvccs if os.path.isfile(n) and os.access(n, os.X_OK)), None)
    root = next((r for r in roots if _has_cudart(r)), None)
    if nvcc is None or root is None:
        return None
    return nvcc, root


EC_NO_TABLE_SIMD = os.environ.get("CKPT_EC_NO_TABLE_SIMD", "") not in ("", "0")
COMMON_ARGS = ["-O3", "-fvisibility=hidden", "-Wall", "-Wno-unused-function"]

ext_modules = [
    Pybind11Extension(
        "ckpt._C",
        sources=[
            "csrc/bindings.cc",
            "csrc/crc32c.cc",
            "csrc/crc32c_fold.cc",
            "csrc/copy_engine.cc",
            "csrc/segment.cc",
        ],
        include_dirs=[CSRC],
        depends=glob.glob(os.path.join("csrc", "*.h")),
        cxx_std=17,
        extra_compile_args=COMMON_ARGS,
        extra_link_args=["-pthread"],
        libraries=["rt"],
    ),
    Pybind11Extension(
        "ckpt._ec",
        sources=[
            "csrc/ec/ec_bindings.cc",
            "csrc/ec/gf.cc",
            "csrc/ec/cpu.cc",
            "csrc/ec/plan.cc",
            "csrc/ec/pool.cc",
            "csrc/ec/kernels_scalar.cc",
            "csrc/ec/kernels_ssse3.cc",
            "csrc/ec/kernels_avx2.cc",
            "csrc/ec/kernels_avx512.cc",
            "csrc/ec/kernels_gfni.cc",
            "csrc/ec/kernels_neon.cc",
        ],
        include_dirs=[CSRC],
        cxx_std=17,
        extra_compile_args=list(COMMON_ARGS),  # Pybind11Extension appends to the list it gets
        extra_link_args=["-pthread"],
        define_macros=[("CKPT_EC_NO_TABLE_SIMD", "1")] if EC_NO_TABLE_SIMD else [],
        depends=glob.glob(os.path.join("csrc", "ec", "*.h")) + glob.glob(os.path.join("csrc", "ec", "*.inc")),
    ),
]

CUDA = find_cuda()
NVCC = CUDA[0] if CUDA else None
if CUDA:
    CUDA_ROOT = CUDA[1]
    lib_dirs = [d for d in (os.path.join(CUDA_ROOT, "lib64"), os.path.join(CUDA_ROOT, "lib")) if os.path.isdir(d)]
    ext_modules.append(
        Pybind11Extension(
            "ckpt._C_cuda",
            sources=["csrc/cuda_bindings.cc"],
            include_dirs=[CSRC],
            cxx_std=17,
            extra_compile_args=COMMON_ARGS,
            library_dirs=lib_dirs,
            # The static cudart (what `nvcc -cudart static` links) plus what it needs.
            libraries=["cudart_static", "dl", "rt"],
            extra_link_args=["-pthread"],
            # A CUDA toolchain that fails must not fail the install: warn and go on
            # without ckpt._C_cuda (the CPU path still works).
            optional=True,
        )
    )
    ext_modules.append(
        Pybind11Extension(
            "ckpt._ec_cuda",
            sources=["csrc/ec/ec_cuda_bindings.cc"],
            include_dirs=[CSRC],
            cxx_std=17,
            extra_compile_args=list(COMMON_ARGS),
            library_dirs=lib_dirs,
            libraries=["cudart_static", "dl", "rt"],
            extra_link_args=["-pthread"],
            optional=True,
        )
    )

# The .cu files nvcc compiles for each CUDA extension.
CUDA_SOURCES = {
    "ckpt._C_cuda": lambda: sorted(glob.glob(os.path.join("csrc", "*.cu"))),
    "ckpt._ec_cuda": lambda: [os.path.join("csrc", "ec", "ec_cuda.cu")],
}


class BuildExt(build_ext):
    """build_ext that compiles csrc/*.cu with nvcc for the CUDA extension."""

    def copy_file(self, infile, outfile, *args, **kwargs):
        # In-place builds replace src/ckpt/_C*.so while other processes may have it
        # mapped: write a temporary file and rename it over, never truncate in place.
        if not str(outfile).endswith(".so") or getattr(self, "dry_run", False):
            return super().copy_file(infile, outfile, *args, **kwargs)
        if os.path.isdir(outfile):
            outfile = os.path.join(outfile, os.path.basename(infile))
        tmp = f"{outfile}.tmp-{os.getpid()}"
        shutil.copyfile(infile, tmp)
        shutil.copymode(infile, tmp)
        os.replace(tmp, outfile)
        return outfile, True

    def build_extension(self, ext):
        if ext.name in CUDA_SOURCES:
            ext.extra_objects = self._compile_cuda(ext)
        super().build_extension(ext)

    def _compile_cuda(self, ext) -> list[str]:
        out_dir = os.path.join(self.build_temp, "cuda")
        os.makedirs(out_dir, exist_ok=True)
        gencode = []
        for arch in CUDA_ARCHS:
            gencode += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
        gencode += ["-gencode", f"arch=compute_{CUDA_ARCHS[-1]},code=compute_{CUDA_ARCHS[-1]}"]  # PTX
        objects = []
        for src in CUDA_SOURCES[ext.name]():
            obj = os.path.join(out_dir, os.path.basename(src) + ".o")
            deps = [src] + glob.glob(os.path.join(os.path.dirname(src), "*.h")) + [
                os.path.join("csrc", "cuda_device.h")]
            if not self.force and os.path.exists(obj) and all(
                os.path.getmtime(obj) >= os.path.getmtime(d) for d in deps
            ):
                objects.append(obj)
                continue
            cmd = [NVCC, "-c", src, "-o", obj, "-O3", "-std=c++17", "-cudart", "static",
                   "-Xcompiler", "-fPIC,-fvisibility=hidden", "-I", "csrc", "-I", os.path.join(CUDA_ROOT, "include"), *gencode]
            print(" ".join(cmd), flush=True)
            subprocess.check_call(cmd, cwd=HERE)
            objects.append(obj)
        return objects


setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildExt})
