// Device selection shared by the CUDA extensions (ckpt._C_cuda, ckpt._ec_cuda).
// Header-only: each extension is its own shared object.
#pragma once

#include <cuda_runtime.h>

namespace ckpt_cuda_common {

// Runs on `device`, restoring the caller's current device afterwards (torch
// keeps its own notion of the current device; leave it as found).
struct DeviceGuard {
  int prev = -1;
  cudaError_t err = cudaSuccess;
  explicit DeviceGuard(int device) {
    err = cudaGetDevice(&prev);
    if (err == cudaSuccess && prev != device) err = cudaSetDevice(device);
  }
  ~DeviceGuard() {
    int cur = -1;
    if (prev >= 0 && cudaGetDevice(&cur) == cudaSuccess && cur != prev) cudaSetDevice(prev);
  }
};

// Devices visible (0 with no driver or GPU); returns the cudaError_t as int.
inline int device_count(int* count) {
  *count = 0;
  cudaError_t err = cudaGetDeviceCount(count);
  if (err != cudaSuccess) {
    *count = 0;
    cudaGetLastError();  // clear the sticky-free error so later calls start clean
  }
  return static_cast<int>(err);
}

}  // namespace ckpt_cuda_common
