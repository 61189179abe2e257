// The byte kernels of the codec, one set per instruction-set level. Every
// level computes the same bytes as the scalar one (the oracle); the SIMD files
// carry their own target options so one build runs on any x86-64 and a level
// is only called after cpu.cc found it usable.
#pragma once

#include <cstddef>
#include <cstdint>

namespace ckpt_ec {

// The order is the CKPT_EC_ISA cap order; neon (aarch64) sits above the x86 levels.
enum Isa : int { kScalar = 0, kSsse3 = 1, kAvx2 = 2, kAvx512 = 3, kGfni = 4, kNeon = 5, kNumIsa = 6 };

const char* isa_name(int isa);
int isa_from_name(const char* name);  // -1 when unknown

// One pass of the dot-product kernel over `len` bytes:
//   dst[r] (^)= XOR_j coef[r][j] * src[j]   for r < rows, j < k.
// `tables` holds this level's per-coefficient tables for the pass's first row,
// table_bytes each, laid out [r][j] with `table_stride` bytes per row. `coefs`
// is the same rows' coefficients ([r][j], `coef_stride` per row), used by the
// scalar kernel and by the SIMD kernels' tails. No dst may overlap a src.
struct DotCall {
  size_t len;
  int k;
  int rows;
  const uint8_t* const* src;
  uint8_t* const* dst;
  const uint8_t* coefs;
  size_t coef_stride;
  const uint8_t* tables;
  size_t table_stride;
  bool accumulate;  // XOR into dst instead of overwriting it
};

struct IsaKernels {
  int isa;
  int max_rows;        // rows one pass computes
  size_t table_bytes;  // per coefficient; 0: the kernel reads coefs only
  void (*make_table)(uint8_t c, uint8_t* out);
  void (*dot)(const DotCall& call);
  // dst (^)= XOR of n sources (a row whose coefficients are all 0 or 1).
  void (*xor_sum)(size_t len, int n, const uint8_t* const* src, uint8_t* dst, bool accumulate);
};

// Each returns nullptr when the level is compiled out (CKPT_EC_NO_TABLE_SIMD
// for ssse3/avx2/avx512/neon) or the target is not x86-64 (aarch64 for neon).
const IsaKernels* kernels_scalar();
const IsaKernels* kernels_ssse3();
const IsaKernels* kernels_avx2();
const IsaKernels* kernels_avx512();
const IsaKernels* kernels_gfni(bool zmm);  // zmm: 512-bit vectors (needs AVX-512BW) else 256-bit
const IsaKernels* kernels_neon();

// Scalar tails for the SIMD kernels: the bytes [begin, len) of the call.
void scalar_dot_from(const DotCall& call, size_t begin);
void scalar_xor_from(size_t begin, size_t len, int n, const uint8_t* const* src, uint8_t* dst,
                     bool accumulate);

}  // namespace ckpt_ec
