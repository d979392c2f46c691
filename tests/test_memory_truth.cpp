// Memory truth over real training runs with the caching CPU allocator: the process's resident
// memory stays within a stated bound of the baseline plus the allocator's reserved bytes at
// every phase, and a run under a budget never passes it.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "autotune/gpt_workload.h"
#include "autotune/memory.h"
#include "autotune/trainer.h"
#include "test_support.h"

namespace tu = autotune::testing;
using namespace autotune;

namespace {
constexpr int64_t kMiB = int64_t{1} << 20;

// At every phase end: RSS now against baseline + reserved now.
struct RssVsReserved : TrainObserver {
  const MemoryMeter* meter = nullptr;
  int64_t worst_over = 0;   // RSS above baseline + reserved (what the allocator cannot see)
  int64_t worst_under = 0;  // reserved above what is resident (mapped, not yet touched)
  int64_t max_reserved = 0;
  int samples = 0;
  void on_phase_end(Phase, int64_t) override {
    const MemorySample s = meter->sample();
    const int64_t rss = static_cast<int64_t>(s.rss_bytes);
    const int64_t expected = static_cast<int64_t>(meter->baseline_bytes() + s.reserved_bytes);
    worst_over = std::max(worst_over, rss - expected);
    worst_under = std::max(worst_under, expected - rss);
    max_reserved = std::max(max_reserved, static_cast<int64_t>(s.reserved_bytes));
    ++samples;
  }
};
}  // namespace

// Stated bound: RSS - baseline within 8 MiB + 5% of the reserved bytes, either way. Above it,
// glibc's heap and thread arenas (small tensors, the loader thread) would be growing unseen;
// below it, reserved segments would be standing untouched.
TEST(MemoryTruth, RssMinusBaselineStaysWithinABoundOfReservedOverARealRun) {
  AUTOTUNE_SKIP_UNDER_ASAN();
  GptConfig cfg = load_gpt_config("gpt-mini");
  cfg.dropout = 0.1;
  GptWorkload w(cfg, TokenFile::open(tu::corpus_path()), 3);
  w.set_data_options({ReadMode::pread, 0, 2});  // a loader thread, as in training; no file pages
  MemoryMeter meter(torch::kCPU);
  Plan p;
  p.micro_batch = 8;
  p.grad_accum = 2;
  TrainOptions opt;
  opt.steps = 2;
  opt.eval_sequences = 8;
  train(w, p, opt);  // warm-up: LibTorch's one-time growth belongs to the baseline
  meter.release_cache();
  meter.remeasure_baseline();

  RssVsReserved probe;
  probe.meter = &meter;
  opt.steps = 12;
  train(w, p, opt, {&probe});
  const int64_t bound = 8 * kMiB + probe.max_reserved / 20;
  std::printf(
      "%d samples: RSS above baseline + reserved by at most %.2f MiB, below by at most "
      "%.2f MiB; reserved up to %.1f MiB; bound %.2f MiB\n",
      probe.samples, probe.worst_over / double(kMiB), probe.worst_under / double(kMiB),
      probe.max_reserved / double(kMiB), bound / double(kMiB));
  ASSERT_GT(probe.samples, 12 * 5);
  EXPECT_LE(probe.worst_over, bound);
  EXPECT_LE(probe.worst_under, bound);
}

// The real binary under a budget that binds: micro-batch 16 measured above its usable bytes,
// so the plan must be smaller; every phase of the full run stays under the budget, by the
// figure and by the timeline.
TEST(MemoryTruth, AFullRunNeverPassesTheBudgetUnderTheCap) {
  AUTOTUNE_SKIP_UNDER_ASAN();
  const std::string dir = tu::temp_dir("truth-budget");
  const std::vector<std::string> common = {
      "--model", "gpt-mini",    "--data", tu::corpus_path(), "--device", "cpu", "--global-batch",
      "32",      "--precision", "fp32",   "--json"};
  auto args = [&](std::vector<std::string> head) {
    head.insert(head.end(), common.begin(), common.end());
    return head;
  };
  auto probe = tu::run_autotune(
      args({"probe", "--budget", "4G", "--micro-batch", "16", "--profile-dir", dir + "/probe"}));
  ASSERT_EQ(probe.exit_code, 0) << probe.err;
  const uint64_t peak16 =
      nlohmann::json::parse(probe.out).at("trials").at(0).at("peak_bytes").get<uint64_t>();
  const uint64_t budget =
      peak16 * 97 / 100;  // usable (98%, the default margin 2%) is below micro-batch 16's peak

  auto r = tu::run_autotune(args({"--budget", std::to_string(budget), "--steps", "12", "--run-dir",
                                  dir + "/run", "--profile-dir", dir + "/profiles"}));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const auto j = nlohmann::json::parse(r.out);
  EXPECT_LT(j.at("plan").at("micro_batch").get<int64_t>(), 16);
  EXPECT_GT(j.at("plan").at("grad_accum").get<int64_t>(), 2);
  EXPECT_TRUE(j.at("within_budget").get<bool>());
  EXPECT_LE(j.at("memory").at("peak_bytes").get<uint64_t>(), budget);
  std::ifstream timeline(dir + "/run/memory.jsonl");
  std::string line;
  int phases = 0;
  while (std::getline(timeline, line)) {
    const auto e = nlohmann::json::parse(line);
    EXPECT_LE(e.at("rss_bytes").get<uint64_t>(), budget) << line;
    EXPECT_LE(e.at("budget_bytes").get<uint64_t>(), budget) << line;
    ++phases;
  }
  EXPECT_GT(phases, 12 * 3);
}
