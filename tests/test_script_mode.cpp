// Script mode: `autotune [run|probe] --budget SIZE -- COMMAND` tunes a user's own Python training
// script through python/autotune. Real binary, real Python processes, real cgroups where the
// machine has them.
#include <gtest/gtest.h>

#include <sys/wait.h>

#include <chrono>
#include <csignal>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "script_mode_support.h"
#include "test_support.h"

namespace tu = autotune::testing;
using tu::join;
using tu::tuned_at_a_binding_budget;

namespace {

const std::string kExample =
    std::string(AUTOTUNE_SOURCE_DIR) + "/examples/scripts/lstm_regressor.py";
const std::string kHfExample =
    std::string(AUTOTUNE_SOURCE_DIR) + "/examples/scripts/hf_classifier.py";

// A small Python script in a temp dir; `body` runs after `import autotune`.
std::string script(const std::string& dir, const std::string& name, const std::string& body) {
  const std::string path = dir + "/" + name;
  tu::write_file(path, "import autotune\n" + body);
  return path;
}

}  // namespace

TEST(ScriptMode, ThePlainPyTorchExampleIsTunedAtABindingBudgetAndReused) {
  tuned_at_a_binding_budget(
      "lstm", {AUTOTUNE_PYTHON, kExample, "--seq-len", "200", "--hidden", "128", "--steps", "6"},
      64);
}

TEST(ScriptMode, TheHuggingFaceTrainerExampleIsTunedAtABindingBudgetAndReused) {
  tuned_at_a_binding_budget(
      "hf",
      {AUTOTUNE_PYTHON, kHfExample, "--seq-len", "128", "--layers", "2", "--hidden", "128",
       "--steps", "4", "--output-dir", tu::temp_dir("hf-out")},
      16);
}

// A trial whose memory grows past the budget is killed in its cgroup and refused with its
// reason; the search goes on to a plan that fits. The script holds 3 MiB x micro_batch^2,
// touched: growth a line through the small micro-batches underestimates, as attention's does.
TEST(ScriptMode, ATrialKilledInItsCgroupIsRefusedAndTheSearchGoesOn) {
  std::string why;
  if (!tu::MemoryCgroup::make(1 << 30, &why)) GTEST_SKIP() << "no memory cgroup here: " << why;
  const std::string dir = tu::temp_dir("script-killed");
  const std::string path = script(dir, "grow.py", R"(
p = autotune.plan(global_batch=32, micro_batch=32)
held = bytearray(p.micro_batch * p.micro_batch * 3 * 2**20)
for i in range(0, len(held), 4096):
    held[i] = 1
while True:
    autotune.step(samples=p.micro_batch * p.grad_accum)
)");
  const nlohmann::json j =
      tu::json_summary(tu::run_autotune({"probe", "--budget", "300M", "--profile-dir", dir + "/p",
                                         "--json", "--", AUTOTUNE_PYTHON, path}));
  ASSERT_FALSE(j.empty());
  bool killed = false;
  for (const auto& t : j["trials"])
    if (t.value("killed", false)) {
      killed = true;
      EXPECT_NE(t["reason"].get<std::string>().find("Killed at"), std::string::npos);
    }
  EXPECT_TRUE(killed) << j["trials"].dump();
  const auto plan = j["plan"];
  EXPECT_EQ(plan["micro_batch"].get<int64_t>() * plan["grad_accum"].get<int64_t>(), 32);
  EXPECT_LE(j["verified_peak_bytes"].get<uint64_t>(), 300ull << 20);
}

