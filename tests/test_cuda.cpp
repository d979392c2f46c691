// The CUDA path on a real GPU (CTest label `cuda`; scripts/gpu-check runs them with
// `ctest -L cuda`). Every test skips itself, saying why, where no CUDA device is present: the
// CPU-only build and GPU-less machines run them as skips.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <memory>
#include <string>

#include <torch/torch.h>

#include "autotune/distributed.h"
#include "autotune/gpt_workload.h"
#include "autotune/memory.h"
#include "autotune/precision.h"
#include "autotune/trainer.h"
#include "test_support.h"

namespace tu = autotune::testing;
using namespace autotune;

namespace {
constexpr uint64_t kMiB = uint64_t{1} << 20;

#define AUTOTUNE_NEED_CUDA()                                                                       \
  if (!torch::cuda::is_available())                                                                \
  GTEST_SKIP() << "no CUDA device (or a CPU-only LibTorch) here; scripts/gpu-check runs these on " \
                  "a GPU machine"

// The process's memory on the GPU as the driver reports it (nvidia-smi), or 0 when unavailable.
uint64_t driver_reported_bytes() {
  const std::string cmd =
      "nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,"
      "nounits 2>/dev/null";
  std::unique_ptr<FILE, int (*)(FILE*)> p(popen(cmd.c_str(), "r"), pclose);
  if (!p) return 0;
  char line[256];
  while (fgets(line, sizeof line, p.get())) {
    long pid = 0, mib = 0;
    if (std::sscanf(line, "%ld, %ld", &pid, &mib) == 2 && pid == ::getpid())
      return static_cast<uint64_t>(mib) * kMiB;
  }
  return 0;
}
}  // namespace

TEST(Cuda, MeterCountsKnownAllocations) {
  AUTOTUNE_NEED_CUDA();
  MemoryMeter meter(torch::kCUDA);
  meter.release_cache();
  meter.reset_peaks();
  const MemorySample before = meter.sample();
  {
    auto a = torch::empty({64 * kMiB / 4}, torch::TensorOptions(torch::kCUDA));  // 64 MiB
    auto b = torch::empty({32 * kMiB / 4}, torch::TensorOptions(torch::kCUDA));  // 32 MiB
    const MemorySample s = meter.sample();
    EXPECT_EQ(s.device_allocated_bytes - before.device_allocated_bytes, 96 * kMiB);
    EXPECT_GE(s.device_reserved_bytes - before.device_reserved_bytes, 96 * kMiB);
  }
  const MemorySample after = meter.sample();
  EXPECT_EQ(after.device_allocated_bytes, before.device_allocated_bytes);
  EXPECT_GE(after.device_peak_allocated_bytes - before.device_allocated_bytes, 96 * kMiB);
  EXPECT_GE(after.device_peak_reserved_bytes, after.device_peak_allocated_bytes);
}

TEST(Cuda, TheFractionRefusesAnAllocationOverTheBudgetAndTheProcessGoesOn) {
  AUTOTUNE_NEED_CUDA();
  MemoryMeter meter(torch::kCUDA);
  meter.release_cache();
  const uint64_t budget = meter.context_bytes() + 512 * kMiB;
  ASSERT_TRUE(enforce_device_budget(torch::kCUDA, budget, meter.context_bytes()));
  EXPECT_THROW(torch::empty({int64_t(1024 * kMiB / 4)}, torch::TensorOptions(torch::kCUDA)),
               c10::OutOfMemoryError);
  // Survived: an allocation under the budget works, and the counter saw the refusal.
  auto fits = torch::ones({int64_t(256 * kMiB / 4)}, torch::TensorOptions(torch::kCUDA));
  EXPECT_EQ(fits.sum().item<float>(), 64.0f * kMiB);
  EXPECT_GE(meter.sample().device_num_ooms, 1u);
  enforce_device_budget(torch::kCUDA, 0, 0);  // 0: the whole device again
}

TEST(Cuda, TheBudgetFigureIsWithinFivePercentOfWhatTheDriverReports) {
  AUTOTUNE_NEED_CUDA();
  MemoryMeter meter(torch::kCUDA);
  auto held = torch::ones({int64_t(1024 * kMiB / 4)}, torch::TensorOptions(torch::kCUDA));
  torch::cuda::synchronize();
  meter.remeasure_baseline();  // the context after the kernels above loaded
  const uint64_t driver = driver_reported_bytes();
  if (driver == 0) GTEST_SKIP() << "nvidia-smi does not report this process's memory here";
  const uint64_t figure = meter.budget_figure_now(meter.sample());
  std::printf("budget figure %.1f MiB, driver %.1f MiB\n", figure / double(kMiB),
              driver / double(kMiB));
  EXPECT_NEAR(static_cast<double>(figure), static_cast<double>(driver), 0.05 * driver);
}

