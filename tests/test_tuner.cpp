// The tuner on CPU with the counting allocator's cap standing in for a device budget.
#include <gtest/gtest.h>

#include <functional>

#include <nlohmann/json.hpp>

#include "autotune/gpt_workload.h"
#include "autotune/lstm_workload.h"
#include "autotune/memory.h"
#include "autotune/tuner.h"
#include "memory/cpu_allocator.h"
#include "test_support.h"

namespace tu = autotune::testing;

using namespace autotune;

namespace {
constexpr uint64_t kMiB = uint64_t{1} << 20;

struct Fixture {
  MemoryMeter meter{torch::kCPU};
  GptWorkload gpt{load_gpt_config("gpt-mini"), TokenFile::open(tu::corpus_path()), 1};

  Fixture() {
    // LibTorch's one-time start-up (kernels, thread pools) grows RSS on the first step of a
    // process; one uncapped step first keeps it out of the budget figures the tests compare.
    Plan p;
    p.micro_batch = 1;
    ProbeOptions free;
    free.usable_bytes = UINT64_MAX;
    free.measured_steps = 0;
    run_trial(gpt, p, free, meter);
  }

  TunerRequest request(uint64_t above_baseline, const std::string& search = "model") {
    meter.remeasure_baseline();
    TunerRequest r;
    r.global_batch = 32;
    r.budget_bytes = meter.baseline_bytes() + above_baseline;
    r.usable_bytes = r.budget_bytes;
    r.search = search;
    r.probe.usable_bytes = r.usable_bytes;
    // The hard cap: tensors may use the budget minus what the process holds besides tensors.
    cpu_alloc::set_cap(static_cast<int64_t>(above_baseline));
    return r;
  }
  ~Fixture() { cpu_alloc::set_cap(std::nullopt); }
};

void expect_invariants(const TunerResult& r, const TunerRequest& req) {
  for (const auto& t : r.trials) {
    EXPECT_EQ(t.plan.global_batch(), req.global_batch) << t.plan.describe();
    if (t.fits) EXPECT_LE(t.peak_bytes, req.usable_bytes) << t.plan.describe();
  }
}

// gpt-mini whose build throws for some plans: an op without a kernel, a model too large.
struct FailingGpt : GptWorkload {
  explicit FailingGpt(std::function<void(const Plan&)> fail_if)
      : GptWorkload(load_gpt_config("gpt-mini"), TokenFile::open(tu::corpus_path()), 1),
        fail_if_(std::move(fail_if)) {}
  std::shared_ptr<TrainableModel> build(const Plan& p, torch::Device d, uint64_t seed) override {
    fail_if_(p);
    return GptWorkload::build(p, d, seed);
  }
  std::function<void(const Plan&)> fail_if_;
};

void print(const char* name, const TunerResult& r) {
  std::printf("%s: %zu trials, %.1fs -> %s\n", name, r.trials.size(), r.probe_seconds,
              r.plan ? r.plan->describe().c_str() : r.infeasible_message.c_str());
  for (const auto& t : r.trials)
    std::printf("   %-50s fits=%d oom=%d peak=%.1f MiB %.0f tok/s  %s\n", t.plan.describe().c_str(),
                t.fits, t.oom, static_cast<double>(t.peak_bytes) / kMiB, t.tokens_per_s,
                t.reason.c_str());
}
}  // namespace

