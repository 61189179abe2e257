// Plain C++ interface to the CUDA copier (compiled by nvcc in cuda_copy.cu). It
// returns cudaError_t values as ints and never throws; cuda_bindings.cc (built
// by the host compiler, no CUDA headers) turns failures into NativeError.
#pragma once

#include <cstddef>
#include <cstdint>

namespace ckpt_cuda {

struct Job {
  uint64_t src;
  uint64_t dst;
  uint64_t nbytes;
};

constexpr int kNotReady = -1;  // event_query: work still pending

int device_count(int* count);
int host_register(void* addr, size_t nbytes);
int host_unregister(void* addr);
// On `device`: when has_wait, record an event on wait_stream and make side_stream
// wait on it (wait_stream 0 is the legacy default stream, torch's usual current
// stream: it must be waited on too, since torch's side streams are non-blocking);
// enqueue cudaMemcpyAsync for every job, record *done_event on side_stream. On
// failure *failed_call names the CUDA call that failed.
// When crc_out is non-zero, the crc32c of every chunk_bytes-chunk of each job's source
// (chunks numbered in job order, each job starting a new chunk) is first computed on the
// device and written as uint32s to crc_out (host memory) — as CopyEngine.submit does.
int enqueue_copies(int device, const Job* jobs, size_t njobs, uint64_t side_stream, bool has_wait,
                   uint64_t wait_stream, uint64_t chunk_bytes, uint64_t crc_out, void** done_event,
                   const char** failed_call);
// cuda_crc.cu: the chunk crcs alone, on side_stream (a chunk grid per job, one block per chunk).
int enqueue_crcs(const Job* jobs, size_t njobs, uint64_t chunk_bytes, uint64_t crc_out,
                 uint64_t side_stream, const char** failed_call);
int event_query(void* event);  // 0 done, kNotReady, or a cudaError_t
int stream_wait_event(int device, uint64_t stream, void* event);
int event_destroy(void* event);
const char* error_string(int err);

}  // namespace ckpt_cuda
