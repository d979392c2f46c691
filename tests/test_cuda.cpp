// The CUDA path on a real GPU (CTest label `cuda`; scripts/gpu-check runs them with
// `ctest -L cuda`). Every test skips itself, saying why, where no CUDA device is present: the
// CPU-only build and GPU-less machines run them as skips. scripts/gpu-check counts a skip as a
// failure, except where scripts/gpu_check_verdict.py's EXCLUDED names the test and its reason
// (NcclAveragesGradientsOverTwoGpus: "needs two GPUs").
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <memory>
#include <optional>
#include <string>

#include <torch/torch.h>
#include <nlohmann/json.hpp>

#include "autotune/distributed.h"
#include "autotune/gpt_workload.h"
#include "autotune/memory.h"
#include "autotune/trainer.h"
#include "models/precision.h"
#include "script_mode_support.h"
#include "test_support.h"

namespace tu = autotune::testing;
using namespace autotune;

namespace {
constexpr uint64_t kMiB = uint64_t{1} << 20;

#define AUTOTUNE_NEED_CUDA()                                                                       \
  if (!torch::cuda::is_available())                                                                \
  GTEST_SKIP() << "no CUDA device (or a CPU-only LibTorch) here; scripts/gpu-check runs these on " \
                  "a GPU machine"

// This process's memory on the GPU as the driver reports it (nvidia-smi, the row of this pid);
// nullopt where there is no nvidia-smi or no row names this pid (a container, whose processes
// the driver lists by the host's pids).
std::optional<uint64_t> driver_reported_bytes() {
  const std::string cmd =
      "nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,"
      "nounits 2>/dev/null";
  std::unique_ptr<FILE, int (*)(FILE*)> p(popen(cmd.c_str(), "r"), pclose);
  if (!p) return std::nullopt;
  char line[256];
  while (fgets(line, sizeof line, p.get())) {
    long pid = 0, mib = 0;
    if (std::sscanf(line, "%ld, %ld", &pid, &mib) == 2 && pid == ::getpid())
      return static_cast<uint64_t>(mib) * kMiB;
  }
  return std::nullopt;
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
  // As a run does (RunContext::warm_up): a warm-up step loads the kernels and the libraries'
  // handles, then the meter measures the context once, with the cache empty. Training steps
  // follow; at the last one the meter's figure (peak reserved + that context) and the driver's
  // figure of this process are read together. Nothing in the figure is read after the warm-up,
  // so context the steps add (kernels loaded late, handles) shows as a difference.
  GptWorkload w(load_gpt_config("gpt-mini"), TokenFile::open(tu::corpus_path()), 3);
  Plan p;
  p.micro_batch = 8;
  p.grad_accum = 1;
  TrainOptions opt;
  opt.steps = 1;
  opt.eval_sequences = 0;
  opt.device = torch::kCUDA;
  MemoryMeter meter(torch::kCUDA);
  train(w, p, opt);  // the warm-up
  torch::cuda::synchronize();
  meter.release_cache();
  meter.remeasure_baseline();
  const uint64_t context = meter.context_bytes();
  if (!driver_reported_bytes())
    GTEST_SKIP() << "nvidia-smi does not report this process's memory by pid here (no "
                    "nvidia-smi, or a container whose pids the driver lists as the host's): "
                    "no per-process figure to compare the budget figure with";
  meter.reset_peaks();
  struct AtTheLastStep : TrainObserver {
    MemoryMeter* meter = nullptr;
    MemorySample sample;
    uint64_t figure = 0;
    std::optional<uint64_t> driver;
    void on_step(const StepStats& s) override {
      if (s.step != s.steps) return;
      torch::cuda::synchronize();
      sample = meter->sample();
      figure = meter->budget_figure_peak(sample);
      driver = driver_reported_bytes();
    }
  } at_last;
  at_last.meter = &meter;
  opt.steps = 4;
  const RunSummary s = train(w, p, opt, {&at_last});
  ASSERT_EQ(s.steps_done, 4);
  ASSERT_TRUE(at_last.driver.has_value()) << "nvidia-smi stopped reporting this process";
  const double driver = static_cast<double>(*at_last.driver);
  std::printf(
      "budget figure %.1f MiB (peak reserved %.1f MiB, reserved now %.1f MiB, context %.1f MiB "
      "measured after the warm-up), driver %.1f MiB\n",
      at_last.figure / double(kMiB), at_last.sample.device_peak_reserved_bytes / double(kMiB),
      at_last.sample.device_reserved_bytes / double(kMiB), context / double(kMiB),
      driver / double(kMiB));
  EXPECT_NEAR(static_cast<double>(at_last.figure), driver, 0.05 * driver);
}

TEST(Cuda, Fp16LossScalingSkipsAStepOnInf) {
  AUTOTUNE_NEED_CUDA();
  LossScaler scaler(torch::kCUDA, true, 1024.0);
  auto p = torch::ones({4}, torch::TensorOptions(torch::kCUDA)).requires_grad_();
  p.mutable_grad() =
      torch::full({4}, std::numeric_limits<float>::infinity(), torch::TensorOptions(torch::kCUDA));
  EXPECT_FALSE(scaler.unscale_and_check({p}));
  EXPECT_EQ(scaler.scale(), 1024.0) << "the scale changes only once the step is certain";
  scaler.update();
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
  // One GPU holds one NCCL rank (two ranks cannot share a device), so a world of one, where an
  // average changes nothing. What one rank can show: the process group is NCCL's; its
  // collectives take device tensors and leave them on the device with their values (a sum and a
  // broadcast over one rank are the identity); the gradient all-reduces overlapped with backward
  // (post-accumulate hooks, CUDA events) run once per step and the run ends on the loss of a run
  // without a communicator; and a host tensor is refused, as NCCL (not Gloo) does. Averaging
  // across ranks: NcclAveragesGradientsOverTwoGpus.
  const torch::Device cuda(torch::kCUDA, 0);
  WorldInfo world;
  world.master_port = free_loopback_port();
  Communicator comm(world, std::chrono::seconds(60), cuda);
  EXPECT_EQ(comm.backend(), "nccl");
  const torch::Tensor values = torch::arange(1, 9, torch::dtype(torch::kFloat32).device(cuda));
  const torch::Tensor mean = comm.average(values);
  EXPECT_TRUE(mean.is_cuda());
  EXPECT_TRUE(torch::equal(mean, values)) << mean;
  torch::Tensor sent = values.clone();
  comm.broadcast({sent}, 0);
  EXPECT_TRUE(sent.is_cuda());
  EXPECT_TRUE(torch::equal(sent, values)) << sent;
  EXPECT_TRUE(comm.any(true));
  EXPECT_FALSE(comm.any(false));
  ASSERT_TRUE(overlap_allreduce(cuda));
  GptWorkload w(load_gpt_config("gpt-mini"), TokenFile::open(tu::corpus_path()), 3);
  Plan p;
  p.micro_batch = 4;
  p.grad_accum = 2;
  TrainOptions opt;
  opt.steps = 3;
  opt.eval_sequences = 0;
  opt.device = cuda;
  const RunSummary alone = train(w, p, opt);
  opt.comm = &comm;
  const RunSummary ranked = train(w, p, opt);
  EXPECT_EQ(ranked.allreduce_calls, 3);
  // CUDA kernels may sum in another order from run to run, so the loss, not the bytes.
  EXPECT_NEAR(ranked.final_loss, alone.final_loss, 1e-4 * std::abs(alone.final_loss));
  // Last: NCCL reduces device tensors only (the communicator turns the refusal into LostRank).
  EXPECT_THROW(comm.average(torch::ones({4})), LostRank);
}

TEST(Cuda, NcclAveragesGradientsOverTwoGpus) {
  AUTOTUNE_NEED_CUDA();
  const int devices = static_cast<int>(torch::cuda::device_count());  // an int8_t
  if (devices < 2)
    GTEST_SKIP() << "needs two GPUs (one NCCL rank per device), this machine has " << devices;
  // Two ranks on cuda:0 and cuda:1, each training its half of every global batch from the same
  // initial parameters: only gradients averaged over NCCL leave both with the same parameters.
  const std::string dir = tu::temp_dir("cuda-two-ranks");
  const tu::ProcessResult r = tu::run_autotune({"run",
                                                "--data",
                                                tu::corpus_path(),
                                                "--budget",
                                                "4G",
                                                "--model",
                                                "gpt-tiny",
                                                "--device",
                                                "cuda",
                                                "--global-batch",
                                                "8",
                                                "--micro-batch",
                                                "4",
                                                "--precision",
                                                "fp32",
                                                "--checkpointing",
                                                "off",
                                                "--steps",
                                                "4",
                                                "--eval-sequences",
                                                "8",
                                                "--run-dir",
                                                dir + "/run",
                                                "--profile-dir",
                                                dir + "/prof",
                                                "--nproc",
                                                "2",
                                                "--json"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const nlohmann::json j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j.at("world_size"), 2);
  ASSERT_EQ(j.at("ranks").size(), 2u) << j.dump();
  EXPECT_EQ(j.at("ranks")[0].at("allreduce_calls"), 4);
  EXPECT_EQ(j.at("ranks")[0].at("params_digest"), j.at("ranks")[1].at("params_digest"))
      << "the ranks hold different parameters: their gradients were not averaged";
}

// Script mode on the GPU: the LSTM example with --device cuda at a binding budget (85% of its own
// full-batch fp32 figure). The figure is the client's peak reserved + context; each trial
// records it beside the host tree's, and the driver's where NVML reads this container's pids.
TEST(Cuda, ScriptModeTunesTheExampleWithinADeviceBudget) {
  AUTOTUNE_NEED_CUDA();
  nlohmann::json first;
  std::string err;
  tu::tuned_at_a_binding_budget(
      "cuda-lstm",
      {AUTOTUNE_PYTHON, std::string(AUTOTUNE_SOURCE_DIR) + "/examples/scripts/lstm_regressor.py",
       "--device", "cuda", "--seq-len", "400", "--hidden", "512", "--layers", "3", "--steps", "8",
       "--global-batch", "128"},
      128, "cuda", &first, &err);
  ASSERT_FALSE(first.empty());
  EXPECT_NE(err.find("the figure is the client's peak reserved + context"), std::string::npos)
      << err;
  for (const auto& t : first["trials"]) {
    if (!t["fits"].get<bool>()) continue;
    const auto& peaks = t["phase_peaks"];
    EXPECT_GT(peaks.value("device_client", uint64_t{0}), 0u) << t.dump();
    EXPECT_GT(peaks.value("host_tree", uint64_t{0}), 0u) << t.dump();
    EXPECT_EQ(t["peak_bytes"].get<uint64_t>(), std::max(peaks["device_client"].get<uint64_t>(),
                                                        peaks.value("device_driver", uint64_t{0})))
        << t.dump();
  }
}