// DataLoader workers change no math, so memory lowers them before it lowers the plan: a script
// whose two workers each hold 120 MiB cannot fit 200 MiB at any micro-batch; with one it can.
TEST(ScriptMode, MemoryLowersTheDataLoaderWorkersTheScriptDeclared) {
  std::string why;
  if (!tu::MemoryCgroup::make(1 << 30, &why)) GTEST_SKIP() << "no memory cgroup here: " << why;
  const std::string dir = tu::temp_dir("script-workers");
  const std::string path = script(dir, "workers.py", R"(
import os, time
p = autotune.plan(global_batch=8, micro_batch=8, num_workers=2)
for _ in range(p.num_workers):  # what a DataLoader's workers hold: their own copies
    if os.fork() == 0:
        held = bytearray(120 * 2**20)
        for i in range(0, len(held), 4096):
            held[i] = 1
        time.sleep(600)
        os._exit(0)
time.sleep(1)
while True:
    autotune.step(samples=p.micro_batch * p.grad_accum)
)");
  const std::vector<std::string> probe = {"probe",    "--budget", "200M", "--profile-dir",
                                          dir + "/p", "--json",   "--",   AUTOTUNE_PYTHON,
                                          path};
  const tu::ProcessResult r = tu::run_autotune(probe);
  const nlohmann::json j = tu::json_summary(r);
  ASSERT_FALSE(j.empty());
  EXPECT_EQ(j["plan"].value("num_workers", -1), 1) << j["plan"].dump();
  EXPECT_NE(r.err.find("with 2 DataLoader worker(s): Killed at"), std::string::npos) << r.err;
  // The trial with more workers is in the profile's list, in the reason of the one that fitted.
  bool kept = false;
  for (const auto& t : j["trials"])
    kept |= t["reason"].get<std::string>().find("with 2 worker(s): Killed at") != std::string::npos;
  EXPECT_TRUE(kept) << j["trials"].dump();
  // The profile keeps the workers; the script run alone with it reads them.
  const tu::ProcessResult alone = tu::run_program(
      AUTOTUNE_PYTHON,
      {"-c", "import autotune; print(autotune.plan(global_batch=8, num_workers=2).num_workers)"},
      {"AUTOTUNE_PROFILE=" + j["profile"].get<std::string>(),
       "PYTHONPATH=" + std::string(AUTOTUNE_SOURCE_DIR) + "/python"});
  EXPECT_EQ(alone.out, "1\n") << alone.err;
}

// Where no cgroup can be made (here: switched off), the process tree's proportional set size is
// polled, and the "trials:" line says so. The script's forked worker holds 10 MiB x micro_batch,
// which each trial's figure must include (a figure of the script's process alone would not).
TEST(ScriptMode, WithoutACgroupTheProcessTreeIsPolledAndSaidSo) {
  const std::string dir = tu::temp_dir("script-polled");
  const std::string path = script(dir, "tree.py", R"(
import os, time
p = autotune.plan(global_batch=16, micro_batch=16)
if os.fork() == 0:  # a DataLoader worker's share of the data
    held = bytearray(p.micro_batch * 10 * 2**20)
    for i in range(0, len(held), 4096):
        held[i] = 1
    time.sleep(600)
    os._exit(0)
time.sleep(0.3)
for _ in range(8):
    time.sleep(0.1)
    autotune.step(samples=p.micro_batch * p.grad_accum)
)");
  const uint64_t budget = 120ull << 20;
  const tu::ProcessResult r =
      tu::run_autotune({"run", "--budget", std::to_string(budget), "--profile-dir", dir + "/p",
                        "--json", "--", AUTOTUNE_PYTHON, path},
                       {"AUTOTUNE_CGROUPS=off"});
  const nlohmann::json j = tu::json_summary(r);
  ASSERT_FALSE(j.empty()) << r.err;
  EXPECT_NE(r.err.find("no memory cgroup per run (AUTOTUNE_CGROUPS=off): the figure is the "
                       "process group's proportional set size, polled"),
            std::string::npos)
      << r.err;
  for (const auto& t : j["trials"]) {
    const int64_t mb = t["plan"]["micro_batch"].get<int64_t>();
    if (t.value("peak_bytes", uint64_t{0}) > 0)  // the worker's bytes are in the figure
      EXPECT_GT(t["peak_bytes"].get<uint64_t>(), static_cast<uint64_t>(mb) * (10ull << 20))
          << t.dump();
  }
  const auto plan = j["plan"];
  EXPECT_EQ(plan["micro_batch"].get<int64_t>() * plan["grad_accum"].get<int64_t>(), 16);
  EXPECT_LT(plan["micro_batch"].get<int64_t>(), 16) << "160 MiB in the worker alone at 16";
  EXPECT_GT(j["peak_bytes"].get<uint64_t>(), 0u);
  EXPECT_LE(j["peak_bytes"].get<uint64_t>(), budget);
}

