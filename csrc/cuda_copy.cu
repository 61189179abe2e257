// CUDA side of the snapshot copier: asynchronous D2H/H2D copies on a side stream,
// ordered after the compute stream by events, so the host never blocks.
#include <cuda_runtime.h>

#include "cuda_copy.h"
#include "cuda_device.h"

namespace ckpt_cuda {

using ckpt_cuda_common::DeviceGuard;

int device_count(int* count) { return ckpt_cuda_common::device_count(count); }

int host_register(void* addr, size_t nbytes) {
  return static_cast<int>(cudaHostRegister(addr, nbytes, cudaHostRegisterPortable));
}

int host_unregister(void* addr) { return static_cast<int>(cudaHostUnregister(addr)); }

int enqueue_copies(int device, const Job* jobs, size_t njobs, uint64_t side_stream, bool has_wait,
                   uint64_t wait_stream, uint64_t chunk_bytes, uint64_t crc_out, void** done_event,
                   const char** failed_call) {
  *done_event = nullptr;
  DeviceGuard guard(device);
  if (guard.err != cudaSuccess) {
    *failed_call = "cudaSetDevice";
    return static_cast<int>(guard.err);
  }
  auto side = reinterpret_cast<cudaStream_t>(side_stream);
  cudaError_t err;
  if (has_wait && wait_stream != side_stream) {
    cudaEvent_t ready;
    if ((err = cudaEventCreateWithFlags(&ready, cudaEventDisableTiming)) != cudaSuccess) {
      *failed_call = "cudaEventCreateWithFlags";
      return static_cast<int>(err);
    }
    err = cudaEventRecord(ready, reinterpret_cast<cudaStream_t>(wait_stream));
    if (err != cudaSuccess) *failed_call = "cudaEventRecord(wait_stream)";
    if (err == cudaSuccess) {
      err = cudaStreamWaitEvent(side, ready, 0);
      if (err != cudaSuccess) *failed_call = "cudaStreamWaitEvent(side_stream)";
    }
    cudaEventDestroy(ready);  // safe: destruction is deferred until the event completes
    if (err != cudaSuccess) return static_cast<int>(err);
  }
  if (crc_out != 0 && chunk_bytes != 0) {
    int crc_err = enqueue_crcs(jobs, njobs, chunk_bytes, crc_out, side_stream, failed_call);
    if (crc_err != 0) {
      cudaStreamSynchronize(side);  // nothing queued may still write to crc_out afterwards
      return crc_err;
    }
  }
  for (size_t i = 0; i < njobs; i++) {
    if (jobs[i].nbytes == 0) continue;
    err = cudaMemcpyAsync(reinterpret_cast<void*>(jobs[i].dst), reinterpret_cast<const void*>(jobs[i].src),
                          jobs[i].nbytes, cudaMemcpyDefault, side);
    if (err != cudaSuccess) {
      *failed_call = "cudaMemcpyAsync";
      // The copies queued before this one still write into the slot: let them land before
      // the caller unlocks it, so no late DMA lands in a slot that was handed to the next writer.
      cudaStreamSynchronize(side);
      return static_cast<int>(err);
    }
  }
  cudaEvent_t done;
  if ((err = cudaEventCreateWithFlags(&done, cudaEventDisableTiming)) != cudaSuccess) {
    *failed_call = "cudaEventCreateWithFlags";
    return static_cast<int>(err);
  }
  if ((err = cudaEventRecord(done, side)) != cudaSuccess) {
    cudaEventDestroy(done);
    *failed_call = "cudaEventRecord(side_stream)";
    return static_cast<int>(err);
  }
  *done_event = done;
  return 0;
}

int event_query(void* event) {
  cudaError_t err = cudaEventQuery(static_cast<cudaEvent_t>(event));
  if (err == cudaErrorNotReady) return kNotReady;
  return static_cast<int>(err);
}

int stream_wait_event(int device, uint64_t stream, void* event) {
  DeviceGuard guard(device);
  if (guard.err != cudaSuccess) return static_cast<int>(guard.err);
  return static_cast<int>(
      cudaStreamWaitEvent(reinterpret_cast<cudaStream_t>(stream), static_cast<cudaEvent_t>(event), 0));
}

int event_destroy(void* event) { return static_cast<int>(cudaEventDestroy(static_cast<cudaEvent_t>(event))); }

const char* error_string(int err) { return cudaGetErrorString(static_cast<cudaError_t>(err)); }

}  // namespace ckpt_cuda
