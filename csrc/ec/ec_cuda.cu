// The codec's GPU kernel: dst[r] (^)= XOR_j c[r][j] * src[j] for shards already
// in device memory. GF(2^8) products through log/exp tables in shared memory:
// log[0] is 510 so that any sum involving a zero lands in exp's zero tail
// (exp[510..1023] = 0) and no branch is needed. Each thread handles 16 bytes
// (one uint4 per source) when every pointer is 16-byte aligned, else bytes.
// The launch descriptor (pointers and coefficient logs) is a kernel parameter,
// so a call allocates nothing and copies nothing to the device.
#include <cuda_runtime.h>

#include "cuda_device.h"

#include <cstring>
#include <vector>

#include "ec_cuda.h"

namespace ckpt_ec_cuda {
namespace {

constexpr unsigned kPoly = 0x11d;
constexpr int kZeroLog = 510;
constexpr int kMaxRows = 4;      // rows per launch (accumulators per thread)
constexpr int kDescBytes = 4000; // kernel parameters stay under CUDA's 4 KiB limit
constexpr int kThreads = 256;

struct GfTables {
  unsigned char exp[1024];
  unsigned short log[256];
};

constexpr GfTables build_tables() {
  GfTables t{};
  unsigned x = 1;
  for (int i = 0; i < 255; i++) {
    t.exp[i] = t.exp[i + 255] = static_cast<unsigned char>(x);
    t.log[x] = static_cast<unsigned short>(i);
    x <<= 1;
    if (x & 0x100) x ^= kPoly;
  }
  for (int i = 510; i < 1024; i++) t.exp[i] = 0;
  t.log[0] = kZeroLog;
  return t;
}

__constant__ GfTables kTables = build_tables();
const GfTables kHostTables = build_tables();

struct Desc {
  unsigned long long len;
  int cols, rows, accumulate, vec16;
  // src pointers (cols x u64), dst pointers (rows x u64), then coefficient logs (rows x cols x u16)
  unsigned long long words[(kDescBytes - 24) / 8];
};

__device__ __forceinline__ const unsigned short* coef_logs(const Desc& d) {
  return reinterpret_cast<const unsigned short*>(d.words + d.cols + d.rows);
}

template <int R>
__global__ void __launch_bounds__(kThreads) ec_dot(const Desc d) {
  __shared__ unsigned char s_exp[1024];
  __shared__ unsigned short s_log[256];
  for (int i = threadIdx.x; i < 1024; i += blockDim.x) s_exp[i] = kTables.exp[i];
  for (int i = threadIdx.x; i < 256; i += blockDim.x) s_log[i] = kTables.log[i];
  __syncthreads();

  const unsigned short* lc = coef_logs(d);
  const unsigned long long stride = static_cast<unsigned long long>(gridDim.x) * blockDim.x;
  const unsigned long long tid = static_cast<unsigned long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  const unsigned long long nwords = d.vec16 ? d.len / 16 : 0;

  for (unsigned long long w = tid; w < nwords; w += stride) {
    unsigned int acc[R][4];
#pragma unroll
    for (int r = 0; r < R; r++)
#pragma unroll
      for (int q = 0; q < 4; q++) acc[r][q] = 0;
    for (int j = 0; j < d.cols; j++) {
      uint4 x = reinterpret_cast<const uint4*>(d.words[j])[w];
      unsigned int xs[4] = {x.x, x.y, x.z, x.w};
      unsigned short lg[16];
#pragma unroll
      for (int q = 0; q < 4; q++)
#pragma unroll
        for (int b = 0; b < 4; b++) lg[q * 4 + b] = s_log[(xs[q] >> (8 * b)) & 0xff];
#pragma unroll
      for (int r = 0; r < R; r++) {
        const unsigned short c = lc[r * d.cols + j];
#pragma unroll
        for (int q = 0; q < 4; q++) {
          unsigned int v = 0;
#pragma unroll
          for (int b = 0; b < 4; b++) v |= static_cast<unsigned int>(s_exp[lg[q * 4 + b] + c]) << (8 * b);
          acc[r][q] ^= v;
        }
      }
    }
#pragma unroll
    for (int r = 0; r < R; r++) {
      uint4* out = reinterpret_cast<uint4*>(d.words[d.cols + r]) + w;
      uint4 v = make_uint4(acc[r][0], acc[r][1], acc[r][2], acc[r][3]);
      if (d.accumulate) {
        uint4 o = *out;
        v.x ^= o.x, v.y ^= o.y, v.z ^= o.z, v.w ^= o.w;
      }
      *out = v;
    }
  }

  // The bytes the 16-byte path left (all of them when a pointer is unaligned).
  for (unsigned long long i = nwords * 16 + tid; i < d.len; i += stride) {
    unsigned char acc[R];
#pragma unroll
    for (int r = 0; r < R; r++) acc[r] = 0;
    for (int j = 0; j < d.cols; j++) {
      const unsigned short lx = s_log[reinterpret_cast<const unsigned char*>(d.words[j])[i]];
#pragma unroll
      for (int r = 0; r < R; r++) acc[r] ^= s_exp[lx + lc[r * d.cols + j]];
    }
#pragma unroll
    for (int r = 0; r < R; r++) {
      unsigned char* out = reinterpret_cast<unsigned char*>(d.words[d.cols + r]) + i;
      *out = d.accumulate ? static_cast<unsigned char>(*out ^ acc[r]) : acc[r];
    }
  }
}

size_t desc_bytes(int cols, int rows) { return 24 + size_t(cols + rows) * 8 + size_t(rows) * cols * 2; }

using ckpt_cuda_common::DeviceGuard;

}  // namespace

int device_count(int* count) { return ckpt_cuda_common::device_count(count); }

int dot(int device, const uint64_t* src, int cols, const uint64_t* dst, int rows, const uint8_t* coefs,
        uint64_t len, uint64_t stream, bool accumulate, const char** failed_call) {
  if (len == 0 || rows == 0) return 0;
  if (cols < 1 || cols > kMaxCols) {
    *failed_call = "ec_cuda::dot(cols out of range)";
    return static_cast<int>(cudaErrorInvalidValue);
  }
  DeviceGuard guard(device);
  if (guard.err != cudaSuccess) {
    *failed_call = "cudaSetDevice";
    return static_cast<int>(guard.err);
  }
  bool vec16 = true;
  for (int j = 0; j < cols; j++) vec16 = vec16 && src[j] % 16 == 0;
  for (int r = 0; r < rows; r++) vec16 = vec16 && dst[r] % 16 == 0;
  unsigned long long work = vec16 ? len / 16 + len % 16 : len;
  unsigned long long blocks = (work + kThreads - 1) / kThreads;
  if (blocks > 4096) blocks = 4096;  // grid-stride beyond
  auto s = reinterpret_cast<cudaStream_t>(stream);
  for (int r0 = 0; r0 < rows;) {
    int nr = rows - r0 < kMaxRows ? rows - r0 : kMaxRows;
    while (desc_bytes(cols, nr) > kDescBytes) nr--;
    Desc d;
    std::memset(&d, 0, sizeof(d));
    d.len = len;
    d.cols = cols;
    d.rows = nr;
    d.accumulate = accumulate ? 1 : 0;
    d.vec16 = vec16 ? 1 : 0;
    for (int j = 0; j < cols; j++) d.words[j] = src[j];
    for (int r = 0; r < nr; r++) d.words[cols + r] = dst[r0 + r];
    auto* lc = reinterpret_cast<unsigned short*>(d.words + cols + nr);
    for (int r = 0; r < nr; r++)
      for (int j = 0; j < cols; j++) lc[r * cols + j] = kHostTables.log[coefs[size_t(r0 + r) * cols + j]];
    // log of coefficient 0 is kZeroLog (from the table): its products read exp's zero tail.
    switch (nr) {
      case 1: ec_dot<1><<<unsigned(blocks), kThreads, 0, s>>>(d); break;
      case 2: ec_dot<2><<<unsigned(blocks), kThreads, 0, s>>>(d); break;
      case 3: ec_dot<3><<<unsigned(blocks), kThreads, 0, s>>>(d); break;
      default: ec_dot<4><<<unsigned(blocks), kThreads, 0, s>>>(d); break;
    }
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) {
      *failed_call = "ec_dot<<<>>>";
      return static_cast<int>(err);
    }
    r0 += nr;
  }
  return 0;
}

const char* error_string(int err) { return cudaGetErrorString(static_cast<cudaError_t>(err)); }

}  // namespace ckpt_ec_cuda