// A stop (SIGTERM, Ctrl-C) during the full run reaches the script, which saves its work and
// leaves; autotune waits for it and stops with 128 + the signal. Trials are only killed.
TEST(ScriptMode, AStopReachesTheScriptInItsFullRunAndItSavesItsWork) {
  const std::string dir = tu::temp_dir("script-stop");
  const std::string path = script(dir, "stop.py", R"(
import os, signal, sys, time
p = autotune.plan(global_batch=4)
def save(signum, frame):
    open(")" + dir + R"(/saved", "w").write("step %d" % steps)
    sys.exit(0)
signal.signal(signal.SIGTERM, save)
steps = 0
if os.environ.get("AUTOTUNE_ROLE") == "run":
    open(")" + dir + R"(/running", "w").close()
while True:
    time.sleep(0.02)
    steps += 1
    autotune.step(samples=p.global_batch)
)");
  const pid_t pid = tu::start_autotune(
      {"run", "--budget", "1G", "--profile-dir", dir + "/p", "--", AUTOTUNE_PYTHON, path});
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
  while (!std::filesystem::exists(dir + "/running") && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  ASSERT_TRUE(std::filesystem::exists(dir + "/running"));
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  kill(pid, SIGTERM);
  int status = 0;
  waitpid(pid, &status, 0);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 143);
  EXPECT_NE(tu::read_file(dir + "/saved").find("step "), std::string::npos)
      << "the script never got the signal";
}

// Each bad script gets one line naming what is wrong, exit 1, and no profile.
TEST(ScriptMode, BadScriptsGetOneLineAndNoProfile) {
  const std::string dir = tu::temp_dir("script-bad");
  struct Case {
    const char* name;
    std::string body;
    std::vector<std::string> flags;
    const char* says;
  };
  const std::vector<Case> cases = {
      {"fails before plan",
       "raise SystemExit('cannot open data/train.csv')\n",
       {},
       "before calling autotune.plan(): cannot open data/train.csv"},
      {"fails before its first step",
       "p = autotune.plan(global_batch=8)\nimport sys\nprint('loading', file=sys.stderr)\n"
       "sys.exit(3)\n",
       {},
       "exited with code 3 before its first autotune.step(): loading"},
      {"never calls step",
       "p = autotune.plan(global_batch=8)\nimport time\ntime.sleep(600)\n",
       {"--step-timeout", "3"},
       "ran 3 s without calling autotune.step()"},
      {"ignores the plan",
       "p = autotune.plan(global_batch=8, micro_batch=8)\nwhile True:\n"
       "    autotune.step(samples=5)\n",
       {},
       "trained 5 samples in optimizer step 1 but its plan is micro_batch x grad_accum"},
      {"never calls plan", "print('training')\n", {}, "ended without calling autotune.plan()"},
  };
  int i = 0;
  for (const auto& c : cases) {
    const std::string path = script(dir, "bad" + std::to_string(i++) + ".py", c.body);
    const std::string store = dir + "/store" + std::to_string(i);
    const tu::ProcessResult r =
        tu::run_autotune(join(join({"run", "--budget", "1G", "--profile-dir", store}, c.flags),
                              {"--", AUTOTUNE_PYTHON, path}));
    EXPECT_EQ(r.exit_code, 1) << c.name << ": " << r.err;
    EXPECT_NE(tu::last_line(r.err).find(c.says), std::string::npos)
        << c.name << ": " << tu::last_line(r.err);
    EXPECT_FALSE(std::filesystem::exists(store) && !tu::list_dir(store).empty()) << c.name;
  }
}

// Flags of the built-in workloads are refused in script mode, by name, with exit 2.
TEST(ScriptMode, BuiltInWorkloadFlagsAreRefusedByName) {
  const tu::ProcessResult model = tu::run_autotune(
      {"run", "--budget", "1G", "--model", "gpt-mini", "--", AUTOTUNE_PYTHON, kExample});
  EXPECT_EQ(model.exit_code, 2);
  EXPECT_NE(tu::last_line(model.err).find("--model is the command's own business"),
            std::string::npos)
      << model.err;
  const tu::ProcessResult train = tu::run_autotune({"train", "--", AUTOTUNE_PYTHON, kExample});
  EXPECT_EQ(train.exit_code, 2);
  EXPECT_NE(tu::last_line(train.err).find("works with autotune run and probe"), std::string::npos)
      << train.err;
  const tu::ProcessResult nothing = tu::run_autotune({"run", "--budget", "1G", "--"});
  EXPECT_EQ(nothing.exit_code, 2);
  EXPECT_NE(tu::last_line(nothing.err).find("nothing after --"), std::string::npos) << nothing.err;
}
