// Inside a memory cgroup the kernel has the last word: a run that grows past the limit is killed
// (exit 137) with no chance to shrink. The test makes a cgroup of limit L (cgroup v1 or v2, where
// this process may), shows that the kernel kills an uncapped run in it (so the limit binds), and
// that `autotune --budget L` and `--budget 100%` (the cgroup limit) either train to the end or stop
// with one clear line: never killed.
#include <gtest/gtest.h>

#include <signal.h>

#include <sstream>

#include <nlohmann/json.hpp>

#include "test_support.h"

namespace tu = autotune::testing;

namespace {

constexpr uint64_t kMiB = uint64_t{1} << 20;

}  // namespace

// The issue's scenario: the 6-layer, d_model-384, seq-256 GPT with dropout 0.1 at global batch 16,
// in a container of 600 MiB.
TEST(Cgroup, TheKernelKillsAnUncappedRunAndNeverABudgetedOne) {
  AUTOTUNE_SKIP_UNDER_ASAN();
  constexpr uint64_t kLimit = 600 * kMiB;
  std::string why;
  auto cg = tu::MemoryCgroup::make(kLimit, &why);
  if (!cg) GTEST_SKIP() << "cannot make a memory cgroup here: " << why;

  const std::string dir = tu::temp_dir("cgroup");
  const std::string model = dir + "/gpt-6x384-dropout.json";
  tu::write_file(model, R"({"n_layer": 6, "n_head": 6, "d_model": 384, "seq_len": 256,
                           "vocab_size": 256, "dropout": 0.1})");
  const std::vector<std::string> common = {"--model",  model, "--data",         tu::corpus_path(),
                                           "--device", "cpu", "--global-batch", "16"};
  auto with = [&](std::vector<std::string> head, const std::vector<std::string>& tail) {
    head.insert(head.end(), common.begin(), common.end());
    head.insert(head.end(), tail.begin(), tail.end());
    return head;
  };

  // Without a budget, the whole batch at once needs more than the container has.
  const tu::ProcessResult uncapped = tu::run_autotune_in(
      *cg, with({"train"}, {"--micro-batch", "16", "--steps", "2", "--eval-sequences", "0"}));
  ASSERT_EQ(uncapped.exit_code, 128 + SIGKILL)
      << "the cgroup limit did not bind: exit " << uncapped.exit_code << "\n"
      << uncapped.err;

  for (const std::string budget : {"600M", "100%"}) {
    SCOPED_TRACE("--budget " + budget);
    const tu::ProcessResult o = tu::run_autotune_in(
        *cg, with({"--budget", budget}, {"--steps", "3", "--eval-sequences", "4", "--profile-dir",
                                         dir + "/profiles-" + budget, "--json"}));
    EXPECT_LT(o.exit_code, 128) << "killed by signal " << o.exit_code - 128 << "\n" << o.err;
    if (o.exit_code == 0) {
      const auto j = nlohmann::json::parse(o.out);
      EXPECT_EQ(j.at("steps").get<int64_t>(), 3);
      EXPECT_TRUE(j.at("within_budget").get<bool>());
      EXPECT_LE(j.at("budget_bytes").get<uint64_t>(), kLimit);
      std::printf("--budget %s: plan %s, peak %.1f MiB of %.1f MiB\n", budget.c_str(),
                  j.at("plan").dump().c_str(), j.at("memory").at("peak_bytes").get<double>() / kMiB,
                  j.at("budget_bytes").get<double>() / kMiB);
    } else {
      // Stopped: exit 1 with one line that names the budget that would fit.
      EXPECT_EQ(o.exit_code, 1) << o.err;
      EXPECT_NE(tu::last_line(o.err).find("--budget"), std::string::npos) << tu::last_line(o.err);
    }
  }
}
