#pragma once
// Benchmark helper: mean device time of a GPU call (legacy default stream), after one warm-up call.
#include <cuda_runtime.h>
#include <glog/logging.h>

#include <functional>

namespace tessera::ops::testing {

inline double GpuTimeMs(const std::function<void()>& f, int iters) {
  f();  // warm-up
  cudaEvent_t a, b;
  CHECK_EQ(cudaEventCreate(&a), cudaSuccess);
  CHECK_EQ(cudaEventCreate(&b), cudaSuccess);
  cudaEventRecord(a);
  for (int i = 0; i < iters; ++i) f();
  cudaEventRecord(b);
  cudaEventSynchronize(b);
  float ms = 0;
  cudaEventElapsedTime(&ms, a, b);
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  CHECK_EQ(cudaGetLastError(), cudaSuccess);
  return ms / iters;
}

}  // namespace tessera::ops::testing
