// See crc32c.h. The hardware path follows Mark Adler's crc32c.c: three streams
// are crc'd in parallel (the crc32 instruction has latency 3 and throughput 1),
// then combined by "shifting" the earlier streams' crcs over the later bytes
// with precomputed 4x256 tables (multiplication by x^(8*len) mod P).
#include "crc32c.h"

#include <cstdlib>
#include <cstring>

#include "copy_bytes.h"
#include "crc32c_fold.h"
#include "crc32c_split.h"

#if defined(__x86_64__)  // crc32 on 64-bit words; 32-bit x86 takes the scalar path
#include <nmmintrin.h>
#define CKPT_X86 1
#define CKPT_CRC_HW 1
#define CKPT_CRC_TARGET __attribute__((target("sse4.2")))
#elif defined(__aarch64__)
#include <arm_acle.h>
#if defined(__linux__)
#include <sys/auxv.h>
#endif
#define CKPT_CRC_HW 1
#if defined(__clang__)
#define CKPT_CRC_TARGET __attribute__((target("crc")))
#else
#define CKPT_CRC_TARGET __attribute__((target("+crc")))
#endif
#endif

namespace ckpt {
namespace {

using ckpt_crc::kPoly;
using ckpt_crc::multmodp;  // GF(2) arithmetic modulo P (reflected), as in zlib's crc32_combine

// x^(2^k) mod P, for the shifts below and crc32c_combine.
constexpr ckpt_crc::Powers kPowers = ckpt_crc::make_powers();

struct Tables {
  uint32_t slice[8][256];
  uint32_t shift_long[4][256];  // multiply by x^(8*kLong) mod P
  uint32_t shift_short[4][256]; // multiply by x^(8*kShort) mod P
  bool hw = false;
  bool fold = false;  // long runs by carry-less folding (crc32c_fold.h)
  bool blocked = false;
  Tables();
};

constexpr size_t kLong = 8192;
constexpr size_t kShort = 256;
constexpr size_t kFuseBlock = 64 * 1024;
// Fused copies at least this long use non-temporal stores (see stream64)...
constexpr size_t kStreamMinBytes = 256 * 1024;
// ...unless the destination is a little ahead of the source modulo 4 KiB: a load
// then matches the low 12 address bits of a streaming store a few iterations old,
// which cannot forward, so the load waits for the write-combining buffer to drain.
// bench/copy_engine.py on AMD Zen 3 (1 thread): 0.13-0.18 GB/s for (dst - src) %
// 4096 in 8..64, 1.6-3 GB/s at 0, 128, 4080 and 4088, 6.2-9.2 GB/s from 192 to
// 4032; cached stores run at 5.4-6.8 GB/s whatever the offsets. The unsafe distance grows with
// the store buffer (3 stores per 8 bytes of distance: Zen 3's 64 entries reach
// ~170 bytes, Golden Cove's 114 ~300), so stream only from 512 bytes ahead.
constexpr size_t kStreamMinAheadBytes = 512;
constexpr size_t kStreamMaxAheadBytes = 4096 - 64;

inline bool stream_safe(const unsigned char* src, const unsigned char* dst) {
  const size_t ahead = (reinterpret_cast<uintptr_t>(dst) - reinterpret_cast<uintptr_t>(src)) & 4095;
  return ahead >= kStreamMinAheadBytes && ahead <= kStreamMaxAheadBytes;
}

void make_shift_table(uint32_t table[4][256], uint32_t op) {
  for (uint32_t j = 0; j < 4; j++)
    for (uint32_t b = 0; b < 256; b++) table[j][b] = multmodp(op, b << (8 * j));
}

// The crc32c instruction: SSE4.2 `crc32` on x86-64, the ARMv8 CRC extension's
// `crc32c[bx]` on aarch64 (optional in ARMv8.0, mandatory from ARMv8.1: Graviton,
// Grace and Apple cores all have it).
bool cpu_has_crc_instruction() {
#if defined(CKPT_X86)
  __builtin_cpu_init();
  return __builtin_cpu_supports("sse4.2");
#elif defined(__aarch64__) && defined(__linux__)
  constexpr unsigned long kHwcapCrc32 = 1ul << 7;  // HWCAP_CRC32 in <asm/hwcap.h>
  return (getauxval(AT_HWCAP) & kHwcapCrc32) != 0;
#elif defined(__aarch64__) && defined(__APPLE__)
  return true;
#else
  return false;
#endif
}

#ifdef CKPT_CRC_HW
#if defined(CKPT_X86)
CKPT_CRC_TARGET inline uint64_t crc_word(uint64_t c, uint64_t w) { return _mm_crc32_u64(c, w); }
CKPT_CRC_TARGET inline uint64_t crc_byte(uint64_t c, unsigned char b) {
  return _mm_crc32_u8(static_cast<uint32_t>(c), b);
}
#else
CKPT_CRC_TARGET inline uint64_t crc_word(uint64_t c, uint64_t w) {
  return __crc32cd(static_cast<uint32_t>(c), w);
}
CKPT_CRC_TARGET inline uint64_t crc_byte(uint64_t c, unsigned char b) {
  return __crc32cb(static_cast<uint32_t>(c), b);
}
#endif
#endif

Tables::Tables() {
  for (uint32_t n = 0; n < 256; n++) {
    uint32_t c = n;
    for (int k = 0; k < 8; k++) c = (c & 1) ? (c >> 1) ^ kPoly : c >> 1;
    slice[0][n] = c;
  }
  for (uint32_t n = 0; n < 256; n++) {
    uint32_t c = slice[0][n];
    for (int k = 1; k < 8; k++) {
      c = slice[0][c & 0xff] ^ (c >> 8);
      slice[k][n] = c;
    }
  }
  make_shift_table(shift_long, ckpt_crc::shift_op(kPowers, kLong));
  make_shift_table(shift_short, ckpt_crc::shift_op(kPowers, kShort));

  const char* impl = std::getenv("CKPT_CRC_IMPL");
  bool force_scalar = impl && std::strcmp(impl, "scalar") == 0;
  hw = !force_scalar && cpu_has_crc_instruction();
  // CKPT_CRC_IMPL=sse4.2 keeps the crc32 instruction where folding would be chosen.
  fold = hw && !(impl && std::strcmp(impl, "sse4.2") == 0) && fold::available();
  const char* fuse = std::getenv("CKPT_FUSE_MODE");
  blocked = fuse && std::strcmp(fuse, "blocked") == 0;
}

const Tables& tables() {
  static const Tables t;
  return t;
}

inline uint32_t shift(const uint32_t table[4][256], uint32_t crc) {
  return table[0][crc & 0xff] ^ table[1][(crc >> 8) & 0xff] ^ table[2][(crc >> 16) & 0xff] ^
         table[3][crc >> 24];
}

inline uint64_t load64(const unsigned char* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}

inline void store64(unsigned char* p, uint64_t v) { std::memcpy(p, &v, 8); }

#ifdef CKPT_X86
// A non-temporal 8-byte store (movnti): big copies go to memory without reading the
// destination lines first (no read-for-ownership), a third less memory traffic.
// Needs an aligned destination; callers fence with _mm_sfence before publishing.
inline void stream64(unsigned char* p, uint64_t v) {
  _mm_stream_si64(reinterpret_cast<long long*>(p), static_cast<long long>(v));
}
#endif

// Slice-by-8 over the inverted register `c` (little-endian hosts).
uint32_t scalar_update(const Tables& t, uint32_t c, const unsigned char* p, size_t n) {
  while (n && (reinterpret_cast<uintptr_t>(p) & 7)) {
    c = t.slice[0][(c ^ *p++) & 0xff] ^ (c >> 8);
    n--;
  }
  while (n >= 8) {
    uint64_t w = load64(p) ^ c;
    c = t.slice[7][w & 0xff] ^ t.slice[6][(w >> 8) & 0xff] ^ t.slice[5][(w >> 16) & 0xff] ^
        t.slice[4][(w >> 24) & 0xff] ^ t.slice[3][(w >> 32) & 0xff] ^
        t.slice[2][(w >> 40) & 0xff] ^ t.slice[1][(w >> 48) & 0xff] ^ t.slice[0][w >> 56];
    p += 8;
    n -= 8;
  }
  while (n--) c = t.slice[0][(c ^ *p++) & 0xff] ^ (c >> 8);
  return c;
}

#ifdef CKPT_CRC_HW
// Three-stream hardware crc over rounds of 3 * kLane bytes. When kCopy, the bytes
// are also stored to *d as they are crc'd ("inline" fusion: one load feeds both).
// kStream (x86 only) stores with movnti.
template <bool kCopy, size_t kLane, bool kStream = false>
CKPT_CRC_TARGET __attribute__((always_inline)) inline void hw_three_way(
    const uint32_t table[4][256], uint64_t& c0, const unsigned char*& p, unsigned char*& d, size_t& n) {
  while (n >= 3 * kLane) {
    uint64_t c1 = 0, c2 = 0;
    const unsigned char* end = p + kLane;
    do {
      uint64_t w0 = load64(p), w1 = load64(p + kLane), w2 = load64(p + 2 * kLane);
#ifdef CKPT_X86
      if (kCopy && kStream) {
        stream64(d, w0);
        stream64(d + kLane, w1);
        stream64(d + 2 * kLane, w2);
        d += 8;
      } else
#endif
      if (kCopy) {
        store64(d, w0);
        store64(d + kLane, w1);
        store64(d + 2 * kLane, w2);
        d += 8;
      }
      c0 = crc_word(c0, w0);
      c1 = crc_word(c1, w1);
      c2 = crc_word(c2, w2);
      p += 8;
    } while (p < end);
    c0 = shift(table, static_cast<uint32_t>(c0)) ^ c1;
    c0 = shift(table, static_cast<uint32_t>(c0)) ^ c2;
    p += 2 * kLane;
    if (kCopy) d += 2 * kLane;
    n -= 3 * kLane;
  }
}

template <bool kCopy>
CKPT_CRC_TARGET uint32_t hw_update(const Tables& t, uint32_t c, const unsigned char* p,
                                   unsigned char* d, size_t n) {
  uint64_t c0 = c;
  while (n && (reinterpret_cast<uintptr_t>(p) & 7)) {
    if (kCopy) *d++ = *p;
    c0 = crc_byte(c0, *p++);
    n--;
  }
  // Copies far bigger than the caches, to an aligned destination that is not a few
  // bytes ahead of the source (stream_safe): stream the long lanes (the tail goes
  // through the cache as usual).
#ifdef CKPT_X86
  if (kCopy && n >= kStreamMinBytes && (reinterpret_cast<uintptr_t>(d) & 7) == 0 &&
      stream_safe(p, d)) {
    hw_three_way<kCopy, kLong, true>(t.shift_long, c0, p, d, n);
    _mm_sfence();
  }
#endif
  hw_three_way<kCopy, kLong>(t.shift_long, c0, p, d, n);
  hw_three_way<kCopy, kShort>(t.shift_short, c0, p, d, n);
  while (n >= 8) {
    uint64_t w = load64(p);
    if (kCopy) {
      store64(d, w);
      d += 8;
    }
    c0 = crc_word(c0, w);
    p += 8;
    n -= 8;
  }
  while (n--) {
    if (kCopy) *d++ = *p;
    c0 = crc_byte(c0, *p++);
  }
  return static_cast<uint32_t>(c0);
}
#endif

// Runs shorter than this stay on the crc32 instruction: folding has a fixed cost of
// about one round's worth of crc32 work (the lane reduction).
constexpr size_t kFoldMinBytes = 2048;

uint32_t update(const Tables& t, uint32_t c, const unsigned char* p, size_t n) {
#ifdef CKPT_CRC_HW
  if (t.fold && n >= kFoldMinBytes) {
    const size_t bulk = n - n % fold::kRoundBytes;
    c = fold::update(c, p, bulk);
    p += bulk;
    n -= bulk;
  }
  if (t.hw) return hw_update<false>(t, c, p, nullptr, n);
#endif
  return scalar_update(t, c, p, n);
}

#ifdef CKPT_CRC_HW
// The fused copy by folding: streamed (non-temporal) where hw_update would stream, once
// the destination is 64-byte aligned (the bytes before that go through hw_update).
uint32_t fold_copy(const Tables& t, uint32_t c, const unsigned char* s, unsigned char* d,
                   size_t n) {
  bool stream = false;
#ifdef CKPT_X86
  if (n >= kStreamMinBytes && stream_safe(s, d)) {
    const size_t head = -reinterpret_cast<uintptr_t>(d) & 63;
    c = hw_update<true>(t, c, s, d, head);
    s += head;
    d += head;
    n -= head;
    stream = true;
  }
#endif
  const size_t bulk = n - n % fold::kRoundBytes;
  if (bulk) c = fold::update_copy(c, s, d, bulk, stream);
  return hw_update<true>(t, c, s + bulk, d + bulk, n - bulk);
}
#endif

}  // namespace

uint32_t crc32c(const void* data, size_t n, uint32_t crc) {
  const Tables& t = tables();
  return ~update(t, ~crc, static_cast<const unsigned char*>(data), n);
}

uint32_t crc32c_scalar(const void* data, size_t n, uint32_t crc) {
  return ~scalar_update(tables(), ~crc, static_cast<const unsigned char*>(data), n);
}

uint32_t crc32c_copy(void* dst, const void* src, size_t n, uint32_t crc) {
  const Tables& t = tables();
  auto* d = static_cast<unsigned char*>(dst);
  auto* s = static_cast<const unsigned char*>(src);
  uint32_t c = ~crc;
#ifdef CKPT_CRC_HW
  if (t.fold && !t.blocked && n >= kFoldMinBytes) return ~fold_copy(t, c, s, d, n);
  if (t.hw && !t.blocked) return ~hw_update<true>(t, c, s, d, n);
#endif
  // Blocked: copy a block that fits in L2, then crc the destination while hot.
  while (n) {
    size_t m = n < kFuseBlock ? n : kFuseBlock;
    ckpt::copy_bytes(d, s, m);
    c = update(t, c, d, m);
    d += m;
    s += m;
    n -= m;
  }
  return ~c;
}

uint32_t crc32c_combine(uint32_t crc_a, uint32_t crc_b, uint64_t len_b) {
  return ckpt_crc::combine(crc_a, crc_b, ckpt_crc::shift_op(kPowers, len_b));
}

const char* crc32c_impl() {
#if defined(CKPT_X86)
  return tables().fold ? "vpclmulqdq" : tables().hw ? "sse4.2" : "scalar";
#else
  return tables().hw ? "armv8-crc" : "scalar";
#endif
}

const char* crc32c_fuse_mode() {
  const Tables& t = tables();
  return (t.hw && !t.blocked) ? "inline" : "blocked";
}

}  // namespace ckpt
