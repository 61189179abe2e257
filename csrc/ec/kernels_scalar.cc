// The scalar kernels: the reference every SIMD level is tested against, the
// SIMD kernels' tails, and the only path on non-x86 targets.
#include <cstring>

#include "gf.h"
#include "kernels.h"

namespace ckpt_ec {
namespace {

const char* const kNames[kNumIsa] = {"scalar", "ssse3", "avx2", "avx512", "gfni", "neon"};

void scalar_dot(const DotCall& c) { scalar_dot_from(c, 0); }

void scalar_xor(size_t len, int n, const uint8_t* const* src, uint8_t* dst, bool accumulate) {
  scalar_xor_from(0, len, n, src, dst, accumulate);
}

}  // namespace

const char* isa_name(int isa) { return isa >= 0 && isa < kNumIsa ? kNames[isa] : "?"; }

int isa_from_name(const char* name) {
  for (int i = 0; i < kNumIsa; i++)
    if (std::strcmp(name, kNames[i]) == 0) return i;
  return -1;
}

void scalar_dot_from(const DotCall& c, size_t begin) {
  if (begin >= c.len) return;
  const GfTables& g = gf();
  size_t n = c.len - begin;
  for (int r = 0; r < c.rows; r++) {
    uint8_t* d = c.dst[r] + begin;
    const uint8_t* co = c.coefs + size_t(r) * c.coef_stride;
    if (!c.accumulate) std::memset(d, 0, n);
    for (int j = 0; j < c.k; j++) {
      const uint8_t* s = c.src[j] + begin;
      if (co[j] == 0) continue;
      if (co[j] == 1) {
        for (size_t i = 0; i < n; i++) d[i] ^= s[i];
        continue;
      }
      const uint8_t* mt = g.mul[co[j]];
      for (size_t i = 0; i < n; i++) d[i] ^= mt[s[i]];
    }
  }
}

void scalar_xor_from(size_t begin, size_t len, int n, const uint8_t* const* src, uint8_t* dst,
                     bool accumulate) {
  if (begin >= len) return;
  size_t cnt = len - begin;
  uint8_t* d = dst + begin;
  if (!accumulate) std::memset(d, 0, cnt);
  for (int j = 0; j < n; j++) {
    const uint8_t* s = src[j] + begin;
    for (size_t i = 0; i < cnt; i++) d[i] ^= s[i];
  }
}

const IsaKernels* kernels_scalar() {
  static const IsaKernels k = {kScalar, 1 << 30, 0, nullptr, scalar_dot, scalar_xor};
  return &k;
}

}  // namespace ckpt_ec