TEST(Tuner, SmallerBudgetUsesLessMemoryLargerIsNotSlower) {
  Fixture f;
  auto small_req = f.request(40 * kMiB);
  TunerResult small = tune(f.gpt, small_req, f.meter);
  print("40 MiB above baseline", small);
  expect_invariants(small, small_req);
  auto large_req = f.request(160 * kMiB);
  TunerResult large = tune(f.gpt, large_req, f.meter);
  print("160 MiB above baseline", large);
  expect_invariants(large, large_req);
  ASSERT_TRUE(large.plan);
  ASSERT_TRUE(small.plan) << "40 MiB above the baseline holds gpt-mini at a small micro-batch: "
                          << small.infeasible_message;
  auto chosen = [](const TunerResult& r) {
    for (const auto& t : r.trials)
      if (t.plan == *r.plan) return t;
    return Trial{};
  };
  EXPECT_LE(chosen(small).peak_bytes, small_req.usable_bytes);
  // Every plan that fits the smaller budget fits the larger one too.
  EXPECT_LE(chosen(small).peak_bytes, large_req.usable_bytes);
  // "Not slower", without asserting on timings (two short timings of one plan vary by +-10%
  // here): the larger budget's search reached at least the micro-batch the smaller one chose,
  // so the smaller budget's choice was within its reach, and it chose the fastest it measured.
  int64_t largest_fitting = 0;
  double fastest = 0;
  for (const auto& t : large.trials)
    if (t.fits) {
      largest_fitting = std::max(largest_fitting, t.plan.micro_batch);
      fastest = std::max(fastest, t.tokens_per_s);
    }
  EXPECT_GE(largest_fitting, small.plan->micro_batch);
  EXPECT_GE(chosen(large).tokens_per_s, 0.97 * fastest);  // the 3% tie band of the selection
}

TEST(Tuner, PinsAreRespectedAndShrinkNeedsConsent) {
  AUTOTUNE_SKIP_UNDER_ASAN();
  Fixture f;
  auto req = f.request(120 * kMiB);
  req.precision = Precision::bf16;
  req.checkpointing = false;
  TunerResult r = tune(f.gpt, req, f.meter);
  print("pinned bf16, no checkpointing", r);
  ASSERT_TRUE(r.plan);
  for (const auto& t : r.trials) {
    EXPECT_EQ(t.plan.precision, Precision::bf16);
    EXPECT_FALSE(t.plan.checkpointing);
    EXPECT_EQ(t.plan.seq_len, 0);  // never changed without --allow-shrink
    EXPECT_EQ(t.plan.d_model, 0);
  }
  auto pin_mb = f.request(120 * kMiB);
  pin_mb.micro_batch = 4;
  TunerResult r2 = tune(f.gpt, pin_mb, f.meter);
  ASSERT_TRUE(r2.plan);
  for (const auto& t : r2.trials) EXPECT_EQ(t.plan.micro_batch, 4);
  EXPECT_EQ(r2.plan->grad_accum, 8);
}

TEST(Tuner, InfeasibleBudgetSaysWhatWouldFit) {
  Fixture f;
  auto req = f.request(2 * kMiB);  // below even the parameters and optimizer states + one batch
  TunerResult r = tune(f.gpt, req, f.meter);
  print("2 MiB", r);
  EXPECT_FALSE(r.plan);
  EXPECT_NE(r.infeasible_message.find("no plan fits"), std::string::npos);
  EXPECT_NE(r.infeasible_message.find("--allow-shrink seq"), std::string::npos);
  for (const auto& t : r.trials) EXPECT_FALSE(t.fits);
  // Not one byte above the baseline: even the precision check's matrices are refused; the
  // search still ends in the infeasible message, never in an escaped OutOfMemoryError.
  auto zero = f.request(0);
  TunerResult r0;
  EXPECT_NO_THROW(r0 = tune(f.gpt, zero, f.meter));
  EXPECT_FALSE(r0.plan);
  EXPECT_NE(r0.infeasible_message.find("no plan fits"), std::string::npos);
}

// gpt-mini with a 512-token context: at micro-batch 1 its activations (16 MiB at 512 tokens)
// outweigh its parameters and AdamW states, so a shorter sequence or a narrower model is what
// makes a budget fit.
GptWorkload long_context_gpt() {
  GptConfig c = load_gpt_config("gpt-mini");
  c.seq_len = 512;
  return GptWorkload(c, TokenFile::open(tu::corpus_path()), 1);
}

uint64_t peak_of(Workload& w, MemoryMeter& meter, int64_t seq_len, int64_t d_model) {
  Plan p;
  p.micro_batch = 1;
  p.grad_accum = 32;
  p.seq_len = seq_len;
  p.d_model = d_model;
  ProbeOptions free;
  free.usable_bytes = UINT64_MAX;
  return run_trial(w, p, free, meter).peak_bytes;
}

