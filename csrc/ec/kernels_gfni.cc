// GFNI kernels: gf2p8affineqb with the bit matrix of multiply-by-c under 0x11d
// (gf2p8mulb is no use: it multiplies under 0x11b). A 512-bit version (needs
// AVX-512F/BW, up to 6 rows per pass) and a 256-bit one (AVX2, up to 4 rows) for
// CPUs with GFNI but no AVX-512. Called only where cpu.cc found them usable.
// Not a table-lookup path: CKPT_EC_NO_TABLE_SIMD keeps it.
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "gf.h"
#include "kernels.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

// GCC 12's AVX-512 intrinsics self-initialise undefined vectors (_mm512_undefined_*),
// which -Wmaybe-uninitialized reports as a false positive.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace ckpt_ec {
namespace {

void gfni_table(uint8_t c, uint8_t* out) {
  uint64_t a = gfni_matrix(c);
  std::memcpy(out, &a, 8);
}

}  // namespace
}  // namespace ckpt_ec

// ---- 256-bit ----
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,gfni"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,gfni")
#endif

namespace ckpt_ec {
namespace gfni256 {
namespace {

struct V {
  using reg = __m256i;
  static constexpr size_t kBytes = 32;
  static constexpr int kMaxRows = 4;
  static inline reg load(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static inline void store(uint8_t* p, reg v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v); }
  static inline reg zero() { return _mm256_setzero_si256(); }
  static inline reg matrix(const uint8_t* p) {
    long long a;
    std::memcpy(&a, p, 8);
    return _mm256_set1_epi64x(a);
  }
  static inline reg affine(reg x, reg a) { return _mm256_gf2p8affine_epi64_epi8(x, a, 0); }
  static inline reg xor2(reg a, reg b) { return _mm256_xor_si256(a, b); }
};

#include "kernels_gfni.inc"

}  // namespace
}  // namespace gfni256
}  // namespace ckpt_ec

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

// ---- 512-bit ----
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,gfni"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,gfni")
#endif

namespace ckpt_ec {
namespace gfni512 {
namespace {

struct V {
  using reg = __m512i;
  static constexpr size_t kBytes = 64;
  static constexpr int kMaxRows = 6;
  static inline reg load(const uint8_t* p) { return _mm512_loadu_si512(p); }
  static inline void store(uint8_t* p, reg v) { _mm512_storeu_si512(p, v); }
  static inline reg zero() { return _mm512_setzero_si512(); }
  static inline reg matrix(const uint8_t* p) {
    long long a;
    std::memcpy(&a, p, 8);
    return _mm512_set1_epi64(a);
  }
  static inline reg affine(reg x, reg a) { return _mm512_gf2p8affine_epi64_epi8(x, a, 0); }
  static inline reg xor2(reg a, reg b) { return _mm512_xor_si512(a, b); }
};

#include "kernels_gfni.inc"

}  // namespace
}  // namespace gfni512
}  // namespace ckpt_ec

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

namespace ckpt_ec {
const IsaKernels* kernels_gfni(bool zmm) {
  static const IsaKernels k256 = {kGfni, gfni256::V::kMaxRows, 8, gfni_table, gfni256::dot, gfni256::xor_sum};
  static const IsaKernels k512 = {kGfni, gfni512::V::kMaxRows, 8, gfni_table, gfni512::dot, gfni512::xor_sum};
  return zmm ? &k512 : &k256;
}
}  // namespace ckpt_ec

#else
namespace ckpt_ec {
const IsaKernels* kernels_gfni(bool) { return nullptr; }
}  // namespace ckpt_ec
#endif
