// What depends on the device rather than the host: the memory mode of an accelerator follows its
// own memory, accelerator runs get a host budget of their own, and the low precision is the one
// the device runs fast (fp16 with loss scaling where bf16 is not).
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "autotune/machine.h"
#include "autotune/trainer.h"
#include "models/precision.h"
#include "test_support.h"

namespace tu = autotune::testing;
using namespace autotune;

namespace {
constexpr uint64_t kGiB = uint64_t{1} << 30;
}

// A 70G budget on an 80 GB GPU of a 64 GB host: the device has room, so nothing of ultra-low-mem
// (start small, release caches between phases, eval batch 2). Comparing the budget with host RAM,
// as before, chose ultra-low-mem.
TEST(DevicePolicy, AnAcceleratorsModeComparesTheBudgetWithTheDevice) {
  const MachineFacts host{64 * kGiB, 60 * kGiB, "test"};
  EXPECT_EQ(choose_mode(Mode::auto_, 70 * kGiB, host).mode, Mode::ultra_low)
      << "the host comparison this replaces";
  const ModeChoice device = choose_device_mode(Mode::auto_, 70 * kGiB, 80 * kGiB, 79 * kGiB);
  EXPECT_EQ(device.mode, Mode::normal) << device.reason;
  const uint64_t host_budget = default_host_budget(host);
  EXPECT_EQ(host_budget, 58 * kGiB);
  const ModeChoice host_mode = choose_mode(Mode::auto_, host_budget, host);
  const ModePolicy p = policy_for(device.mode, 70 * kGiB, host_mode.mode, host_budget);
  EXPECT_FALSE(p.start_small);
  EXPECT_FALSE(p.release_between_phases);
  EXPECT_EQ(p.eval_batch_cap, 0);
  // The host side follows the host: a host budget of most of its RAM is low on host memory.
  EXPECT_EQ(host_mode.mode, Mode::low) << host_mode.reason;
  EXPECT_EQ(p.cache_bytes, 4u << 20);
  EXPECT_EQ(p.prefetch_batches, 1);
  // A small GPU, or one that others fill, still gets the careful modes.
  EXPECT_EQ(choose_device_mode(Mode::auto_, 4 * kGiB, 6 * kGiB, 6 * kGiB).mode, Mode::ultra_low);
  EXPECT_EQ(choose_device_mode(Mode::auto_, 40 * kGiB, 80 * kGiB, 30 * kGiB).mode, Mode::low);
  EXPECT_EQ(choose_device_mode(Mode::normal, 4 * kGiB, 6 * kGiB, 6 * kGiB).mode, Mode::normal);
}

TEST(DevicePolicy, TheHostBudgetIsForAcceleratorRuns) {
  auto r = tu::run_autotune({"train", "--model", "gpt-tiny", "--data", tu::corpus_path(),
                             "--device", "cpu", "--host-budget", "4G", "--steps", "1"});
  EXPECT_EQ(r.exit_code, 2) << r.err;
  EXPECT_NE(r.err.find("--host-budget is for accelerator runs"), std::string::npos) << r.err;
}

TEST(DevicePolicy, TheOomLadderStepsDownToTheDevicesLowPrecision) {
  Plan p;  // micro-batch 1, checkpointing already on: only the precision is left
  p.checkpointing = true;
  Plan next;
  ASSERT_TRUE(next_plan_after_oom(p, true, true, &next, Precision::fp16));
  EXPECT_EQ(next.precision, Precision::fp16);
  ASSERT_TRUE(next_plan_after_oom(p, true, true, &next, Precision::bf16));
  EXPECT_EQ(next.precision, Precision::bf16);
  EXPECT_FALSE(next_plan_after_oom(p, true, false, &next, Precision::fp16))
      << "a pinned precision is never changed";
}

// An old GPU (fp16 is its fast low precision), stood in for by AUTOTUNE_FAKE_LOW_PRECISION: the
// search considers fp16, not bf16, and an OOM with nothing else left recovers to fp16 with loss
// scaling, training to the end.
TEST(DevicePolicy, WhereBf16IsNotFastFp16IsTheLowPrecision) {
  setenv("AUTOTUNE_FAKE_LOW_PRECISION", "fp16", 1);
  EXPECT_EQ(low_precision_for(torch::kCPU), Precision::fp16);
  unsetenv("AUTOTUNE_FAKE_LOW_PRECISION");
  EXPECT_EQ(low_precision_for(torch::kCPU), Precision::bf16);

  const std::string dir = tu::temp_dir("fp16");
  const std::vector<std::string> env = {"AUTOTUNE_FAKE_LOW_PRECISION=fp16"};
  auto probe =
      tu::run_autotune({"probe", "--model", "gpt-tiny", "--data", tu::corpus_path(), "--budget",
                        "1G", "--global-batch", "8", "--profile-dir", dir, "--json"},
                       env);
  ASSERT_EQ(probe.exit_code, 0) << probe.err;
  const auto j = nlohmann::json::parse(probe.out);
  EXPECT_TRUE(j.at("precision_speed").contains("fp16")) << j.at("precision_speed");
  EXPECT_FALSE(j.at("precision_speed").contains("bf16")) << j.at("precision_speed");
  for (const auto& t : j.at("trials"))
    EXPECT_NE(t.at("plan").at("precision").get<std::string>(), "bf16");

  auto train =
      tu::run_autotune({"train", "--model", "gpt-tiny", "--data", tu::corpus_path(),
                        "--micro-batch", "1", "--global-batch", "1", "--checkpointing", "on",
                        "--steps", "3", "--eval-sequences", "0", "--json"},
                       {"AUTOTUNE_FAKE_LOW_PRECISION=fp16", "AUTOTUNE_INJECT_OOM=2:backward"});
  ASSERT_EQ(train.exit_code, 0) << train.err;
  const auto s = nlohmann::json::parse(train.out);
  EXPECT_EQ(s.at("plan").at("precision").get<std::string>(), "fp16");
  EXPECT_EQ(s.at("steps").get<int64_t>(), 3);
  EXPECT_EQ(s.at("oom_recoveries").get<int64_t>(), 1);
}
