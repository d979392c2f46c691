// The CUDA-only lines, compiled only against a CUDA LibTorch (AUTOTUNE_WITH_CUDA): enforcing a
// budget through the caching allocator's per-process memory fraction, the device name, and the
// NCCL process group of data-parallel ranks on CUDA (distributed.h). c10/cuda, the CUDA runtime
// API and c10d's NCCL backend (NCCL's header from the CUDA wheel's nvidia-nccl package).
#define USE_C10D_NCCL 1
#include <ATen/DeviceAccelerator.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <cuda_runtime_api.h>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>

#include <algorithm>

#include "autotune/memory.h"

namespace autotune {

namespace detail {
bool cuda_bf16_fast(c10::DeviceIndex index);
std::string cuda_device_name(c10::DeviceIndex index) {
  cudaDeviceProp prop{};
  if (cudaGetDeviceProperties(&prop, index) != cudaSuccess) {
    (void)cudaGetLastError();  // clear the sticky error so later CUDA calls do not report it
    return {};
  }
  return prop.name;
}
}  // namespace detail

// The budget counts what nvidia-smi charges to the process: reserved blocks plus the context. The
// fraction caps only the caching allocator's reserved bytes, so the context (the meter's one
// measurement, taken after a warm-up step) is taken off first. On a shared GPU, other processes'
// memory is indistinguishable from our context (cudaMemGetInfo is device-wide): it is taken off
// too, which errs on the safe side.
bool enforce_device_budget(torch::Device device, uint64_t budget_bytes, uint64_t context_bytes) {
  if (device.type() != c10::DeviceType::CUDA || c10::cuda::device_count() == 0) return false;
  const c10::DeviceIndex index = device.has_index() ? device.index() : c10::cuda::current_device();
  const auto [free_bytes, total_bytes] = at::accelerator::getMemoryInfo(index);
  if (total_bytes == 0) return false;
  double fraction = 1.0;
  if (budget_bytes > 0) {
    const uint64_t allocator_bytes =
        budget_bytes > context_bytes ? budget_bytes - context_bytes : 0;
    fraction =
        std::min(1.0, static_cast<double>(allocator_bytes) / static_cast<double>(total_bytes));
  }
  c10::cuda::CUDACachingAllocator::setMemoryFraction(fraction, index);
  return true;
}

namespace detail {
// Whether bf16 is the device's fast low precision: tensor cores run it from compute capability
// 8.0 (Ampere) on; before that fp16 (with loss scaling) is the one that is fast.
bool cuda_bf16_fast(c10::DeviceIndex index) {
  cudaDeviceProp prop{};
  if (cudaGetDeviceProperties(&prop, index) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return prop.major >= 8;
}

c10::intrusive_ptr<c10d::Backend> make_nccl_backend(const c10::intrusive_ptr<c10d::Store>& store,
                                                    int rank, int size,
                                                    std::chrono::milliseconds timeout) {
  auto opts = c10d::ProcessGroupNCCL::Options::create();
  opts->timeout = timeout;
  return c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, size, opts);
}
}  // namespace detail

}  // namespace autotune
