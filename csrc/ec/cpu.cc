// See cpu.h. The OS-support check matters: a CPU may report AVX-512 while the
// kernel (or a hypervisor) does not save ZMM registers, and then the first
// AVX-512 instruction faults; xgetbv's XCR0 says what the OS saves.
#include "cpu.h"

#include <cstdlib>

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#define CKPT_EC_X86 1
#endif

namespace ckpt_ec {
namespace {

#ifdef CKPT_EC_X86
uint64_t read_xcr0() {
  uint32_t eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (uint64_t(edx) << 32) | eax;
}

CpuFeatures detect() {
  CpuFeatures f;
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  f.ssse3 = c & (1u << 9);
  bool osxsave = c & (1u << 27), avx = c & (1u << 28);
  uint64_t xcr0 = osxsave ? read_xcr0() : 0;
  bool ymm_os = (xcr0 & 0x6) == 0x6;    // SSE + AVX state
  bool zmm_os = (xcr0 & 0xe6) == 0xe6;  // + opmask, ZMM_Hi256, Hi16_ZMM
  unsigned max_leaf = __get_cpuid_max(0, nullptr);
  if (max_leaf < 7) return f;
  __cpuid_count(7, 0, a, b, c, d);
  bool avx2 = b & (1u << 5), avx512f = b & (1u << 16), avx512bw = b & (1u << 30);
  bool gfni = c & (1u << 8);
  f.avx2 = avx && avx2 && ymm_os;
  f.avx512bw = f.avx2 && avx512f && avx512bw && zmm_os;
  f.gfni = gfni && (f.avx2 || f.avx512bw);
  return f;
}
#elif defined(__aarch64__)
CpuFeatures detect() {
  CpuFeatures f;
  f.neon = true;
  return f;
}
#else
CpuFeatures detect() { return CpuFeatures(); }
#endif

}  // namespace

const CpuFeatures& cpu_features() {
  static const CpuFeatures f = detect();
  return f;
}

const IsaKernels* kernels_for(int isa) {
  const CpuFeatures& f = cpu_features();
  switch (isa) {
    case kScalar: return kernels_scalar();
    case kSsse3: return f.ssse3 ? kernels_ssse3() : nullptr;
    case kAvx2: return f.avx2 ? kernels_avx2() : nullptr;
    case kAvx512: return f.avx512bw ? kernels_avx512() : nullptr;
    case kGfni: return f.gfni ? kernels_gfni(f.avx512bw) : nullptr;
    case kNeon: return f.neon ? kernels_neon() : nullptr;
    default: return nullptr;
  }
}

int default_isa(std::string* error) {
  struct Choice {
    int isa;
    std::string error;
    Choice() {
      int cap = kNumIsa - 1;
      const char* env = std::getenv("CKPT_EC_ISA");
      if (env && *env) {
        cap = isa_from_name(env);
        if (cap < 0) {
          isa = -1;
          error = std::string("CKPT_EC_ISA=") + env +
                  " is not a kernel level; use one of scalar, ssse3, avx2, avx512, gfni, neon (or unset it)";
          return;
        }
      }
      isa = kScalar;
      for (int i = cap; i > kScalar; i--)
        if (kernels_for(i)) {
          isa = i;
          break;
        }
    }
  };
  static const Choice choice;
  if (choice.isa < 0 && error) *error = choice.error;
  return choice.isa;
}

}  // namespace ckpt_ec
