// Script mode's test at a binding budget, shared by tests/test_script_mode.cpp (the CPU) and
// tests/test_cuda.cpp (a GPU, where scripts/gpu-check runs it).
#pragma once
#include <gtest/gtest.h>

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "test_support.h"

namespace autotune::testing {

// The command's full-batch fp32 peak is measured first (one pinned trial, no limit that binds);
// the budget is set below it. The run must take at least two trials, keep the global batch,
// write the profile, train within the budget, and the rerun must reuse the profile with 0 trials.
// The first run's summary and standard error go to *first_run and *first_err where given.
inline void tuned_at_a_binding_budget(const std::string& name,
                                      const std::vector<std::string>& command, int64_t global_batch,
                                      const std::string& device = "cpu",
                                      nlohmann::json* first_run = nullptr,
                                      std::string* first_err = nullptr) {
  const std::string store = temp_dir("script-" + name);
  const std::string batch = std::to_string(global_batch);
  const nlohmann::json full = json_summary(
      run_autotune(join({"probe", "--device", device, "--budget", "8G", "--global-batch", batch,
                         "--micro-batch", batch, "--precision", "fp32", "--checkpointing", "off",
                         "--profile-dir", store + "/full", "--json", "--"},
                        command)));
  ASSERT_FALSE(full.empty());
  ASSERT_EQ(full["plan"]["micro_batch"], global_batch) << full.dump();
  const uint64_t full_peak = full["verified_peak_bytes"].get<uint64_t>();
  ASSERT_GT(full_peak, 0u);
  const uint64_t budget = full_peak * 85 / 100;
  const std::vector<std::string> run =
      join({"run", "--device", device, "--budget", std::to_string(budget), "--global-batch", batch,
            "--profile-dir", store + "/tuned", "--json", "--"},
           command);
  const ProcessResult first = run_autotune(run);
  const nlohmann::json a = json_summary(first);
  ASSERT_FALSE(a.empty()) << first.err;
  if (first_run) *first_run = a;
  if (first_err) *first_err = first.err;
  EXPECT_GE(a["trials"].size(), 2u);
  const auto plan = a["plan"];
  EXPECT_EQ(plan["micro_batch"].get<int64_t>() * plan["grad_accum"].get<int64_t>(), global_batch);
  EXPECT_NE(plan, full["plan"]) << "the budget binds: the script's own plan does not fit";
  EXPECT_LE(a["peak_bytes"].get<uint64_t>(), budget) << "the full run passed the budget";
  EXPECT_GT(a["samples_per_s"].get<double>(), 0);
  EXPECT_TRUE(std::filesystem::exists(a["profile"].get<std::string>()));

  const nlohmann::json b = json_summary(run_autotune(run));
  EXPECT_TRUE(b.value("reused_profile", false));
  EXPECT_EQ(b["trials"].size(), 0u);
  EXPECT_EQ(b["plan"], plan);
  EXPECT_LE(b["peak_bytes"].get<uint64_t>(), budget);
}

}  // namespace autotune::testing
