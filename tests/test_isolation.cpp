// Probe truth: the figure a probe compares with the budget is the peak of a fresh training process
// of the plan, because every trial runs in one (isolated trials). Budgets here are derived from
// fresh `autotune train` runs measured in the test, never written as MiB figures.
#include <gtest/gtest.h>

#include <signal.h>

#include <cmath>
#include <regex>
#include <sstream>

#include <nlohmann/json.hpp>

#include "test_support.h"

namespace tu = autotune::testing;
using tu::join;

namespace {

constexpr double kMiB = 1048576.0;

// The peak of a fresh `autotune train` process of one plan (the budget figure, --json).
uint64_t fresh_train_peak(const std::vector<std::string>& model,
                          const std::vector<std::string>& plan) {
  const nlohmann::json j = tu::json_summary(tu::run_autotune(join(
      join(join({"train"}, model), plan), {"--steps", "3", "--eval-sequences", "8", "--json"})));
  return j.at("memory").at("peak_bytes").get<uint64_t>();
}

// A budget whose usable bytes (98% of it: the default margin) hold `peak` with 1% to spare for
// the movement of one plan's peak between fresh processes.
uint64_t budget_holding(uint64_t peak) {
  return static_cast<uint64_t>(std::ceil(static_cast<double>(peak) * 1.01 / 0.98));
}

// A budget that a fresh run of the smallest plan fits is accepted, trains within it, and the
// second run reuses the profile and trains within it too. Before isolated trials, the probing
// process's own warm-ups and earlier trials stood under every trial, and gpt-mini at such a
// budget was refused ("no plan fits") on every run.
void expect_accepted_and_reused(const std::vector<std::string>& model,
                                const std::vector<std::string>& smallest_plan,
                                const std::string& name) {
  const uint64_t peak = fresh_train_peak(model, smallest_plan);
  const uint64_t budget = budget_holding(peak);
  std::printf("%s: fresh train peak %.1f MiB -> --budget %.1f MiB\n", name.c_str(), peak / kMiB,
              budget / kMiB);
  const std::string store = tu::temp_dir("isolation-" + name);
  const std::vector<std::string> run =
      join(join({"--budget", std::to_string(budget)}, model),
           {"--steps", "3", "--eval-sequences", "8", "--profile-dir", store, "--json"});
  const tu::ProcessResult first = tu::run_autotune(run);
  ASSERT_EQ(first.exit_code, 0) << "a budget a fresh run fits was refused: "
                                << tu::last_line(first.err);
  const nlohmann::json a = nlohmann::json::parse(first.out);
  EXPECT_FALSE(a.at("reused_profile").get<bool>());
  EXPECT_TRUE(a.at("within_budget").get<bool>()) << a.at("memory").dump();
  EXPECT_GE(a.at("trial_processes").get<int>(), static_cast<int>(a.at("trials").size()));
  const tu::ProcessResult second = tu::run_autotune(run);
  ASSERT_EQ(second.exit_code, 0) << "the stored profile failed the rerun: "
                                 << tu::last_line(second.err);
  const nlohmann::json b = nlohmann::json::parse(second.out);
  EXPECT_TRUE(b.at("reused_profile").get<bool>()) << second.err;
  EXPECT_EQ(b.at("plan"), a.at("plan"));
  EXPECT_TRUE(b.at("within_budget").get<bool>()) << b.at("memory").dump();
  std::printf("%s: plan %s, peaks %.1f / %.1f MiB of %.1f MiB\n", name.c_str(),
              a.at("plan").dump().c_str(), a.at("memory").at("peak_bytes").get<double>() / kMiB,
              b.at("memory").at("peak_bytes").get<double>() / kMiB, budget / kMiB);
}

}  // namespace

TEST(Isolation, ABudgetAFreshRunFitsIsAcceptedAndReusedGpt) {
  AUTOTUNE_SKIP_UNDER_ASAN();
  expect_accepted_and_reused(
      {"--model", "gpt-mini", "--data", tu::corpus_path(), "--global-batch", "32"},
      {"--micro-batch", "1", "--checkpointing", "on", "--precision", "fp32"}, "gpt-mini");
}

TEST(Isolation, ABudgetAFreshRunFitsIsAcceptedAndReusedLstm) {
  AUTOTUNE_SKIP_UNDER_ASAN();
  expect_accepted_and_reused({"--model", "lstm-small", "--global-batch", "32"},
                             {"--micro-batch", "1", "--precision", "fp32"}, "lstm-small");
}

