// SSSE3 split-nibble kernels (16-byte vectors, up to 4 rows per pass).
#include <cstddef>
#include <cstdint>

#include "gf.h"
#include "kernels.h"

#if (defined(__x86_64__) || defined(_M_X64)) && !defined(CKPT_EC_NO_TABLE_SIMD)
#include <immintrin.h>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("ssse3"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("ssse3")
#endif

namespace ckpt_ec {
namespace {

struct V {
  using reg = __m128i;
  static constexpr size_t kBytes = 16;
  static constexpr int kMaxRows = 4;
  static constexpr int kUnroll = 8;  // vectors of accumulators per pass (U * R)
  static inline reg load(const uint8_t* p) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)); }
  static inline void store(uint8_t* p, reg v) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), v); }
  static inline reg zero() { return _mm_setzero_si128(); }
  static inline reg mask() { return _mm_set1_epi8(0x0f); }
  static inline reg lo(reg v, reg m) { return _mm_and_si128(v, m); }
  static inline reg hi(reg v, reg m) { return _mm_and_si128(_mm_srli_epi64(v, 4), m); }
  static inline reg table(const uint8_t* p) { return load(p); }
  static inline reg shuffle(reg t, reg idx) { return _mm_shuffle_epi8(t, idx); }
  static inline reg xor2(reg a, reg b) { return _mm_xor_si128(a, b); }
  static inline reg xor3(reg a, reg b, reg c) { return _mm_xor_si128(a, _mm_xor_si128(b, c)); }
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
const IsaKernels* kernels_ssse3() {
  static const IsaKernels k = {kSsse3, V::kMaxRows, 32, nibble_table, dot, xor_sum};
  return &k;
}
}  // namespace ckpt_ec

#else
namespace ckpt_ec {
const IsaKernels* kernels_ssse3() { return nullptr; }
}  // namespace ckpt_ec
#endif
