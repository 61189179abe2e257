// AVX-512BW split-nibble kernels (64-byte vectors, up to 6 rows per pass).
// Compiled everywhere, called only where cpu.cc found AVX-512F/BW and the OS
// saving the ZMM state (XCR0).
#include <cstddef>
#include <cstdint>

#include "gf.h"
#include "kernels.h"

#if (defined(__x86_64__) || defined(_M_X64)) && !defined(CKPT_EC_NO_TABLE_SIMD)
#include <immintrin.h>

// GCC 12's AVX-512 intrinsics self-initialise undefined vectors (_mm512_undefined_*),
// which -Wmaybe-uninitialized reports as a false positive.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw")
#endif

namespace ckpt_ec {
namespace {

struct V {
  using reg = __m512i;
  static constexpr size_t kBytes = 64;
  static constexpr int kMaxRows = 6;
  static constexpr int kUnroll = 12;  // vectors of accumulators per pass (U * R)
  static inline reg load(const uint8_t* p) { return _mm512_loadu_si512(p); }
  static inline void store(uint8_t* p, reg v) { _mm512_storeu_si512(p, v); }
  static inline reg zero() { return _mm512_setzero_si512(); }
  static inline reg mask() { return _mm512_set1_epi8(0x0f); }
  static inline reg lo(reg v, reg m) { return _mm512_and_si512(v, m); }
  static inline reg hi(reg v, reg m) { return _mm512_and_si512(_mm512_srli_epi64(v, 4), m); }
  static inline reg table(const uint8_t* p) {
    return _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static inline reg shuffle(reg t, reg idx) { return _mm512_shuffle_epi8(t, idx); }
  static inline reg xor2(reg a, reg b) { return _mm512_xor_si512(a, b); }
  static inline reg xor3(reg a, reg b, reg c) { return _mm512_ternarylogic_epi64(a, b, c, 0x96); }
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
const IsaKernels* kernels_avx512() {
  static const IsaKernels k = {kAvx512, V::kMaxRows, 32, nibble_table, dot, xor_sum};
  return &k;
}
}  // namespace ckpt_ec

#else
namespace ckpt_ec {
const IsaKernels* kernels_avx512() { return nullptr; }
}  // namespace ckpt_ec
#endif