TEST(Tuner, ShrinkSeqOnlyWithConsentAndSaysSo) {
  Fixture f;
  GptWorkload gpt = long_context_gpt();
  // A budget between micro-batch 1's measured peak at a quarter of the sequence and at the full
  // sequence: nothing fits the task as asked, a shorter sequence does.
  auto peak_at = [&](int64_t seq_len) { return peak_of(gpt, f.meter, seq_len, 0); };
  peak_at(512);  // this workload's first step: one-time growth out of the figures below
  const uint64_t full = peak_at(512), quarter = peak_at(128);
  ASSERT_GT(full, quarter + (4u << 20));
  f.meter.remeasure_baseline();
  const uint64_t between = (full + quarter) / 2;
  auto req = f.request(between - std::min(between, f.meter.baseline_bytes()));
  req.precision = Precision::fp32;
  req.checkpointing = false;
  TunerResult without = tune(gpt, req, f.meter);
  print("between, no consent", without);
  EXPECT_FALSE(without.plan) << "the full sequence does not fit: no plan without consent";
  req.allow_shrink_seq = true;
  TunerResult r = tune(gpt, req, f.meter);
  print("between, --allow-shrink seq", r);
  ASSERT_TRUE(r.plan) << r.infeasible_message;
  EXPECT_TRUE(r.shrunk_task);
  EXPECT_LT(r.plan->seq_len, 512);
  EXPECT_GE(r.plan->seq_len, 128);
  EXPECT_NE(r.shrink_note.find("task changed"), std::string::npos);
}

// Width alone, and seq and width together: the narrower model really is built (a multiple of
// n_head), and with both allowed the least change wins: width 3/4 (0.56x the parameters, cost
// 0.83) before half the sequence (cost 1), where the search used to halve the sequence first.
TEST(Tuner, ShrinkWidthAndBothTakeTheLeastChange) {
  Fixture f;
  GptWorkload gpt = long_context_gpt();
  auto peak_at = [&](int64_t d_model) { return peak_of(gpt, f.meter, 0, d_model); };
  peak_at(128);  // this workload's first step: one-time growth out of the figures below
  const std::vector<int64_t> widths = gpt.width_options();
  ASSERT_GE(widths.size(), 2u);
  EXPECT_EQ(widths[0], 96);  // 3/4 of gpt-mini's 128, a multiple of its 4 heads
  for (int64_t w : widths) EXPECT_EQ(w % 4, 0) << w;
  const uint64_t full = peak_at(128), three_quarters = peak_at(96);
  ASSERT_GT(full, three_quarters + (2u << 20));
  f.meter.remeasure_baseline();
  const uint64_t between = (full + three_quarters) / 2;
  for (bool with_seq : {false, true}) {
    auto req = f.request(between - std::min(between, f.meter.baseline_bytes()));
    req.precision = Precision::fp32;
    req.checkpointing = false;
    req.allow_shrink_width = true;
    req.allow_shrink_seq = with_seq;
    TunerResult r = tune(gpt, req, f.meter);
    print(with_seq ? "--allow-shrink seq,width" : "--allow-shrink width", r);
    ASSERT_TRUE(r.plan) << r.infeasible_message;
    EXPECT_EQ(r.plan->d_model, 96) << "the least change that fits";
    EXPECT_EQ(r.plan->seq_len, 0) << "the sequence is kept: width 3/4 costs less than seq/2";
    EXPECT_TRUE(r.shrunk_task);
    EXPECT_NE(r.shrink_note.find("model width shrunk from 128 to 96"), std::string::npos)
        << r.shrink_note;
    // The model that plan builds really is narrower.
    auto model = gpt.build(*r.plan, torch::kCPU, 1);
    int64_t params = 0;
    for (const auto& p : model->parameters()) params += p.numel();
    EXPECT_EQ(params, gpt.config_for(*r.plan).n_params());
    EXPECT_EQ(gpt.config_for(*r.plan).d_model, 96);
  }
}

