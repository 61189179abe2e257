// Plain C++ interface to the codec's CUDA kernel (compiled by nvcc in
// ec_cuda.cu). Returns cudaError_t values as ints and never throws;
// ec_cuda_bindings.cc (host compiler, no CUDA headers) turns failures into errors.
#pragma once

#include <cstdint>

namespace ckpt_ec_cuda {

// Most k a launch takes (the descriptor travels as a kernel parameter).
constexpr int kMaxCols = 255;

int device_count(int* count);

// On `device`, enqueued on `stream` (a cudaStream_t as an integer; 0 = default):
//   dst[r] (^= when accumulate) XOR_j coefs[r*cols + j] * src[j]   for r < rows
// over len bytes of device memory each; GF(2^8) under 0x11d, the same bytes as
// the CPU kernels. Asynchronous. On failure *failed_call names the CUDA call.
int dot(int device, const uint64_t* src, int cols, const uint64_t* dst, int rows, const uint8_t* coefs,
        uint64_t len, uint64_t stream, bool accumulate, const char** failed_call);

const char* error_string(int err);

}  // namespace ckpt_ec_cuda
