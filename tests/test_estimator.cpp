// The estimator against measurement: the analytic tensor peak of a training step within 10% of
// the counting allocator's measured peak, for fp32/bf16 x checkpointing off/on x 2 GPT sizes,
// and 2 LSTM sizes x 2 micro-batches.
#include <gtest/gtest.h>

#include "autotune/estimator.h"
#include "autotune/gpt_workload.h"
#include "autotune/lstm_workload.h"
#include "autotune/memory.h"
#include "autotune/memory_monitor.h"
#include "autotune/trainer.h"
#include "test_support.h"

namespace tu = autotune::testing;
using namespace autotune;

namespace {
// Peak CPU tensor bytes over two training steps (the first optimizer step creates AdamW state)
// and one evaluation, above what was allocated before the run.
uint64_t measured_tensor_peak(Workload& w, const Plan& plan, MemoryMeter& meter) {
  TrainOptions opt;
  opt.steps = 2;
  opt.eval_sequences = plan.micro_batch;
  MemoryMonitorOptions mo;
  mo.every_steps = 0;
  MemoryMonitor monitor(meter, mo);
  const int64_t before = cpu_alloc::current_bytes();
  train(w, plan, opt, {&monitor});
  uint64_t peak = 0;
  for (const auto& [phase, p] : monitor.phase_peaks()) peak = std::max(peak, p.tensor_bytes);
  return peak - static_cast<uint64_t>(before);
}
}  // namespace

TEST(Estimator, WithinTenPercentOfMeasuredPeak) {
  MemoryMeter meter(torch::kCPU);
  auto data = TokenFile::open(tu::corpus_path());
  int checked = 0;
  double worst = 0;
  std::printf("%-10s %-5s %-4s %4s %12s %12s %8s\n", "model", "prec", "ckpt", "mb", "estimate",
              "measured", "error");
  for (const char* model : {"gpt-mini", "gpt-10m"}) {
    GptWorkload w(load_gpt_config(model), data, 1);
    for (Precision prec : {Precision::fp32, Precision::bf16})
      for (bool ckpt : {false, true}) {
        Plan p;
        p.micro_batch = std::string(model) == "gpt-10m" ? 4 : 16;
        p.precision = prec;
        p.checkpointing = ckpt;
        const double est = static_cast<double>(estimate_memory(w, p, 0).tensor_peak_bytes);
        const double got = static_cast<double>(measured_tensor_peak(w, p, meter));
        const double err = (est - got) / got;
        worst = std::max(worst, std::abs(err));
        std::printf("%-10s %-5s %-4s %4lld %10.1fMiB %10.1fMiB %+7.1f%%\n", model,
                    to_string(prec).c_str(), ckpt ? "on" : "off",
                    static_cast<long long>(p.micro_batch), est / 1048576.0, got / 1048576.0,
                    100 * err);
        EXPECT_LE(std::abs(err), 0.10) << model << " " << to_string(prec) << " ckpt " << ckpt;
        ++checked;
      }
  }
  // The LSTM (fp32: its bf16 has no oneDNN kernel on CPUs without AVX512-BF16).
  for (const char* model : {"lstm-small", "lstm-medium"}) {
    LstmWorkload w(load_lstm_config(model), 1);
    for (int64_t mb : {int64_t{4}, int64_t{16}}) {
      Plan p;
      p.micro_batch = mb;
      const double est = static_cast<double>(estimate_memory(w, p, 0).tensor_peak_bytes);
      const double got = static_cast<double>(measured_tensor_peak(w, p, meter));
      const double err = (est - got) / got;
      worst = std::max(worst, std::abs(err));
      std::printf("%-10s %-5s %-4s %4lld %10.1fMiB %10.1fMiB %+7.1f%%\n", model, "fp32", "-",
                  static_cast<long long>(mb), est / 1048576.0, got / 1048576.0, 100 * err);
      EXPECT_LE(std::abs(err), 0.10) << model << " micro-batch " << mb;
      ++checked;
    }
  }
  std::printf("worst error %.1f%% over %d configurations\n", 100 * worst, checked);
  EXPECT_GE(checked, 12);
}
