// crc32c by carry-less multiplication (AVX-512 VPCLMULQDQ): 256 bytes folded per round
// in sixteen 128-bit lanes, for CPUs where that outruns the crc32 instruction (Zen 4/5,
// Ice Lake and later Xeons). x86-64 only; elsewhere available() is false.
//
// Registers here are the raw crc register (no pre/post inversion): crc32c.cc's `c`.
#pragma once

#include <cstddef>
#include <cstdint>

namespace ckpt {
namespace fold {

// Bytes per folding round: update() and update_copy() take multiples of it.
constexpr size_t kRoundBytes = 256;

// The CPU (and OS) run AVX-512F, VPCLMULQDQ, PCLMUL and SSE4.2.
bool available();

// The register after the n bytes at s, starting from reg; n % kRoundBytes == 0, n > 0.
uint32_t update(uint32_t reg, const unsigned char* s, size_t n);

// Same, storing the bytes to d as they are read (non-temporal stores when stream: d
// then must be 64-byte aligned; the stores are fenced before this returns).
uint32_t update_copy(uint32_t reg, const unsigned char* s, unsigned char* d, size_t n,
                     bool stream);

}  // namespace fold
}  // namespace ckpt
