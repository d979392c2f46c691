#include "memory/nvml.h"

#include <dlfcn.h>

#include <algorithm>
#include <string>
#include <type_traits>

namespace autotune {

namespace {
// The parts of nvml.h used here (NVML's ABI, stable across drivers since CUDA 11).
using nvmlReturn_t = int;
constexpr nvmlReturn_t kSuccess = 0;
constexpr nvmlReturn_t kInsufficientSize = 7;
using nvmlDevice_t = struct nvmlDevice_st*;
struct nvmlProcessInfo_t {
  unsigned int pid;
  unsigned long long usedGpuMemory;  // ULLONG_MAX: not available
  unsigned int gpuInstanceId;
  unsigned int computeInstanceId;
};
constexpr unsigned long long kValueNotAvailable = ~0ULL;
}  // namespace

struct Nvml::Api {
  void* lib = nullptr;
  nvmlReturn_t (*init)() = nullptr;
  nvmlReturn_t (*shutdown)() = nullptr;
  nvmlReturn_t (*count)(unsigned int*) = nullptr;
  nvmlReturn_t (*handle)(unsigned int, nvmlDevice_t*) = nullptr;
  nvmlReturn_t (*processes)(nvmlDevice_t, unsigned int*, nvmlProcessInfo_t*) = nullptr;
};

std::unique_ptr<Nvml> Nvml::open(std::string* why) {
  auto api = std::make_unique<Api>();
  api->lib = ::dlopen("libnvidia-ml.so.1", RTLD_NOW | RTLD_LOCAL);
  if (!api->lib) {
    *why = "libnvidia-ml.so.1 cannot be loaded (no NVIDIA driver here)";
    return nullptr;
  }
  auto sym = [&](auto& fn, const char* name) {
    fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(::dlsym(api->lib, name));
    return fn != nullptr;
  };
  if (!sym(api->init, "nvmlInit_v2") || !sym(api->shutdown, "nvmlShutdown") ||
      !sym(api->count, "nvmlDeviceGetCount_v2") ||
      !sym(api->handle, "nvmlDeviceGetHandleByIndex_v2") ||
      !sym(api->processes, "nvmlDeviceGetComputeRunningProcesses_v3")) {
    *why =
        "libnvidia-ml.so.1 lacks nvmlDeviceGetComputeRunningProcesses_v3 (a driver older "
        "than CUDA 11.x)";
    ::dlclose(api->lib);
    return nullptr;
  }
  if (const nvmlReturn_t rc = api->init(); rc != kSuccess) {
    *why = "nvmlInit failed (NVML error " + std::to_string(rc) + ")";
    ::dlclose(api->lib);
    return nullptr;
  }
  std::unique_ptr<Nvml> n(new Nvml());
  n->api_ = std::move(api);
  return n;
}

Nvml::~Nvml() {
  if (api_ && api_->lib) {
    api_->shutdown();
    ::dlclose(api_->lib);
  }
}

std::optional<uint64_t> Nvml::used_bytes(const std::vector<pid_t>& pids) const {
  unsigned int devices = 0;
  if (api_->count(&devices) != kSuccess) return std::nullopt;
  uint64_t total = 0;
  bool listed = false;
  for (unsigned int d = 0; d < devices; ++d) {
    nvmlDevice_t dev = nullptr;
    if (api_->handle(d, &dev) != kSuccess) continue;
    std::vector<nvmlProcessInfo_t> infos(64);
    unsigned int n = static_cast<unsigned int>(infos.size());
    nvmlReturn_t rc = api_->processes(dev, &n, infos.data());
    if (rc == kInsufficientSize) {  // n now holds the count, with room for a few that start
      infos.resize(n + 16);
      n = static_cast<unsigned int>(infos.size());
      rc = api_->processes(dev, &n, infos.data());
    }
    if (rc != kSuccess) continue;
    for (unsigned int i = 0; i < n; ++i) {
      if (std::find(pids.begin(), pids.end(), static_cast<pid_t>(infos[i].pid)) == pids.end())
        continue;
      if (infos[i].usedGpuMemory == kValueNotAvailable) return std::nullopt;
      total += infos[i].usedGpuMemory;
      listed = true;
    }
  }
  if (!listed) return std::nullopt;
  return total;
}

}  // namespace autotune
