// Which kernel levels this CPU, its OS and this build can run; chosen once.
#pragma once

#include <string>

#include "kernels.h"

namespace ckpt_ec {

struct CpuFeatures {
  bool ssse3 = false;
  bool avx2 = false;     // AVX2 and the OS saves YMM state (XCR0 bits 1, 2)
  bool avx512bw = false; // AVX-512F+BW and the OS saves ZMM/opmask state (XCR0 bits 5-7)
  bool gfni = false;     // GFNI (with AVX2 or AVX-512 usable as above)
  bool neon = false;     // Advanced SIMD: every aarch64 core
};

// cpuid and xgetbv, read once.
const CpuFeatures& cpu_features();

// The kernels of `isa` when this CPU and build can run them, else nullptr.
const IsaKernels* kernels_for(int isa);

// The best usable level at or below the CKPT_EC_ISA cap (read once, at first
// call). An unknown CKPT_EC_ISA value gives -1 and *error says why.
int default_isa(std::string* error);

}  // namespace ckpt_ec
