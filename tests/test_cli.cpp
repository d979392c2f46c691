// The command line: bad flags and values give exit code 2 and one line naming the problem; the
// real binary trains and prints a JSON summary.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "test_support.h"

namespace tu = autotune::testing;

using tu::run_autotune;

namespace {
int count_lines(const std::string& s) {
  int n = 0;
  for (char c : s) n += c == '\n';
  return n;
}

void expect_usage_error(const std::vector<std::string>& args, const std::string& needle) {
  auto r = run_autotune(args);
  EXPECT_EQ(r.exit_code, 2) << r.err;
  EXPECT_EQ(count_lines(r.err), 1) << r.err;
  EXPECT_NE(r.err.find(needle), std::string::npos) << "expected '" << needle << "' in: " << r.err;
  EXPECT_TRUE(r.out.empty()) << r.out;
}
}  // namespace

TEST(Cli, UnknownFlag) {
  expect_usage_error({"train", "--bogus-flag", "3"}, "bogus-flag");
}

TEST(Cli, MalformedValue) {
  expect_usage_error({"train", "--steps", "many"}, "steps");
  expect_usage_error({"train", "--precision", "fp8"}, "fp8");
  expect_usage_error({"train", "--checkpointing", "maybe"}, "maybe");
  expect_usage_error({"train", "--steps", "0"}, "--steps");
}

TEST(Cli, MissingDataFile) {
  expect_usage_error({"train", "--data", "/nonexistent/corpus.tok"}, "/nonexistent/corpus.tok");
}

TEST(Cli, UnknownCommandAndModel) {
  expect_usage_error({"frobnicate"}, "frobnicate");
  expect_usage_error({"train", "--model", "gpt-huge", "--data", tu::corpus_path()}, "gpt-huge");
}

TEST(Cli, MicroBatchMustDivideGlobalBatch) {
  expect_usage_error(
      {"train", "--data", tu::corpus_path(), "--global-batch", "10", "--micro-batch", "4"},
      "not reachable");
}

TEST(Cli, TrainPrintsJsonSummary) {
  auto r =
      run_autotune({"train", "--model", "gpt-tiny", "--data", tu::corpus_path(), "--global-batch",
                    "8", "--micro-batch", "4", "--steps", "5", "--eval-sequences", "8", "--json"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  auto j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j.at("steps").get<int>(), 5);
  EXPECT_EQ(j.at("plan").at("micro_batch").get<int>(), 4);
  EXPECT_EQ(j.at("plan").at("grad_accum").get<int>(), 2);
  EXPECT_EQ(j.at("plan").at("precision").get<std::string>(), "fp32");
  EXPECT_GT(j.at("tokens_per_s").get<double>(), 0);
  EXPECT_TRUE(j.at("final_loss").is_number());
  EXPECT_TRUE(j.at("val_loss").is_number());
  EXPECT_GT(j.at("memory").at("peak_bytes").get<uint64_t>(), 0u);
  // Logs went to stderr: the settings table and the summary.
  EXPECT_NE(r.err.find("settings"), std::string::npos);
  EXPECT_NE(r.err.find("summary"), std::string::npos);
}