TEST(Cuda, Fp16LossScalingSkipsAStepOnInf) {
  AUTOTUNE_NEED_CUDA();
  LossScaler scaler(torch::kCUDA, true, 1024.0);
  auto p = torch::ones({4}, torch::TensorOptions(torch::kCUDA)).requires_grad_();
  p.mutable_grad() =
      torch::full({4}, std::numeric_limits<float>::infinity(), torch::TensorOptions(torch::kCUDA));
  EXPECT_FALSE(scaler.unscale_and_check({p}));
  EXPECT_EQ(scaler.scale(), 512.0);
  p.mutable_grad() = torch::ones({4}, torch::TensorOptions(torch::kCUDA));
  EXPECT_TRUE(scaler.unscale_and_check({p}));
}

TEST(Cuda, TheOomLadderRecoversInPlace) {
  AUTOTUNE_NEED_CUDA();
  GptWorkload w(load_gpt_config("gpt-mini"), TokenFile::open(tu::corpus_path()), 3);
  Plan p;
  p.micro_batch = 16;
  p.grad_accum = 2;
  TrainOptions opt;
  opt.steps = 4;
  opt.eval_sequences = 0;
  opt.device = torch::kCUDA;
  struct Tighten : TrainObserver {  // after step 2, a budget only a smaller micro-batch fits
    MemoryMeter* meter;
    void on_step(const StepStats& s) override {
      if (s.step == 2) {
        // Between the micro-batch-8 and micro-batch-16 peaks: the resident state plus 80% of
        // what the last step's activations added on top of it.
        const MemorySample m = meter->sample();
        const uint64_t added = m.device_peak_allocated_bytes - m.device_allocated_bytes;
        enforce_device_budget(torch::kCUDA,
                              meter->context_bytes() + m.device_allocated_bytes + added * 8 / 10,
                              meter->context_bytes());
      }
    }
  } tighten;
  MemoryMeter meter(torch::kCUDA);
  tighten.meter = &meter;
  const RunSummary s = train(w, p, opt, {&tighten});
  enforce_device_budget(torch::kCUDA, 0, 0);
  EXPECT_EQ(s.steps_done, 4);
  ASSERT_FALSE(s.recoveries.empty());
  EXPECT_EQ(s.plan.global_batch(), 32) << "the effective batch survives the recovery";
  EXPECT_LT(s.plan.micro_batch, 16);
}

TEST(Cuda, NcclCarriesARanksCollectivesOnTheDevice) {
  AUTOTUNE_NEED_CUDA();
  // One GPU holds one NCCL rank (two ranks cannot share a device), so a world of one: the
  // NCCL process group, the parameter broadcast, the OOM and stop agreements and the gradient
  // all-reduces overlapped with backward (post-accumulate hooks, CUDA events) all run, and an
  // average over one rank leaves the gradients as they are: the run ends on the loss of a run
  // without a communicator.
  const int port = free_loopback_port();
  WorldInfo world;
  world.master_port = port;
  Communicator comm(world, std::chrono::seconds(60), torch::Device(torch::kCUDA, 0));
  EXPECT_EQ(comm.backend(), "nccl");
  EXPECT_TRUE(comm.any(true));
  EXPECT_FALSE(comm.any(false));
  ASSERT_TRUE(overlap_allreduce(torch::Device(torch::kCUDA, 0)));
  GptWorkload w(load_gpt_config("gpt-mini"), TokenFile::open(tu::corpus_path()), 3);
  Plan p;
  p.micro_batch = 4;
  p.grad_accum = 2;
  TrainOptions opt;
  opt.steps = 3;
  opt.eval_sequences = 0;
  opt.device = torch::Device(torch::kCUDA, 0);
  const RunSummary alone = train(w, p, opt);
  opt.comm = &comm;
  const RunSummary ranked = train(w, p, opt);
  EXPECT_EQ(ranked.allreduce_calls, 3);
  // CUDA kernels may sum in another order from run to run, so the loss, not the bytes.
  EXPECT_NEAR(ranked.final_loss, alone.final_loss, 1e-4 * std::abs(alone.final_loss));
  std::printf("parameters bit-identical with and without NCCL: %s\n",
              ranked.params_digest == alone.params_digest ? "yes" : "no");
}
