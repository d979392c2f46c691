// NVIDIA's management library (NVML), loaded at run time where the driver installed it: the
// device memory the driver charges to given processes, the figure nvidia-smi prints. Script
// mode cross-checks the client's own CUDA figure with it. No CUDA headers or link: every
// machine builds it, and where there is no driver open() says why.
#pragma once
#include <sys/types.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace autotune {

class Nvml {
 public:
  // The library, initialised; nullptr with the reason in *why where it cannot be loaded.
  static std::unique_ptr<Nvml> open(std::string* why);
  ~Nvml();
  Nvml(const Nvml&) = delete;
  Nvml& operator=(const Nvml&) = delete;

  // The device memory charged to `pids`, summed over every device; nullopt where none of them
  // is listed (not started on the device yet, or a container whose process ids the driver
  // does not see) or the driver does not report per-process memory.
  std::optional<uint64_t> used_bytes(const std::vector<pid_t>& pids) const;

 private:
  Nvml() = default;
  struct Api;
  std::unique_ptr<Api> api_;
};

}  // namespace autotune
