// Per-phase peaks and the live monitor: the first optimizer step allocates the AdamW states (its
// peak is above step 2's), checkpointing lowers the backward peak, the monitor warns once when
// the budget figure crosses 90%, and the timeline file records every phase.
#include <gtest/gtest.h>

#include <spdlog/sinks/ostream_sink.h>
#include <spdlog/spdlog.h>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "autotune/gpt_workload.h"
#include "autotune/memory.h"
#include "autotune/trainer.h"
#include "test_support.h"
#include "train/memory_monitor.h"
#include "util/jsonl_log.h"

namespace tu = autotune::testing;
using namespace autotune;

namespace {
std::vector<PhasePeak> run_history(bool checkpointing, MemoryMeter& meter,
                                   MemoryMonitorOptions mo = {}) {
  GptWorkload w(load_gpt_config("gpt-tiny"), TokenFile::open(tu::corpus_path()), 1);
  Plan p;
  p.micro_batch = 16;
  p.checkpointing = checkpointing;
  TrainOptions opt;
  opt.steps = 2;
  opt.eval_sequences = 8;
  mo.keep_history = true;
  mo.every_steps = 0;
  MemoryMonitor monitor(meter, mo);
  train(w, p, opt, {&monitor});
  return monitor.history();
}

uint64_t tensor_peak(const std::vector<PhasePeak>& h, int64_t step, Phase phase) {
  uint64_t v = 0;
  for (const auto& p : h)
    if (p.step == step && p.phase == phase) v = std::max(v, p.tensor_bytes);
  return v;
}

// Bytes allocated during the phase on top of what existed when it began.
uint64_t tensor_growth(const std::vector<PhasePeak>& h, int64_t step, Phase phase) {
  uint64_t v = 0;
  for (const auto& p : h)
    if (p.step == step && p.phase == phase) v = std::max(v, p.tensor_growth_bytes);
  return v;
}
}  // namespace

TEST(PhasePeaks, FirstOptimizerStepCreatesAdamWState) {
  MemoryMeter meter(torch::kCPU);
  auto h = run_history(false, meter);
  // The absolute peaks of both optimizer phases hold params + grads + AdamW states; what differs
  // is what the phase itself allocates: the states, in step 1 only.
  const uint64_t opt1 = tensor_growth(h, 0, Phase::optimizer),
                 opt2 = tensor_growth(h, 1, Phase::optimizer);
  std::printf("optimizer phase allocation: step 1 %llu B, step 2 %llu B\n",
              static_cast<unsigned long long>(opt1), static_cast<unsigned long long>(opt2));
  EXPECT_GT(opt1, opt2);
  // The difference is at least the AdamW state: two fp32 copies of the ~0.12M parameters.
  EXPECT_GT(opt1 - opt2, 2 * 4 * 100000u);
  // Every phase was measured.
  for (Phase ph : {Phase::forward, Phase::backward, Phase::optimizer, Phase::eval})
    EXPECT_GT(tensor_peak(h, ph == Phase::eval ? 2 : 0, ph), 0u) << to_string(ph);
}

TEST(PhasePeaks, CheckpointingLowersTheBackwardPeak) {
  MemoryMeter meter(torch::kCPU);
  const uint64_t off = tensor_peak(run_history(false, meter), 1, Phase::backward);
  const uint64_t on = tensor_peak(run_history(true, meter), 1, Phase::backward);
  std::printf("backward peak: checkpointing off %llu B, on %llu B\n",
              static_cast<unsigned long long>(off), static_cast<unsigned long long>(on));
  EXPECT_LT(on, off);
}

TEST(Monitor, WarnsOnceAboveNinetyPercentAndWritesTheTimeline) {
  MemoryMeter meter(torch::kCPU);
  std::ostringstream log;
  auto sink = std::make_shared<spdlog::sinks::ostream_sink_mt>(log);
  auto previous = spdlog::default_logger();
  spdlog::set_default_logger(std::make_shared<spdlog::logger>("capture", sink));
  MemoryMonitorOptions mo;
  // A budget just above what the run needs: the figure crosses 90% but stays under it.
  auto probe = run_history(false, meter);
  uint64_t peak = 0;
  for (const auto& p : probe) peak = std::max(peak, p.budget_bytes);
  mo.budget_bytes = static_cast<uint64_t>(static_cast<double>(peak) / 0.95);
  mo.timeline_path = tu::temp_dir("timeline") + "/memory.jsonl";
  GptWorkload w(load_gpt_config("gpt-tiny"), TokenFile::open(tu::corpus_path()), 1);
  Plan p;
  p.micro_batch = 16;
  TrainOptions opt;
  opt.steps = 4;
  opt.eval_sequences = 8;
  {
    MemoryMonitor monitor(meter, mo);
    train(w, p, opt, {&monitor});
    EXPECT_TRUE(monitor.warned());
  }
  spdlog::set_default_logger(previous);
  const std::string text = log.str();
  size_t count = 0;
  for (size_t pos = text.find("may not fit"); pos != std::string::npos;
       pos = text.find("may not fit", pos + 1))
    ++count;
  EXPECT_EQ(count, 1u) << text;
  std::ifstream f(mo.timeline_path);
  std::string line;
  int rows = 0;
  while (std::getline(f, line)) {
    auto j = nlohmann::json::parse(line);
    EXPECT_TRUE(j.contains("phase") && j.contains("budget_bytes") && j.contains("rss_bytes"));
    ++rows;
  }
  EXPECT_EQ(rows, 4 * 3 + 1);  // forward, backward, optimizer per step, and the final eval
}

namespace {
std::vector<nlohmann::json> records_of(const std::string& path) {
  std::ifstream f(path);
  std::string line;
  std::vector<nlohmann::json> out;
  while (std::getline(f, line)) {
    auto j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (!j.is_discarded()) out.push_back(j);
  }
  return out;
}
}  // namespace

// A writer killed mid-line leaves a torn last line: the next writer's first record still gets a
// line of its own.
TEST(Logs, ATornLastLineCostsNoRecord) {
  const std::string path = tu::temp_dir("torn") + "/steps.jsonl";
  tu::write_file(path, "{\"step\": 1}\n{\"step\": 2, \"lo");
  {
    JsonlLog log(path);
    log.append({{"step", 3}});
    EXPECT_FALSE(log.failed());
  }
  const auto records = records_of(path);
  ASSERT_EQ(records.size(), 2u) << tu::read_file(path);
  EXPECT_EQ(records[0].at("step"), 1);
  EXPECT_EQ(records[1].at("step"), 3);
}

// A write that fails (here a file-size limit, as a full disk) is said once, the log stops, and
// the process goes on.
TEST(Logs, AWriteErrorIsSaidOnce) {
  const std::string path = tu::temp_dir("full") + "/memory.jsonl";
  std::ostringstream said;
  auto previous = spdlog::default_logger();
  spdlog::set_default_logger(std::make_shared<spdlog::logger>(
      "capture", std::make_shared<spdlog::sinks::ostream_sink_mt>(said)));
  {
    tu::FileSizeLimit limit(256);
    ASSERT_TRUE(limit.ok());
    JsonlLog log(path);
    for (int i = 0; i < 50; ++i) log.append({{"step", i}, {"phase", "forward"}, {"rss", 1 << 20}});
    EXPECT_TRUE(log.failed());
  }
  spdlog::set_default_logger(previous);
  const std::string text = said.str();
  EXPECT_NE(text.find("cannot write " + path), std::string::npos) << text;
  EXPECT_EQ(text.find("cannot write", text.find("cannot write") + 1), std::string::npos) << text;
}
