// crc32c by carry-less folding with AVX-512 VPCLMULQDQ (see crc32c_fold.h).
//
// The reflected-crc folding of Intel's "Fast CRC Computation for Generic Polynomials
// Using PCLMULQDQ": a 128-bit lane A with d bits of data after it is congruent, modulo
// P, to clmul(A.lo, K(d + 32)) ^ clmul(A.hi, K(d - 32)) placed d bits later, where
// K(e) = reflect64((x^e mod P) << 32) << 1. Sixteen lanes (four zmm registers, 256
// bytes) fold 256 bytes ahead per round; the lanes then fold into one, and that lane's
// 16 bytes run through the crc32 instruction from 0: the register it leaves is the
// register the whole input leaves (the input's polynomial times x^32, mod P).
#include "crc32c_fold.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include <cstring>

#define CKPT_FOLD_TARGET __attribute__((target("avx512f,vpclmulqdq,pclmul,sse4.2")))

namespace ckpt {
namespace fold {
namespace {

constexpr uint64_t kPolyNormal = 0x11EDC6F41ull;  // crc32c with its x^32 term

constexpr uint64_t xpow_mod(unsigned e) {  // x^e mod P, normal (unreflected) bit order
  uint64_t r = 1;
  for (unsigned i = 0; i < e; i++) {
    r <<= 1;
    if (r >> 32) r ^= kPolyNormal;
  }
  return r;
}

constexpr uint64_t reflect64(uint64_t v) {
  uint64_t r = 0;
  for (int i = 0; i < 64; i++) r |= ((v >> i) & 1) << (63 - i);
  return r;
}

constexpr uint64_t K(unsigned e) { return reflect64(xpow_mod(e) << 32) << 1; }

// Lane constants to fold d bits ahead: low qword for the lane's low half, high for its high.
struct Pair {
  uint64_t lo, hi;
};
constexpr Pair ahead(unsigned d) { return {K(d + 32), K(d - 32)}; }

constexpr Pair kRound = ahead(2048);  // four zmm = 256 bytes = 2048 bits per round
constexpr Pair kZmm1536 = ahead(1536), kZmm1024 = ahead(1024), kZmm512 = ahead(512);
constexpr Pair kLane384 = ahead(384), kLane256 = ahead(256), kLane128 = ahead(128);

CKPT_FOLD_TARGET inline __m512i broadcast(Pair k) {
  return _mm512_set_epi64(static_cast<long long>(k.hi), static_cast<long long>(k.lo),
                          static_cast<long long>(k.hi), static_cast<long long>(k.lo),
                          static_cast<long long>(k.hi), static_cast<long long>(k.lo),
                          static_cast<long long>(k.hi), static_cast<long long>(k.lo));
}

// x folded by k, xor y: the three-way xor in one vpternlogq.
CKPT_FOLD_TARGET inline __m512i fold_xor(__m512i x, __m512i k, __m512i y) {
  return _mm512_ternarylogic_epi64(_mm512_clmulepi64_epi128(x, k, 0x00),
                                   _mm512_clmulepi64_epi128(x, k, 0x11), y, 0x96);
}

template <bool kStore, bool kStream>
CKPT_FOLD_TARGET inline void put(unsigned char* d, __m512i v) {
  if (!kStore) return;
  if (kStream) {
    _mm512_stream_si512(reinterpret_cast<__m512i*>(d), v);
  } else {
    _mm512_storeu_si512(d, v);
  }
}

template <bool kStore, bool kStream>
CKPT_FOLD_TARGET uint32_t run(uint32_t reg, const unsigned char* s, unsigned char* d,
                              size_t n) {
  __m512i x0 = _mm512_loadu_si512(s), x1 = _mm512_loadu_si512(s + 64);
  __m512i x2 = _mm512_loadu_si512(s + 128), x3 = _mm512_loadu_si512(s + 192);
  put<kStore, kStream>(d, x0);
  put<kStore, kStream>(d + 64, x1);
  put<kStore, kStream>(d + 128, x2);
  put<kStore, kStream>(d + 192, x3);
  x0 = _mm512_xor_si512(x0, _mm512_inserti32x4(_mm512_setzero_si512(),
                                               _mm_cvtsi32_si128(static_cast<int>(reg)), 0));
  const __m512i k = broadcast(kRound);
  for (size_t off = 256; off < n; off += 256) {
    const __m512i y0 = _mm512_loadu_si512(s + off), y1 = _mm512_loadu_si512(s + off + 64);
    const __m512i y2 = _mm512_loadu_si512(s + off + 128), y3 = _mm512_loadu_si512(s + off + 192);
    put<kStore, kStream>(d + off, y0);
    put<kStore, kStream>(d + off + 64, y1);
    put<kStore, kStream>(d + off + 128, y2);
    put<kStore, kStream>(d + off + 192, y3);
    x0 = fold_xor(x0, k, y0);
    x1 = fold_xor(x1, k, y1);
    x2 = fold_xor(x2, k, y2);
    x3 = fold_xor(x3, k, y3);
  }
  if (kStream) _mm_sfence();
  // x_i's lanes precede x3's by (3 - i) * 512 bits.
  __m512i y = fold_xor(x0, broadcast(kZmm1536), x3);
  y = fold_xor(x1, broadcast(kZmm1024), y);
  y = fold_xor(x2, broadcast(kZmm512), y);
  // Lane j of y precedes lane 3 by (3 - j) * 128 bits; lane 3 stays as it is.
  const __m512i lane_k = _mm512_set_epi64(0, 0, static_cast<long long>(kLane128.hi),
                                          static_cast<long long>(kLane128.lo),
                                          static_cast<long long>(kLane256.hi),
                                          static_cast<long long>(kLane256.lo),
                                          static_cast<long long>(kLane384.hi),
                                          static_cast<long long>(kLane384.lo));
  __m512i z = _mm512_xor_si512(_mm512_clmulepi64_epi128(y, lane_k, 0x00),
                               _mm512_clmulepi64_epi128(y, lane_k, 0x11));
  z = _mm512_mask_mov_epi64(z, 0xC0, y);  // qwords 6 and 7: lane 3 itself
  __m128i acc = _mm_xor_si128(
      _mm_xor_si128(_mm512_extracti32x4_epi32(z, 0), _mm512_extracti32x4_epi32(z, 1)),
      _mm_xor_si128(_mm512_extracti32x4_epi32(z, 2), _mm512_extracti32x4_epi32(z, 3)));
  uint64_t c = _mm_crc32_u64(0, static_cast<uint64_t>(_mm_cvtsi128_si64(acc)));
  c = _mm_crc32_u64(c, static_cast<uint64_t>(_mm_extract_epi64(acc, 1)));
  return static_cast<uint32_t>(c);
}

}  // namespace

bool available() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("vpclmulqdq") &&
         __builtin_cpu_supports("pclmul") && __builtin_cpu_supports("sse4.2");
}

uint32_t update(uint32_t reg, const unsigned char* s, size_t n) {
  return run<false, false>(reg, s, nullptr, n);
}

uint32_t update_copy(uint32_t reg, const unsigned char* s, unsigned char* d, size_t n,
                     bool stream) {
  return stream ? run<true, true>(reg, s, d, n) : run<true, false>(reg, s, d, n);
}

}  // namespace fold
}  // namespace ckpt

#else  // not x86-64: no folding kernel

namespace ckpt {
namespace fold {
bool available() { return false; }
uint32_t update(uint32_t reg, const unsigned char*, size_t) { return reg; }
uint32_t update_copy(uint32_t reg, const unsigned char*, unsigned char*, size_t, bool) {
  return reg;
}
}  // namespace fold
}  // namespace ckpt

#endif
