// NEON split-nibble kernels for aarch64 (16-byte vectors, up to 4 rows per pass).
// TBL is ARM's PSHUFB (an index of 16 or more gives 0) and NEON shifts bytes, so the
// high nibble needs no mask. Advanced SIMD is part of every aarch64 core: no target
// attribute and no run-time check beyond the architecture.
#include <cstddef>
#include <cstdint>

#include "gf.h"
#include "kernels.h"

#if defined(__aarch64__) && !defined(CKPT_EC_NO_TABLE_SIMD)
#include <arm_neon.h>

namespace ckpt_ec {
namespace {

struct V {
  using reg = uint8x16_t;
  static constexpr size_t kBytes = 16;
  static constexpr int kMaxRows = 4;
  static constexpr int kUnroll = 16;  // vectors of accumulators per pass (U * R): 32 registers
  static inline reg load(const uint8_t* p) { return vld1q_u8(p); }
  static inline void store(uint8_t* p, reg v) { vst1q_u8(p, v); }
  static inline reg zero() { return vdupq_n_u8(0); }
  static inline reg mask() { return vdupq_n_u8(0x0f); }
  static inline reg lo(reg v, reg m) { return vandq_u8(v, m); }
  static inline reg hi(reg v, reg) { return vshrq_n_u8(v, 4); }
  static inline reg table(const uint8_t* p) { return vld1q_u8(p); }
  static inline reg shuffle(reg t, reg idx) { return vqtbl1q_u8(t, idx); }
  static inline reg xor2(reg a, reg b) { return veorq_u8(a, b); }
  static inline reg xor3(reg a, reg b, reg c) { return veorq_u8(a, veorq_u8(b, c)); }
};

#include "kernels_pshufb.inc"

}  // namespace

const IsaKernels* kernels_neon() {
  static const IsaKernels k = {kNeon, V::kMaxRows, 32, nibble_table, dot, xor_sum};
  return &k;
}

}  // namespace ckpt_ec

#else
namespace ckpt_ec {
const IsaKernels* kernels_neon() { return nullptr; }
}  // namespace ckpt_ec
#endif
