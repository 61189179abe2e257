// crc32c (Castagnoli, reflected polynomial 0x82F63B78) with a runtime-chosen
// implementation: the crc32c instruction (SSE4.2 on x86-64, the CRC extension on
// aarch64) over three interleaved streams when the CPU has it, runs of 2 KiB and more
// folded with AVX-512 VPCLMULQDQ where the CPU has that, slice-by-8 tables otherwise. The scalar version is the oracle for tests.
#pragma once

#include <cstddef>
#include <cstdint>

namespace ckpt {

// Standard crc32c of `n` bytes continuing from `crc` (0 for a fresh crc):
// crc32c(b"123456789") == 0xE3069283.
uint32_t crc32c(const void* data, size_t n, uint32_t crc = 0);

// Copies n bytes from src to dst (non-overlapping) and returns the crc32c of
// the copied bytes, continuing from `crc`, in one pass over the data.
uint32_t crc32c_copy(void* dst, const void* src, size_t n, uint32_t crc = 0);

// crc32c of A||B given crc(A), crc(B) and len(B).
uint32_t crc32c_combine(uint32_t crc_a, uint32_t crc_b, uint64_t len_b);

// "vpclmulqdq" (long runs folded, the rest by the crc32 instruction), "sse4.2",
// "armv8-crc" or "scalar"; chosen once at load (env CKPT_CRC_IMPL=scalar forces scalar,
// CKPT_CRC_IMPL=sse4.2 the crc32 instruction without folding).
const char* crc32c_impl();

// Always-scalar versions (the oracle), exposed for tests and benchmarks.
uint32_t crc32c_scalar(const void* data, size_t n, uint32_t crc);

// How crc32c_copy fuses the two: "inline" (crc the words while storing them) or
// "blocked" (memcpy a cache-sized block, then crc it while it is hot). Chosen once
// at load; env CKPT_FUSE_MODE overrides (benchmarks only).
const char* crc32c_fuse_mode();

}  // namespace ckpt
