// AVX2 split-nibble kernels (32-byte vectors, up to 4 rows per pass).
#include <cstddef>
#include <cstdint>

#include "gf.h"
#include "kernels.h"

#if (defined(__x86_64__) || defined(_M_X64)) && !defined(CKPT_EC_NO_TABLE_SIMD)
#include <immintrin.h>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2")
#endif

namespace ckpt_ec {
namespace {

struct V {
  using reg = __m256i;
  static constexpr size_t kBytes = 32;
  static constexpr int kMaxRows = 4;
  static constexpr int kUnroll = 12;  // vectors of accumulators per pass (U * R)
  static inline reg load(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static inline void store(uint8_t* p, reg v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v); }
  static inline reg zero() { return _mm256_setzero_si256(); }
  static inline reg mask() { return _mm256_set1_epi8(0x0f); }
  static inline reg lo(reg v, reg m) { return _mm256_and_si256(v, m); }
  static inline reg hi(reg v, reg m) { return _mm256_and_si256(_mm256_srli_epi64(v, 4), m); }
  static inline reg table(const uint8_t* p) {
    return _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static inline reg shuffle(reg t, reg idx) { return _mm256_shuffle_epi8(t, idx); }
  static inline reg xor2(reg a, reg b) { return _mm256_xor_si256(a, b); }
  static inline reg xor3(reg a, reg b, reg c) { return _mm256_xor_si256(a, _mm256_xor_si256(b, c)); }
};

#include "kernels_pshufb.inc"

}  // namespace
}  // namespace ckpt_ec

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

namespace ckpt_ec {
const IsaKernels* kernels_avx2() {
  static const IsaKernels k = {kAvx2, V::kMaxRows, 32, nibble_table, dot, xor_sum};
  return &k;
}
}  // namespace ckpt_ec

#else
namespace ckpt_ec {
const IsaKernels* kernels_avx2() { return nullptr; }
}  // namespace ckpt_ec
#endif
