// crc32c of device memory, per chunk, on the GPU (crc32c_split.h): one block per chunk,
// one piece per thread, the pieces joined by the block's first thread. Snapshots of CUDA
// tensors are checksummed here, on the copy's side stream before the device-to-host copy,
// instead of by CPU threads reading the copied bytes again.
#include <cuda_runtime.h>

#include "crc32c_split.h"
#include "cuda_copy.h"

namespace ckpt_cuda {
namespace {

constexpr unsigned kThreads = 256;

__constant__ ckpt_crc::Tables kTablesDev = ckpt_crc::make_tables();
__constant__ ckpt_crc::Powers kPowersDev = ckpt_crc::make_powers();

__global__ void __launch_bounds__(kThreads)
    crc_chunks_kernel(const uint8_t* src, uint64_t nbytes, uint64_t chunk_bytes, uint32_t* out) {
  __shared__ ckpt_crc::Tables tables;  // 4 KiB: lookups with divergent indices
  __shared__ uint32_t piece_crcs[kThreads];
  const uint32_t* from = &kTablesDev.t[0][0];
  uint32_t* to = &tables.t[0][0];
  for (unsigned i = threadIdx.x; i < 4 * 256; i += kThreads) to[i] = from[i];
  __syncthreads();
  const uint64_t begin = uint64_t(blockIdx.x) * chunk_bytes;
  const uint64_t len = nbytes - begin < chunk_bytes ? nbytes - begin : chunk_bytes;
  const ckpt_crc::Piece pc = ckpt_crc::piece_of(len, kThreads, threadIdx.x);
  piece_crcs[threadIdx.x] = ckpt_crc::crc_bytes(tables, src + begin + pc.begin, pc.end - pc.begin);
  __syncthreads();
  if (threadIdx.x == 0) out[blockIdx.x] = ckpt_crc::join_pieces(kPowersDev, piece_crcs, len, kThreads);
}

}  // namespace

int enqueue_crcs(const Job* jobs, size_t njobs, uint64_t chunk_bytes, uint64_t crc_out,
                 uint64_t side_stream, const char** failed_call) {
  auto side = reinterpret_cast<cudaStream_t>(side_stream);
  uint64_t total = 0;
  for (size_t i = 0; i < njobs; i++) total += (jobs[i].nbytes + chunk_bytes - 1) / chunk_bytes;
  if (total == 0) return 0;
  uint32_t* dev = nullptr;
  cudaError_t err = cudaMallocAsync(reinterpret_cast<void**>(&dev), total * sizeof(uint32_t), side);
  if (err != cudaSuccess) {
    *failed_call = "cudaMallocAsync(crc scratch)";
    return static_cast<int>(err);
  }
  uint64_t at = 0;
  for (size_t i = 0; i < njobs && err == cudaSuccess; i++) {
    const uint64_t chunks = (jobs[i].nbytes + chunk_bytes - 1) / chunk_bytes;
    if (chunks == 0) continue;
    crc_chunks_kernel<<<static_cast<unsigned>(chunks), kThreads, 0, side>>>(
        reinterpret_cast<const uint8_t*>(jobs[i].src), jobs[i].nbytes, chunk_bytes, dev + at);
    err = cudaGetLastError();
    if (err != cudaSuccess) *failed_call = "crc_chunks_kernel launch";
    at += chunks;
  }
  if (err == cudaSuccess) {
    err = cudaMemcpyAsync(reinterpret_cast<void*>(crc_out), dev, total * sizeof(uint32_t),
                          cudaMemcpyDeviceToHost, side);
    if (err != cudaSuccess) *failed_call = "cudaMemcpyAsync(crcs)";
  }
  cudaFreeAsync(dev, side);
  return static_cast<int>(err);
}

}  // namespace ckpt_cuda