// The binary says a changed task in the profile and the summary, and `train` reproduces the plan.
TEST(Tuner, AShrunkPlanIsSaidAndTrainReproducesIt) {
  const std::string dir = tu::temp_dir("shrunk");
  auto probe = tu::run_autotune({"probe", "--model", "gpt-mini", "--data", tu::corpus_path(),
                                 "--budget", "8G", "--global-batch", "8", "--d-model", "64",
                                 "--seq-len", "64", "--profile-dir", dir, "--json"});
  ASSERT_EQ(probe.exit_code, 0) << probe.err;
  const auto plan = nlohmann::json::parse(probe.out).at("plan");
  EXPECT_EQ(plan.at("d_model").get<int64_t>(), 64) << "a pinned width is kept";
  EXPECT_EQ(plan.at("seq_len").get<int64_t>(), 64);
  auto train = tu::run_autotune(
      {"train", "--model", "gpt-mini", "--data", tu::corpus_path(), "--global-batch", "8",
       "--micro-batch", std::to_string(plan.at("micro_batch").get<int64_t>()), "--d-model", "64",
       "--seq-len", "64", "--steps", "2", "--eval-sequences", "2", "--json"});
  ASSERT_EQ(train.exit_code, 0) << train.err;
  const auto t = nlohmann::json::parse(train.out).at("plan");
  EXPECT_EQ(t.at("d_model").get<int64_t>(), 64);
  EXPECT_EQ(t.at("seq_len").get<int64_t>(), 64);
  const auto row = train.err.find("| d_model ");
  ASSERT_NE(row, std::string::npos) << train.err;
  EXPECT_NE(
      train.err.substr(row, train.err.find('\n', row) - row).find("| 64 (the model's is 128)"),
      std::string::npos)
      << "the settings table says the width: " << train.err;
}

TEST(Tuner, OomInATrialIsSurvivedAndRecorded) {
  AUTOTUNE_SKIP_UNDER_ASAN();
  Fixture f;
  auto req = f.request(30 * kMiB);
  Plan huge;
  huge.micro_batch = 32;
  Trial t = run_trial(f.gpt, huge, req.probe, f.meter);
  EXPECT_TRUE(t.oom) << t.reason;
  EXPECT_FALSE(t.fits);
  EXPECT_NE(t.reason.find("out of memory"), std::string::npos);
  // Everything of the trial was released: a small trial right after fits.
  Plan small;
  small.micro_batch = 1;
  small.grad_accum = 32;
  Trial t2 = run_trial(f.gpt, small, req.probe, f.meter);
  EXPECT_TRUE(t2.fits) << t2.reason;
  EXPECT_EQ(t2.steps_run, 3);
  EXPECT_GT(t2.tokens_per_s, 0);
}

TEST(Tuner, TrialThatRanNoStepIsAnError) {
  // A workload whose model cannot be built: the trial runs zero steps and must say so.
  struct Broken : GptWorkload {
    using GptWorkload::GptWorkload;
    std::shared_ptr<TrainableModel> build(const Plan&, torch::Device, uint64_t) override {
      throw std::runtime_error("broken model");
    }
  };
  Fixture f;
  Broken broken(load_gpt_config("gpt-tiny"), TokenFile::open(tu::corpus_path()), 1);
  auto req = f.request(100 * kMiB);
  Trial t = run_trial(broken, Plan{}, req.probe, f.meter);
  EXPECT_FALSE(t.fits);
  EXPECT_EQ(t.steps_run, 0);
  EXPECT_NE(t.reason.find("error"), std::string::npos) << t.reason;
}

TEST(Tuner, ALogicErrorInATrialStopsTheProbeWithItsMessage) {
  // A bug of ours is no property of the plan: it is not recorded as a refused trial.
  struct Buggy : GptWorkload {
    using GptWorkload::GptWorkload;
    std::shared_ptr<TrainableModel> build(const Plan&, torch::Device, uint64_t) override {
      throw std::out_of_range("index 3 of 2");
    }
  };
  Fixture f;
  Buggy buggy(load_gpt_config("gpt-tiny"), TokenFile::open(tu::corpus_path()), 1);
  auto req = f.request(100 * kMiB);
  EXPECT_THROW(run_trial(buggy, Plan{}, req.probe, f.meter), std::out_of_range);
}

