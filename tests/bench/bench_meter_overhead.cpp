// Cost of the CPU memory meter on a training-like step: an MLP (4 blocks of
// Linear(1024->2048) + GELU + Linear(2048->1024) + GELU, batch 128, ~0.1-0.3 s per step on two
// cores) with forward, backward and AdamW. One process measures one mode, so the allocator can be
// compared installed and not (it cannot be uninstalled); scripts/bench-meter-overhead interleaves
// the processes and prints the overhead.
//
//   bench_meter_overhead --mode default|counting|caching|meter [--steps N] [--warmup N]
//                        [--threads N]  (intra-op threads; default: LibTorch's choice)
//     default   LibTorch's own CPU allocator, glibc untouched
//     counting  cpu_alloc::install() outside a caching scope: every free pool segment is
//               unmapped at once (resident memory follows tensor bytes)
//     caching   the same allocator inside a cpu_alloc::CachingScope, as the trainer runs it
//     meter     caching + a MemoryMeter that resets and samples peaks around each phase
//               (forward, backward, optimizer), as the trainer's per-phase peaks do
// Prints one line: mode=... steps=... median_step_ms=... median_cpu_ms=... minflt=...
// peak_tensor_bytes=...
// cpu_ms is the CPU time of all threads of the process (user + system, so page faults count) per
// step: steadier than wall time on a machine that other jobs share. minflt is the minor page faults
// per step (fresh pages the kernel had to map and zero): what returning freed memory to the kernel
// costs, counted exactly rather than timed.
#include <malloc.h>
#include <sys/resource.h>
#include <time.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "autotune/memory.h"
#include "memory/cpu_allocator.h"

namespace {

struct Block : torch::nn::Module {
  torch::nn::Linear up{nullptr}, down{nullptr};
  explicit Block(int64_t width) {
    up = register_module("up", torch::nn::Linear(width, 2 * width));
    down = register_module("down", torch::nn::Linear(2 * width, width));
  }
  torch::Tensor forward(const torch::Tensor& x) {
    return torch::gelu(down->forward(torch::gelu(up->forward(x))));
  }
};

double cpu_ms_now() {
  timespec ts{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) * 1e3 + static_cast<double>(ts.tv_nsec) / 1e6;
}

double minor_faults_now() {
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  return static_cast<double>(ru.ru_minflt);
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 == 1 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

int usage() {
  std::fprintf(stderr,
               "usage: bench_meter_overhead --mode default|counting|caching|meter "
               "[--steps N] [--warmup N] [--threads N]\n");
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  std::string mode;
  int steps = 20, warmup = 3, threads = 0;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--mode" && i + 1 < argc)
      mode = argv[++i];
    else if (a == "--steps" && i + 1 < argc)
      steps = std::atoi(argv[++i]);
    else if (a == "--warmup" && i + 1 < argc)
      warmup = std::atoi(argv[++i]);
    else if (a == "--threads" && i + 1 < argc)
      threads = std::atoi(argv[++i]);
    else
      return usage();
  }
  if (mode != "default" && mode != "counting" && mode != "caching" && mode != "meter")
    return usage();
  if (steps < 1 || warmup < 0 || threads < 0) return usage();
  if (threads > 0) torch::set_num_threads(threads);

  // Installed before any tensor exists, as the tool does at start-up.
  std::unique_ptr<autotune::MemoryMeter> meter;
  std::optional<autotune::cpu_alloc::CachingScope> caching;
  if (mode != "default") autotune::cpu_alloc::install();
  if (mode == "caching" || mode == "meter") caching.emplace();
  if (mode == "meter") meter = std::make_unique<autotune::MemoryMeter>(torch::kCPU);

  constexpr int64_t kWidth = 1024, kBatch = 128, kBlocks = 4;
  torch::manual_seed(0);
  torch::nn::Sequential model;
  for (int64_t b = 0; b < kBlocks; ++b) model->push_back(Block(kWidth));
  torch::optim::AdamW opt(model->parameters(), torch::optim::AdamWOptions(1e-4));
  const auto x = torch::randn({kBatch, kWidth});
  const auto target = torch::randn({kBatch, kWidth});

  uint64_t phase_peak_bytes = 0;
  auto phase_boundary = [&] {
    if (!meter) return;
    phase_peak_bytes = std::max(phase_peak_bytes, meter->sample().budget_bytes_peak);
    meter->reset_peaks();
  };

  std::vector<double> step_ms, cpu_ms, minflt;
  for (int s = 0; s < warmup + steps; ++s) {
    const auto t0 = std::chrono::steady_clock::now();
    const double c0 = cpu_ms_now(), f0 = minor_faults_now();
    opt.zero_grad();
    auto loss = torch::mse_loss(model->forward(x), target);
    phase_boundary();  // forward
    loss.backward();
    phase_boundary();  // backward
    opt.step();
    phase_boundary();  // optimizer
    const double c1 = cpu_ms_now(), f1 = minor_faults_now();
    const auto t1 = std::chrono::steady_clock::now();
    if (s < warmup) continue;
    step_ms.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
    cpu_ms.push_back(c1 - c0);
    minflt.push_back(f1 - f0);
  }
  std::printf(
      "mode=%s steps=%d median_step_ms=%.2f min_step_ms=%.2f median_cpu_ms=%.2f minflt=%.0f "
      "peak_tensor_bytes=%lld phase_peak_bytes=%llu\n",
      mode.c_str(), steps, median(step_ms), *std::min_element(step_ms.begin(), step_ms.end()),
      median(cpu_ms), median(minflt), static_cast<long long>(autotune::cpu_alloc::peak_bytes()),
      static_cast<unsigned long long>(phase_peak_bytes));
  return 0;
}
