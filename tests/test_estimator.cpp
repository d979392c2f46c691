// The estimator against measurement: the analytic tensor peak of a training step within 5% of
// the counting allocator's measured peak, for fp32/bf16 x checkpointing off/on x grad_accum 1/4
// x 2 GPT sizes, and 2 LSTM sizes x 2 micro-batches x grad_accum 1/4; and the budget figure
// `autotune estimate` prints against the one `autotune train` measures, in separate processes as
// a user runs them, for the presets at the micro-batches they train at on a small machine (none
// of them among the shapes the estimator's constants were fitted on, docs/ESTIMATOR.md).
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include "autotune/estimator.h"
#include "autotune/gpt_workload.h"
#include "autotune/lstm_workload.h"
#include "autotune/memory.h"
#include "autotune/trainer.h"
#include "memory/cpu_allocator.h"
#include "test_support.h"
#include "train/memory_monitor.h"

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

TEST(Estimator, TensorPeakWithinFivePercentOfMeasured) {
  MemoryMeter meter(torch::kCPU);
  auto data = TokenFile::open(tu::corpus_path());
  int checked = 0;
  double worst = 0;
  std::printf("%-10s %-5s %-4s %4s %2s %12s %12s %8s\n", "model", "prec", "ckpt", "mb", "ga",
              "estimate", "measured", "error");
  // One configuration: the estimate against the measured peak, printed as a table row.
  auto check = [&](Workload& w, const Plan& p, const char* model, const char* ckpt) {
    const double est = static_cast<double>(estimate_memory(w, p, 0).tensor_peak_bytes);
    const double got = static_cast<double>(measured_tensor_peak(w, p, meter));
    const double err = (est - got) / got;
    worst = std::max(worst, std::abs(err));
    std::printf("%-10s %-5s %-4s %4lld %2lld %10.1fMiB %10.1fMiB %+7.1f%%\n", model,
                to_string(p.precision).c_str(), ckpt, static_cast<long long>(p.micro_batch),
                static_cast<long long>(p.grad_accum), est / 1048576.0, got / 1048576.0, 100 * err);
    EXPECT_LE(std::abs(err), 0.05)
        << model << " " << to_string(p.precision) << " ckpt " << ckpt << " micro-batch "
        << p.micro_batch << " grad_accum " << p.grad_accum;
    ++checked;
  };
  for (const char* model : {"gpt-mini", "gpt-10m"}) {
    GptWorkload w(load_gpt_config(model), data, 1);
    for (Precision prec : {Precision::fp32, Precision::bf16})
      for (bool ckpt : {false, true})
        for (int64_t ga : {int64_t{1}, int64_t{4}}) {
          Plan p;
          p.micro_batch = std::string(model) == "gpt-10m" ? 4 : 16;
          p.grad_accum = ga;
          p.precision = prec;
          p.checkpointing = ckpt;
          check(w, p, model, ckpt ? "on" : "off");
        }
  }
  // The LSTM (fp32: its bf16 has no oneDNN kernel on CPUs without AVX512-BF16).
  for (const char* model : {"lstm-small", "lstm-medium"}) {
    LstmWorkload w(load_lstm_config(model), 1);
    for (int64_t mb : {int64_t{4}, int64_t{16}})
      for (int64_t ga : {int64_t{1}, int64_t{4}}) {
        Plan p;
        p.micro_batch = mb;
        p.grad_accum = ga;
        check(w, p, model, "-");
      }
  }
  std::printf("worst error %.1f%% over %d configurations\n", 100 * worst, checked);
  EXPECT_GE(checked, 24);
}

TEST(Estimator, TheBudgetFigureOfEstimateMatchesTrain) {
  // Bound on |estimate - measured| / measured of the budget figure (baseline + tensor peak +
  // reserve + what grows outside tensors). The goal is 3%; the caching allocator's reserve
  // moves between 5% and 23% of the tensor peak from shape to shape, which no closed form
  // follows, so single shapes land up to 5% off (docs/ESTIMATOR.md; scripts/bench-estimator
  // records every preset at grad_accum 1 and 4 in docs/BENCHMARKS.md).
  constexpr double kBound = 0.04;
  struct Case {
    const char* model;
    const char* micro_batch;
    const char* grad_accum;
  };
  int checked = 0;
  for (const Case c :
       {Case{"gpt-tiny", "16", "1"}, Case{"gpt-mini", "16", "4"}, Case{"gpt-10m", "4", "1"},
        Case{"gpt-10m", "2", "4"}, Case{"lstm-small", "16", "4"}, Case{"lstm-medium", "8", "1"},
        Case{"lstm-large", "4", "1"}}) {
    std::vector<std::string> plan = {"--model",      c.model,      "--micro-batch", c.micro_batch,
                                     "--grad-accum", c.grad_accum, "--precision",   "fp32"};
    if (std::string(c.model).rfind("lstm", 0) != 0)  // the LSTM trains on synthetic signals
      plan.insert(plan.end(), {"--data", tu::corpus_path()});
    auto est_args = plan;
    est_args.insert(est_args.begin(), "estimate");
    est_args.push_back("--json");
    auto train_args = plan;
    train_args.insert(train_args.begin(), "train");
    train_args.insert(train_args.end(),
                      {"--steps", "2", "--eval-sequences", c.micro_batch, "--json", "--quiet"});
    const auto est = tu::run_autotune(est_args);
    ASSERT_EQ(est.exit_code, 0) << est.err;
    const auto got = tu::run_autotune(train_args);
    ASSERT_EQ(got.exit_code, 0) << got.err;
    const auto e = nlohmann::json::parse(est.out).at("memory");
    const auto g = nlohmann::json::parse(got.out).at("memory");
    const double predicted = e.at("peak_bytes").get<double>();
    const double measured = g.at("peak_bytes").get<double>();
    const double err = (predicted - measured) / measured;
    std::printf(
        "%-10s %s x %s  budget figure estimate %.1f MiB, measured %.1f MiB (%+.1f%%); "
        "baseline %.1f / %.1f MiB\n",
        c.model, c.micro_batch, c.grad_accum, predicted / 1048576.0, measured / 1048576.0,
        100 * err, e.at("baseline_bytes").get<double>() / 1048576.0,
        g.at("host").at("baseline_bytes").get<double>() / 1048576.0);
    EXPECT_LE(std::abs(err), kBound) << c.model << " " << c.micro_batch << " x " << c.grad_accum;
    ++checked;
  }
  EXPECT_EQ(checked, 7);
}