TEST(Tuner, TrialBelowTheStopRateIsStoppedEarlyAndNeverFits) {
  AUTOTUNE_SKIP_UNDER_ASAN();
  Fixture f;
  auto req = f.request(200 * kMiB);
  Plan p;
  p.micro_batch = 8;
  p.grad_accum = 4;
  ProbeOptions po = req.probe;
  Trial full = run_trial(f.gpt, p, po, f.meter);
  ASSERT_TRUE(full.fits) << full.reason;
  // A rate 20x above what this plan reaches: the trial must stop long before it would end.
  po.stop_below_tokens_per_s = 20 * full.tokens_per_s;
  Trial t = run_trial(f.gpt, p, po, f.meter);
  std::printf("full trial %.2f s at %.0f tokens/s; stopped trial %.2f s: %s\n", full.wall_s,
              full.tokens_per_s, t.wall_s, t.reason.c_str());
  EXPECT_TRUE(t.too_slow);
  EXPECT_FALSE(t.fits);
  EXPECT_LT(t.steps_run, full.steps_run) << "stopped before the trial's last step";
  EXPECT_NE(t.reason.find("stopped"), std::string::npos) << t.reason;
  // A rate it does reach never stops it.
  po.stop_below_tokens_per_s = 0.05 * full.tokens_per_s;
  EXPECT_TRUE(run_trial(f.gpt, p, po, f.meter).fits);
}

TEST(Tuner, APrecisionThatFailsIsTriedOnceThenAbandoned) {
  AUTOTUNE_SKIP_UNDER_ASAN();
  // Like LibTorch's bf16 LSTM on a CPU without AVX512-BF16 ("could not create a primitive
  // descriptor"): every bf16 plan fails whatever its micro-batch.
  Fixture f;
  FailingGpt w([](const Plan& p) {
    if (p.precision == Precision::bf16) throw std::runtime_error("no bf16 kernel");
  });
  auto req = f.request(60 * kMiB);
  req.min_precision_speed = 0;  // probe bf16 even where its matmul is slow
  TunerResult r = tune(w, req, f.meter);
  print("no-bf16", r);
  ASSERT_TRUE(r.plan) << r.infeasible_message;
  EXPECT_EQ(r.plan->precision, Precision::fp32);
  int bf16_trials = 0;
  for (const auto& t : r.trials)
    if (t.plan.precision == Precision::bf16) {
      ++bf16_trials;
      EXPECT_TRUE(t.error) << t.reason;
      EXPECT_FALSE(t.fits);
    }
  EXPECT_GE(bf16_trials, 1);
  // One per (bf16, checkpointing) pair the search reached, never a walk over micro-batches.
  EXPECT_LE(bf16_trials, 2);
}

TEST(Tuner, ALowPrecisionSlowerThanFp32IsProbedOnlyWhenNothingElseFits) {
  AUTOTUNE_SKIP_UNDER_ASAN();
  Fixture f;
  auto req = f.request(60 * kMiB);
  TunerResult r = tune(f.gpt, req, f.meter);
  print("default", r);
  ASSERT_TRUE(r.plan) << r.infeasible_message;
  ASSERT_EQ(r.precision_speed.count(Precision::bf16), 1u);
  const double speed = r.precision_speed.at(Precision::bf16);
  int bf16_trials = 0;
  for (const auto& t : r.trials) bf16_trials += t.plan.precision == Precision::bf16;
  // bf16 at ~0.014x fp32 on an AVX2-only CPU, faster than fp32 on AMX CPUs: either way the rule.
  if (speed < req.min_precision_speed) {
    EXPECT_EQ(bf16_trials, 0) << "bf16 matmul at " << speed << "x fp32";
    ASSERT_EQ(r.skipped_precisions.size(), 1u);
    EXPECT_EQ(r.skipped_precisions[0], Precision::bf16);
  } else {
    EXPECT_GE(bf16_trials, 1) << "bf16 matmul at " << speed << "x fp32";
    EXPECT_TRUE(r.skipped_precisions.empty());
  }

  // Nothing fits in fp32 (every fp32 model runs out of memory as it is built): the slow
  // precision is probed after all, and chosen, because slow beats nothing.
  FailingGpt w([](const Plan& p) {
    TORCH_CHECK_WITH(OutOfMemoryError, p.precision != Precision::fp32, "fp32 model too large");
  });
  auto req2 = f.request(60 * kMiB);
  req2.min_precision_speed = 1e9;  // every low precision counts as slower than fp32
  TunerResult r2 = tune(w, req2, f.meter);
  print("fp32 too large", r2);
  ASSERT_TRUE(r2.plan) << r2.infeasible_message;
  EXPECT_EQ(r2.plan->precision, Precision::bf16);
  EXPECT_TRUE(r2.skipped_precisions.empty());
  for (const auto& t : r2.trials)
    if (t.plan.precision == Precision::fp32) EXPECT_TRUE(t.oom) << t.plan.describe();
}

