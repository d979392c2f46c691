// Resume: 2N steps straight == N steps, stop, resume N more (fp32, dropout on, same seed).
#include <gtest/gtest.h>

#include <filesystem>
#include <set>
#include <sstream>

#include <nlohmann/json.hpp>

#include "autotune/checkpoint.h"
#include "autotune/errors.h"
#include "autotune/gpt_workload.h"
#include "autotune/trainer.h"
#include "test_support.h"

namespace tu = autotune::testing;

using namespace autotune;

namespace {
std::vector<torch::Tensor> params_of(Workload& w, const Plan& p, const std::string& ckpt) {
  auto model = w.build(p, torch::kCPU, 4242);  // different init: everything comes from the file
  torch::serialize::InputArchive archive, model_archive;
  archive.load_from(ckpt);
  archive.read("model", model_archive);
  model->load(model_archive);
  std::vector<torch::Tensor> out;
  for (auto& t : model->parameters()) out.push_back(t.detach().clone());
  return out;
}
}  // namespace

TEST(Resume, StopAndResumeEqualsStraightRun) {
  GptConfig cfg = load_gpt_config("gpt-tiny");
  cfg.dropout = 0.1;
  GptWorkload w(cfg, TokenFile::open(tu::corpus_path()), 9);
  Plan p;
  p.micro_batch = 4;
  p.grad_accum = 2;
  TrainOptions opt;
  opt.eval_sequences = 0;

  opt.steps = 8;
  opt.run_dir = tu::temp_dir("straight");
  train(w, p, opt);

  // Same total schedule (steps = 8) but the process stops at 4: a stop signal after step 4.
  std::string split = tu::temp_dir("split");
  std::atomic<int> stop{0};
  struct StopAt : TrainObserver {
    std::atomic<int>* flag;
    void on_step(const StepStats& s) override {
      if (s.step == 4) flag->store(15);
    }
  } stopper;
  stopper.flag = &stop;
  opt.run_dir = split;
  opt.stop_signal = &stop;
  RunSummary first = train(w, p, opt, {&stopper});
  EXPECT_EQ(first.steps_done, 4);
  EXPECT_EQ(first.stop_signal, 15);
  ASSERT_EQ(list_checkpoints(split).size(), 1u);

  stop = 0;
  opt.resume = true;
  RunSummary second = train(w, p, opt);
  EXPECT_EQ(second.first_step, 4);
  EXPECT_EQ(second.steps_done, 8);

  auto a = params_of(w, p,
                     tu::temp_dir("unused") + "/../straight-" + std::to_string(::getpid()) +
                         "/checkpoints/step_00000008.pt");
  auto b = params_of(w, p, split + "/checkpoints/step_00000008.pt");
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) EXPECT_TRUE(torch::equal(a[i], b[i])) << "parameter " << i;
}

TEST(Resume, NoCheckpointIsAUsageError) {
  GptWorkload w(load_gpt_config("gpt-tiny"), TokenFile::open(tu::corpus_path()), 9);
  TrainOptions opt;
  opt.steps = 2;
  opt.resume = true;
  opt.run_dir = tu::temp_dir("empty-run");
  EXPECT_THROW(train(w, Plan{}, opt), UsageError);
}

namespace {
// A checkpoint file overwritten with garbage (a torn copy, a disk error).
void damage(const std::string& path) {
  tu::write_file(path, "not a checkpoint");
}
std::vector<std::string> tiny_run(const std::string& dir, int steps) {
  return {"train",
          "--model",
          "gpt-tiny",
          "--data",
          tu::corpus_path(),
          "--steps",
          std::to_string(steps),
          "--checkpoint-every",
          "2",
          "--run-dir",
          dir,
          "--global-batch",
          "4",
          "--micro-batch",
          "2",
          "--eval-sequences",
          "0",
          "--json"};
}
}  // namespace

// An unreadable newest checkpoint is named with its reason, and the run resumes from the one
// before it.
TEST(Resume, AnUnreadableCheckpointIsNamedAndTheOneBeforeIsUsed) {
  const std::string dir = tu::temp_dir("resume-damaged");
  ASSERT_EQ(tu::run_autotune(tiny_run(dir, 4)).exit_code, 0);
  damage(dir + "/checkpoints/step_00000004.pt");
  std::vector<std::string> again = tiny_run(dir, 6);
  again.push_back("--resume");
  const tu::ProcessResult r = tu::run_autotune(again);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.err.find("step_00000004.pt is unreadable"), std::string::npos) << r.err;
  EXPECT_EQ(nlohmann::json::parse(r.out).at("first_step").get<int64_t>(), 2);
}

// Checkpoints that exist but none of which can be read: --resume auto refuses with one line
// (starting fresh would silently lose the run).
TEST(Resume, ResumeAutoRefusesWhenNoCheckpointIsReadable) {
  const std::string dir = tu::temp_dir("resume-all-damaged");
  ASSERT_EQ(tu::run_autotune(tiny_run(dir, 4)).exit_code, 0);
  for (const auto& f : list_checkpoints(dir)) damage(f);
  std::vector<std::string> again = tiny_run(dir, 6);
  again.insert(again.end(), {"--resume", "auto"});
  const tu::ProcessResult r = tu::run_autotune(again);
  EXPECT_EQ(r.exit_code, 2) << r.err;
  EXPECT_NE(tu::last_line(r.err).find("is readable"), std::string::npos) << r.err;
  EXPECT_NE(tu::last_line(r.err).find("move them away to start fresh"), std::string::npos);
  EXPECT_EQ(r.err.find('\n'), r.err.size() - 1) << "one line: " << r.err;
}

namespace {
// (step, phase) of every record of a memory timeline, or the step of every step-log record.
std::multiset<std::string> keys_of(const std::string& path) {
  std::multiset<std::string> keys;
  std::istringstream in(tu::read_file(path));
  std::string line;
  while (std::getline(in, line)) {
    const auto j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded()) continue;
    keys.insert(std::to_string(j.value("step", int64_t{-1})) + " " +
                j.value("phase", std::string("-")));
  }
  return keys;
}
}  // namespace

// A run killed after step 5 but before its checkpoint resumes from step 4 and repeats step 5:
// its logs then hold each step once, as a straight run's do.
TEST(Resume, TheLogsHoldEachStepOnceAfterAResume) {
  const std::string straight = tu::temp_dir("logs-straight"),
                    resumed = tu::temp_dir("logs-resumed");
  auto with_logs = [](std::vector<std::string> a) {
    a.insert(a.end(), {"--log-every", "1"});
    return a;
  };
  ASSERT_EQ(tu::run_autotune(with_logs(tiny_run(straight, 6))).exit_code, 0);
  ASSERT_EQ(tu::run_autotune(with_logs(tiny_run(resumed, 5))).exit_code, 0);
  std::filesystem::remove(resumed + "/checkpoints/step_00000005.pt");  // killed before it
  std::vector<std::string> again = with_logs(tiny_run(resumed, 6));
  again.push_back("--resume");
  const tu::ProcessResult r = tu::run_autotune(again);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  ASSERT_EQ(nlohmann::json::parse(r.out).at("first_step").get<int64_t>(), 4);
  EXPECT_EQ(keys_of(resumed + "/steps.jsonl"), keys_of(straight + "/steps.jsonl"));
  EXPECT_EQ(keys_of(resumed + "/memory.jsonl"), keys_of(straight + "/memory.jsonl"));
  EXPECT_EQ(keys_of(resumed + "/steps.jsonl").size(), 6u);
}