// A run that reuses (or probes to) an fp32 plan runs no low-precision region in its own process:
// the speed test and the low-precision trials live in trial processes.
TEST(Isolation, AnFp32RunEntersNoLowPrecisionRegion) {
  AUTOTUNE_SKIP_UNDER_ASAN();
  const std::string store = tu::temp_dir("isolation-fp32");
  const std::vector<std::string> model = {
      "--model", "gpt-tiny",         "--data", tu::corpus_path(), "--global-batch", "8", "--steps",
      "2",       "--eval-sequences", "4",      "--json"};
  // The counter counts: a bf16 run enters regions.
  const nlohmann::json bf16 =
      tu::json_summary(tu::run_autotune(join({"train", "--precision", "bf16"}, model)));
  EXPECT_GT(bf16.at("process").at("autocast_regions").get<int64_t>(), 0);
  // An fp32 profile, reused with --profile by a run that pins no precision.
  const nlohmann::json probe = tu::json_summary(tu::run_autotune(
      join({"probe", "--budget", "1G", "--precision", "fp32", "--profile-dir", store}, model)));
  const std::string profile = probe.at("profile").get<std::string>();
  const nlohmann::json reuse = tu::json_summary(tu::run_autotune(
      join({"--budget", "1G", "--profile", profile, "--profile-dir", store}, model)));
  EXPECT_TRUE(reuse.at("reused_profile").get<bool>());
  EXPECT_EQ(reuse.at("plan").at("precision"), "fp32");
  EXPECT_EQ(reuse.at("process").at("autocast_regions").get<int64_t>(), 0)
      << "the process that trains an fp32 plan ran low-precision steps";
  // A probe free to try bf16, then its training: the process enters regions only for a bf16 plan.
  const nlohmann::json free = tu::json_summary(tu::run_autotune(join(
      {"--budget", "1G", "--reprobe", "--profile-dir", tu::temp_dir("isolation-free")}, model)));
  const bool bf16_plan = free.at("plan").at("precision") != "fp32";
  bool bf16_trial = false;
  for (const auto& t : free.at("trials"))
    bf16_trial = bf16_trial || t.at("plan").at("precision") == "bf16";
  std::printf("unpinned: plan %s, a bf16 trial %d, autocast regions %lld\n",
              free.at("plan").dump().c_str(), bf16_trial,
              static_cast<long long>(free.at("process").at("autocast_regions").get<int64_t>()));
  EXPECT_EQ(free.at("process").at("autocast_regions").get<int64_t>() > 0, bf16_plan);
}

// When nothing fits, the line names the budget that would hold the smallest plan, measured in a
// fresh process with no cap; that budget then trains.
TEST(Isolation, NothingFitsNamesABudgetThatThenTrains) {
  AUTOTUNE_SKIP_UNDER_ASAN();
  const std::vector<std::string> model = {
      "--model", "gpt-mini", "--data", tu::corpus_path(),  "--global-batch",
      "32",      "--steps",  "2",      "--eval-sequences", "8"};
  // Half of what the smallest plan needs: below even the process before any tensor.
  const uint64_t smallest = fresh_train_peak(
      model, {"--micro-batch", "1", "--checkpointing", "on", "--precision", "fp32"});
  const std::string store = tu::temp_dir("isolation-infeasible");
  const tu::ProcessResult refused = tu::run_autotune(
      join({"--budget", std::to_string(smallest / 2), "--profile-dir", store}, model));
  ASSERT_EQ(refused.exit_code, 1) << refused.err;
  const std::string line = tu::last_line(refused.err);
  std::smatch m;
  ASSERT_TRUE(std::regex_search(line, m, std::regex("give --budget ([0-9]+)M or more"))) << line;
  EXPECT_NE(line.find("the smallest plan, micro_batch=1"), std::string::npos) << line;
  const uint64_t named = std::stoull(m[1]) << 20;
  std::printf("smallest fresh train peak %.1f MiB; the line: %s\n", smallest / kMiB, line.c_str());
  // It holds the smallest plan after the margin, and not far more than that.
  EXPECT_GE(named, smallest);
  EXPECT_LE(named, budget_holding(smallest) + (uint64_t{8} << 20));
  const nlohmann::json j = tu::json_summary(tu::run_autotune(
      join({"--budget", m[1].str() + "M", "--profile-dir", store, "--json"}, model)));
  EXPECT_TRUE(j.value("within_budget", false)) << j.dump();
}

// A trial that the kernel kills in its memory cgroup is refused with its reason, and the search
// goes on to a plan that fits. The cgroup here is the machine: a 600 MiB container with a budget
// above it, where the whole batch of the 6-layer GPT at once is killed (test_cgroup shows it).
TEST(Isolation, ATrialKilledInItsCgroupIsRefusedAndTheSearchGoesOn) {
  AUTOTUNE_SKIP_UNDER_ASAN();
  constexpr uint64_t kLimit = 600ull << 20;
  std::string why;
  auto cg = tu::MemoryCgroup::make(kLimit, &why);
  if (!cg) GTEST_SKIP() << "cannot make a memory cgroup here: " << why;
  const std::string dir = tu::temp_dir("isolation-killed");
  const std::string model = dir + "/gpt-6x384.json";
  tu::write_file(model, R"({"n_layer": 6, "n_head": 6, "d_model": 384, "seq_len": 256,
                           "vocab_size": 256, "dropout": 0.1})");
  const tu::ProcessResult r = tu::run_autotune_in(
      *cg, {"probe", "--budget", "4G", "--mode", "normal", "--model", model, "--data",
            tu::corpus_path(), "--global-batch", "16", "--eval-sequences", "4", "--profile-dir",
            dir + "/profiles", "--json"});
  ASSERT_EQ(r.exit_code, 0) << "the probe itself did not survive: " << tu::last_line(r.err);
  const nlohmann::json j = nlohmann::json::parse(r.out);
  int killed = 0;
  for (const auto& t : j.at("trials")) {
    std::printf("  %s: %s\n", t.at("plan").dump().c_str(),
                t.at("reason").get<std::string>().c_str());
    if (t.at("killed").get<bool>()) {
      ++killed;
      EXPECT_NE(t.at("reason").get<std::string>().find("Killed at"), std::string::npos) << t.dump();
      EXPECT_FALSE(t.at("fits").get<bool>());
    }
  }
  EXPECT_GE(killed, 1) << "no trial met the container's limit: " << j.at("trials").dump();
  bool chosen_fits = false;
  for (const auto& t : j.at("trials"))
    if (t.at("plan") == j.at("plan")) chosen_fits = t.at("fits").get<bool>();
  EXPECT_TRUE(chosen_fits) << j.at("plan").dump();
}