TEST(Tuner, ModelSearchNeedsFewerTrialsThanPower) {
  AUTOTUNE_SKIP_UNDER_ASAN();
  Fixture f;
  // 140 MiB: power needs 5 trials (2, 4, 8, 16 fit, 32 does not) to know the largest micro-batch
  // that fits and the smallest that does not. Model knows both after its first trials (16 fits,
  // 32 measured as the boundary); its walk down from 16 afterwards is a speed search (smaller
  // micro-batches can be faster, and are under a parallel ctest), counted apart.
  auto req = f.request(140 * kMiB, "model");
  req.precision = Precision::fp32;  // power and halve search micro-batch only
  TunerResult model = tune(f.gpt, req, f.meter);
  auto preq = f.request(140 * kMiB, "power");
  preq.precision = Precision::fp32;
  TunerResult power = tune(f.gpt, preq, f.meter);
  print("model", model);
  print("power", power);
  ASSERT_TRUE(model.plan);
  ASSERT_TRUE(power.plan);
  size_t model_to_boundary = 0;  // trials until the largest fitting and the boundary were known
  int64_t largest = 0;
  for (const auto& t : model.trials)
    if (t.fits) largest = std::max(largest, t.plan.micro_batch);
  for (size_t i = 0; i < model.trials.size(); ++i)
    if (model.trials[i].plan.micro_batch >= largest) model_to_boundary = i + 1;
  EXPECT_LT(model_to_boundary, power.trials.size());
  // "At least as fast", without asserting on timings: model reached at least the micro-batch
  // power chose (so that plan was within its reach) and chose the fastest it measured.
  int64_t largest_fitting = 0;
  double fastest = 0, chosen = 0;
  for (const auto& t : model.trials)
    if (t.fits) {
      largest_fitting = std::max(largest_fitting, t.plan.micro_batch);
      fastest = std::max(fastest, t.tokens_per_s);
      if (t.plan == *model.plan) chosen = t.tokens_per_s;
    }
  EXPECT_GE(largest_fitting, power.plan->micro_batch);
  EXPECT_GE(chosen, 0.97 * fastest);  // the 3% tie band of the selection
}

TEST(Tuner, LstmIsTunedByTheSameCode) {
  AUTOTUNE_SKIP_UNDER_ASAN();
  Fixture f;
  LstmWorkload lstm(load_lstm_config("lstm-small"), 1);
  auto req = f.request(60 * kMiB);
  TunerResult r = tune(lstm, req, f.meter);
  print("lstm-small", r);
  ASSERT_TRUE(r.plan);
  expect_invariants(r, req);
  for (const auto& t : r.trials) EXPECT_FALSE(t.plan.checkpointing);  // not an LSTM knob
}

TEST(Tuner, TheBoundaryAboveTheChosenMicroBatchIsMeasuredNotOnlyPredicted) {
  AUTOTUNE_SKIP_UNDER_ASAN();
  Fixture f;
  // Measure micro-batches 8 and 16 uncapped, then give a budget that holds 8 with 16 about 5%
  // over it: the fitted line (one measured point, the estimator's slope) predicts 16 does not
  // fit, and within the estimator's error band the search measures it to know.
  auto peak_at = [&](int64_t mb) {
    f.meter.remeasure_baseline();
    Plan p;
    p.micro_batch = mb;
    p.grad_accum = 32 / mb;
    ProbeOptions free;
    free.usable_bytes = UINT64_MAX;
    return run_trial(f.gpt, p, free, f.meter).peak_bytes;
  };
  const uint64_t p8 = peak_at(8), p16 = peak_at(16);
  ASSERT_GT(p16, p8);
  f.meter.remeasure_baseline();
  const uint64_t usable = static_cast<uint64_t>(static_cast<double>(p16) / 1.05);
  ASSERT_GT(usable, p8 + 2 * kMiB) << "16 is not 5% over 8 here; the test needs another pair";
  auto req = f.request(usable - f.meter.baseline_bytes());
  req.precision = Precision::fp32;
  req.checkpointing = false;
  TunerResult r = tune(f.gpt, req, f.meter);
  print("boundary", r);
  expect_invariants(r, req);
  ASSERT_TRUE(r.plan);
  EXPECT_LE(r.plan->micro_batch, 8);
  bool refused_16 = false;
  for (const auto& t : r.trials)
    if (t.plan.micro_batch == 16) refused_16 = !t.fits;
  EXPECT_TRUE(refused_16) << "micro-batch 16 was predicted just over the budget and not measured";
  ASSERT_EQ(r.lines.size(), 1u);
  EXPECT_TRUE(r.lines[0].measured);
}

