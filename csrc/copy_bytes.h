// memcpy without the short-distance `rep movsb` cliff.
//
// glibc copies mid-sized blocks (a few KiB up to about the L2 size) with
// `rep movsb`. On AMD Zen 3 that instruction runs 10-40x slower when the
// destination is 1..63 bytes ahead of the source modulo 4 KiB: 1.6-2.7 GB/s
// instead of 30-70 GB/s for 4-256 KiB in cache (bench/copy_engine.py, the
// in-cache sweep). The pair arises whenever a tensor is a view at an odd byte
// offset (a flat parameter's pieces, a slice) and is copied to or from a
// 64-byte aligned slot. copy_bytes() takes plain vector moves there and
// memcpy everywhere else.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#include <emmintrin.h>
#endif

namespace ckpt {

// Sizes where glibc may pick `rep movsb`; above them it streams and is fine.
constexpr size_t kRepMovsbMinBytes = 1024;
constexpr size_t kRepMovsbMaxBytes = size_t(4) << 20;

inline bool rep_movsb_cliff(const void* dst, const void* src, size_t n) {
  uintptr_t ahead = (reinterpret_cast<uintptr_t>(dst) - reinterpret_cast<uintptr_t>(src)) & 4095;
  return ahead != 0 && ahead < 64 && n >= kRepMovsbMinBytes && n <= kRepMovsbMaxBytes;
}

inline void copy_bytes(void* dst, const void* src, size_t n) {
#if defined(__x86_64__) || defined(_M_X64)
  if (rep_movsb_cliff(dst, src, n)) {
    auto* d = static_cast<unsigned char*>(dst);
    auto* s = static_cast<const unsigned char*>(src);
    size_t i = 0;
    for (; i + 64 <= n; i += 64) {  // SSE2 is baseline x86-64: no target attribute needed
      __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i));
      __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i + 16));
      __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i + 32));
      __m128i e = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i + 48));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i), a);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i + 16), b);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i + 32), c);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i + 48), e);
    }
    std::memcpy(d + i, s + i, n - i);  // < 64 bytes: no rep movsb
    return;
  }
#endif
  std::memcpy(dst, src, n);
}

}  // namespace ckpt