TEST(Tuner, SplitOptimizerStatesAreSearchedOnlyWhereMemoryRefusedAPlan) {
  AUTOTUNE_SKIP_UNDER_ASAN();
  Fixture f;
  // gpt-10m: 85 MB of AdamW states; split over 2 ranks (ZeRO-1) each keeps about half. A probe
  // trial of a split plan is rank 0 alone, holding the heaviest rank's share.
  GptWorkload big(load_gpt_config("gpt-10m"), TokenFile::open(tu::corpus_path()), 1);
  auto plan_of = [](int64_t shards) {
    Plan p;
    p.micro_batch = 1;
    p.grad_accum = 2;
    p.optimizer_shards = shards;
    return p;
  };
  ProbeOptions free;
  free.usable_bytes = UINT64_MAX;
  free.measured_steps = 0;
  run_trial(big, plan_of(1), free, f.meter);  // this model's one-time growth, outside the figures
  free.measured_steps = 2;
  auto peak_of = [&](int64_t shards) {
    f.meter.remeasure_baseline();
    return run_trial(big, plan_of(shards), free, f.meter).peak_bytes;
  };
  const uint64_t whole = peak_of(1), split = peak_of(2);
  const double states = 8.0 * static_cast<double>(big.estimate_terms(plan_of(1)).n_params);
  std::printf("peak with whole states %.1f MiB, split over 2: %.1f MiB (states %.1f MiB)\n",
              static_cast<double>(whole) / kMiB, static_cast<double>(split) / kMiB, states / kMiB);
  ASSERT_LT(static_cast<double>(split) + 0.4 * states, static_cast<double>(whole))
      << "splitting the states did not save most of their half";

  auto tune_at = [&](uint64_t usable, int64_t world) {
    f.meter.remeasure_baseline();
    auto req = f.request(usable - f.meter.baseline_bytes());
    req.global_batch = 2;
    req.micro_batch = 1;
    req.precision = Precision::fp32;
    req.checkpointing = false;
    req.world_size = world;
    TunerResult r = tune(big, req, f.meter);
    expect_invariants(r, req);
    return r;
  };
  auto split_trials = [](const TunerResult& r) {
    int n = 0;
    for (const auto& t : r.trials) n += t.plan.optimizer_shards > 1;
    return n;
  };
  // Between the two peaks: the whole states are refused, the split plan is chosen.
  const TunerResult between = tune_at((whole + split) / 2, 2);
  print("between", between);
  ASSERT_TRUE(between.plan) << between.infeasible_message;
  EXPECT_EQ(between.plan->optimizer_shards, 2);
  ASSERT_FALSE(between.trials.empty());
  EXPECT_EQ(between.trials.front().plan.optimizer_shards, 1) << "whole states are tried first";
  EXPECT_FALSE(between.trials.front().fits);
  // Room for the whole states: no split plan is even tried (its broadcast would cost every step).
  const TunerResult roomy = tune_at(whole + whole / 5, 2);
  print("roomy", roomy);
  ASSERT_TRUE(roomy.plan);
  EXPECT_EQ(roomy.plan->optimizer_shards, 1);
  EXPECT_EQ(split_trials(roomy), 0);
  // One rank has nothing to split over: infeasible, never a split plan.
  const TunerResult alone = tune_at((whole + split) / 2, 1);
  EXPECT_FALSE(alone.plan);
  EXPECT_EQ(split_trials(alone), 0);
}
