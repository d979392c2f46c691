// Data parallel on c10d (TCPStore + Gloo), with real ranks: two processes of the real binary on
// loopback, started by `--nproc 2` or by torchrun.
#include <gtest/gtest.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <fcntl.h>
#include <chrono>
#include <filesystem>

#include <fstream>
#include <map>
#include <sstream>
#include <thread>

#include <nlohmann/json.hpp>

#include "autotune/distributed.h"
#include "autotune/gpt_workload.h"
#include "test_support.h"

namespace tu = autotune::testing;
using namespace autotune;

extern char** environ;

namespace {

nlohmann::json parse_json(const tu::ProcessResult& r) {
  EXPECT_EQ(r.exit_code, 0) << r.err;
  try {
    return nlohmann::json::parse(r.out);
  } catch (const std::exception& e) {
    ADD_FAILURE() << "no JSON on stdout: " << e.what() << "\n" << r.out << "\n" << r.err;
    return {};
  }
}

// A pinned plan: the probe is one trial, so the runs differ only in the world size.
// `dir`: a fresh directory for the run and its profiles.
std::vector<std::string> pinned_run(const std::string& dir, int64_t micro_batch, int nproc,
                                    int64_t steps = 6, const std::string& model = "gpt-tiny") {
  std::vector<std::string> a = {"run",
                                "--data",
                                tu::corpus_path(),
                                "--budget",
                                "2G",
                                "--model",
                                model,
                                "--global-batch",
                                "8",
                                "--micro-batch",
                                std::to_string(micro_batch),
                                "--precision",
                                "fp32",
                                "--checkpointing",
                                "off",
                                "--steps",
                                std::to_string(steps),
                                "--run-dir",
                                dir + "/run",
                                "--profile-dir",
                                dir + "/prof",
                                "--eval-sequences",
                                "8",
                                "--json"};
  if (nproc > 1) a.insert(a.end(), {"--nproc", std::to_string(nproc)});
  return a;
}

// The parameters of the newest checkpoint in run_dir, by name.
std::map<std::string, torch::Tensor> checkpoint_parameters(const std::string& run_dir,
                                                           const std::string& model = "gpt-tiny") {
  std::vector<std::string> files;
  for (const auto& e : std::filesystem::directory_iterator(run_dir + "/checkpoints"))
    if (e.path().extension() == ".pt") files.push_back(e.path().string());
  std::sort(files.begin(), files.end());
  EXPECT_FALSE(files.empty()) << "no checkpoint in " << run_dir;
  if (files.empty()) return {};
  GptWorkload w(load_gpt_config(model), TokenFile::open(tu::corpus_path()), 1);
  Plan p;
  auto model = w.build(p, torch::kCPU, 1);
  torch::serialize::InputArchive archive, model_archive;
  archive.load_from(files.back());
  archive.read("model", model_archive);
  model->load(model_archive);
  std::map<std::string, torch::Tensor> out;
  for (const auto& kv : model->named_parameters()) out[kv.key()] = kv.value().detach().clone();
  return out;
}

// Starts the real binary with `args` (args[0] is the program), stdout discarded and stderr into
// the file `err`, without waiting: for tests that signal the launcher. -1 when it cannot start.
pid_t start_with_stderr(std::vector<std::string> args, const std::string& err) {
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_addopen(&fa, 1, "/dev/null", O_WRONLY, 0);
  posix_spawn_file_actions_addopen(&fa, 2, err.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  pid_t pid = 0;
  const int rc = posix_spawn(&pid, AUTOTUNE_BIN, &fa, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&fa);
  return rc == 0 ? pid : -1;
}

}  // namespace

TEST(Distributed, TwoRanksAtMicroBatchBTrainAsOneRankAt2B) {
  // Global batch 8: one rank at micro-batch 8, or two at 4 each (samples 0-3 and 4-7 of every
  // step). Gradients averaged over the ranks equal the one big batch's up to float summation
  // order, so the parameters agree to fp32 rounding after 6 AdamW steps.
  const std::string one_dir = tu::temp_dir("dp-one"), two_dir = tu::temp_dir("dp-two");
  const auto one_args = pinned_run(one_dir, 8, 1);
  const auto two_args = pinned_run(two_dir, 4, 2);
  const nlohmann::json one = parse_json(tu::run_autotune(one_args));
  const nlohmann::json two = parse_json(tu::run_autotune(two_args));
  ASSERT_TRUE(two.contains("ranks")) << two.dump();
  EXPECT_EQ(two.at("world_size"), 2);
  EXPECT_EQ(two.at("effective_batch"), 8);
  EXPECT_EQ(one.at("effective_batch"), 8);
  ASSERT_EQ(two.at("ranks").size(), 2u);
  // Both ranks hold bit-identical parameters: same averaged gradients, same updates.
  EXPECT_EQ(two.at("ranks")[0].at("params_digest"), two.at("ranks")[1].at("params_digest"));
  EXPECT_EQ(two.at("ranks")[0].at("allreduce_calls"), 6);
  const auto a = checkpoint_parameters(one_dir + "/run");
  const auto b = checkpoint_parameters(two_dir + "/run");
  ASSERT_EQ(a.size(), b.size());
  ASSERT_FALSE(a.empty());
  double worst = 0;
  for (const auto& [name, t] : a) {
    ASSERT_TRUE(b.count(name)) << name;
    worst = std::max(worst, (t - b.at(name)).abs().max().item<double>());
  }
  std::printf("largest parameter difference, 1 rank x 8 vs 2 ranks x 4: %.3g\n", worst);
  EXPECT_LT(worst, 1e-4) << "the two runs trained different models";
  // The training moved the parameters far more than that (the comparison is not trivial).
  GptWorkload w(load_gpt_config("gpt-tiny"), TokenFile::open(tu::corpus_path()), 1);
  auto init = w.build(Plan{}, torch::kCPU, 1337);
  double moved = 0;
  for (const auto& kv : init->named_parameters())
    moved = std::max(moved, (kv.value() - a.at(kv.key())).abs().max().item<double>());
  EXPECT_GT(moved, 100 * worst);
}

TEST(Distributed, TheTunedPlanIsTheSameOnEveryRankAndFitsEach) {
  const std::string dir = tu::temp_dir("dp-tuned");
  // gpt-mini at 600M per rank (above the baseline of a CUDA build too), global batch 16; both
  // runs share the profile store.
  auto tuned_run = [&](const std::string& run_dir) {
    return parse_json(tu::run_autotune({"run",
                                        "--data",
                                        tu::corpus_path(),
                                        "--nproc",
                                        "2",
                                        "--budget",
                                        "600M",
                                        "--model",
                                        "gpt-mini",
                                        "--global-batch",
                                        "16",
                                        "--steps",
                                        "3",
                                        "--eval-sequences",
                                        "8",
                                        "--run-dir",
                                        dir + "/" + run_dir,
                                        "--profile-dir",
                                        dir + "/prof",
                                        "--json"}));
  };
  const nlohmann::json j = tuned_run("run");
  ASSERT_EQ(j.at("ranks").size(), 2u) << j.dump();
  const auto& r0 = j.at("ranks")[0];
  const auto& r1 = j.at("ranks")[1];
  EXPECT_EQ(r0.at("plan"), r1.at("plan"));
  EXPECT_EQ(r0.at("plan").at("micro_batch").get<int64_t>() *
                r0.at("plan").at("grad_accum").get<int64_t>(),
            8)
      << "each rank trains half of the global batch of 16";
  const uint64_t budget = j.at("budget_bytes");
  for (const auto& r : j.at("ranks")) {
    EXPECT_GT(r.at("verified_peak_bytes").get<uint64_t>(), 0u) << r.dump();
    EXPECT_LE(r.at("verified_peak_bytes").get<uint64_t>(), budget) << r.dump();
    EXPECT_LE(r.at("peak_budget_bytes").get<uint64_t>(), budget) << r.dump();
  }
  EXPECT_FALSE(j.at("trials").empty()) << "rank 0 probed";
  // The profile knows the world size; a second run reuses it on both ranks.
  const nlohmann::json again = tuned_run("run2");
  EXPECT_TRUE(again.at("reused_profile").get<bool>());
  EXPECT_EQ(again.at("ranks")[1].at("plan"), r0.at("plan"));
  const std::string profile = tu::read_file(j.at("profile").get<std::string>());
  EXPECT_EQ(nlohmann::json::parse(profile).at("fingerprint").at("world_size"), 2);
}

TEST(Distributed, AnOomOnOneRankIsRecoveredOnBothTheSameWay) {
  auto args = pinned_run(tu::temp_dir("dp-oom"), 4, 2);
  const nlohmann::json j = parse_json(
      tu::run_autotune(args, {"AUTOTUNE_INJECT_OOM=2:backward", "AUTOTUNE_INJECT_OOM_RANK=1"}));
  ASSERT_EQ(j.at("ranks").size(), 2u) << j.dump();
  for (const auto& r : j.at("ranks")) {
    EXPECT_EQ(r.at("oom_recoveries"), 1) << r.dump();
    EXPECT_EQ(r.at("plan").at("micro_batch"), 2) << "halved on both ranks: " << r.dump();
    EXPECT_EQ(r.at("plan").at("grad_accum"), 2) << r.dump();
  }
  EXPECT_EQ(j.at("ranks")[0].at("params_digest"), j.at("ranks")[1].at("params_digest"));
  EXPECT_EQ(j.at("steps"), 6) << "no step lost";
}

TEST(Distributed, AKilledRankStopsTheOthersWithOneLineNamingIt) {
  const std::string dir = tu::temp_dir("dp-kill");
  const std::string err = dir + "/stderr";
  const int timeout_s = 10;
  std::vector<std::string> args = {
      AUTOTUNE_BIN,     "run",         "--data",         tu::corpus_path(),
      "--nproc",        "2",           "--device",       "cpu",
      "--budget",       "2G",          "--model",        "gpt-tiny",
      "--global-batch", "8",           "--micro-batch",  "4",
      "--precision",    "fp32",        "--steps",        "100000",
      "--log-every",    "1",           "--run-dir",      dir + "/run",
      "--profile-dir",  dir + "/prof", "--dist-timeout", std::to_string(timeout_s)};
  const pid_t launcher = start_with_stderr(args, err);
  ASSERT_GT(launcher, 0);

  // Wait until the ranks train (rank 0 logs steps), then find rank 1 by its environment.
  const std::string steps = dir + "/run/steps.jsonl";
  for (int i = 0;
       i < 1200 && !(std::filesystem::exists(steps) && std::filesystem::file_size(steps) > 0); ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  ASSERT_TRUE(std::filesystem::exists(steps)) << tu::read_file(err);
  pid_t rank1 = 0;
  for (const auto& e : std::filesystem::directory_iterator("/proc")) {
    const std::string name = e.path().filename().string();
    if (name.find_first_not_of("0123456789") != std::string::npos) continue;
    std::ifstream stat(e.path() / "stat");
    std::string line;
    std::getline(stat, line);
    const auto close = line.rfind(')');
    if (close == std::string::npos) continue;
    std::istringstream rest(line.substr(close + 2));
    std::string state;
    pid_t ppid = 0;
    rest >> state >> ppid;
    if (ppid != launcher) continue;
    std::ifstream env(e.path() / "environ");
    std::string var;
    while (std::getline(env, var, '\0'))
      if (var == "RANK=1") rank1 = static_cast<pid_t>(std::stol(name));
  }
  ASSERT_GT(rank1, 0) << "rank 1 not found among the launcher's children";
  ASSERT_EQ(kill(rank1, SIGKILL), 0);
  const auto t0 = std::chrono::steady_clock::now();
  int status = 0;
  pid_t done = 0;
  // Bounded: the collective timeout, then the launcher's grace (SIGTERM, then SIGKILL).
  const auto bound = std::chrono::seconds(2 * timeout_s + 20);
  while ((done = waitpid(launcher, &status, WNOHANG)) == 0 &&
         std::chrono::steady_clock::now() - t0 < bound)
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  if (done == 0) {
    kill(launcher, SIGKILL);
    waitpid(launcher, &status, 0);
    FAIL() << "the launcher did not exit within " << bound.count() << " s of the kill (a hang)\n"
           << tu::read_file(err);
  }
  const double took = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("after the kill the launcher exited in %.1f s\n", took);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_NE(WEXITSTATUS(status), 0);
  const std::string text = tu::read_file(err);
  EXPECT_NE(text.find("rank 1 killed by signal 9"), std::string::npos) << text;
  EXPECT_NE(text.find("lost rank 1"), std::string::npos) << "rank 0 names the lost rank:\n" << text;
  // No progress lost: rank 0 saved the last completed step before it stopped.
  EXPECT_FALSE(tu::list_dir(dir + "/run/checkpoints").empty()) << text;
}

TEST(Distributed, TorchrunLaunchesRanksLikeNproc) {
  const std::string torchrun =
      std::filesystem::path(AUTOTUNE_PYTHON).parent_path().string() + "/torchrun";
  ASSERT_TRUE(std::filesystem::exists(torchrun))
      << torchrun << " is missing: scripts/setup makes the venv with torch";
  auto args = pinned_run(tu::temp_dir("dp-torchrun"), 4, 1);
  std::vector<std::string> cmd = {"--no-python", "--standalone", "--nproc-per-node", "2",
                                  AUTOTUNE_BIN};
  cmd.insert(cmd.end(), args.begin(), args.end());
  cmd.insert(cmd.end(), {"--device", "cpu"});
  const tu::ProcessResult r = tu::run_program(torchrun, cmd, {"OMP_NUM_THREADS=1"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  // torchrun passes both ranks' stdout through; rank 0 alone prints the JSON.
  const nlohmann::json j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j.at("world_size"), 2);
  EXPECT_EQ(j.at("effective_batch"), 8);
  const nlohmann::json nproc =
      parse_json(tu::run_autotune(pinned_run(tu::temp_dir("dp-two-ref"), 4, 2)));
  EXPECT_EQ(j.at("ranks")[0].at("params_digest"), j.at("ranks")[1].at("params_digest"));
  EXPECT_EQ(j.at("params_digest"), nproc.at("params_digest"))
      << "torchrun and --nproc 2 trained the same model";
}

TEST(Distributed, AStoppedRunResumesOnEveryRankExactly) {
  // SIGTERM to the launcher reaches both ranks; they agree to stop after the same step, rank 0
  // checkpoints, and `--resume auto` on both ranks continues to the same parameters as a run
  // that was never stopped (same --steps, so the same learning-rate schedule).
  const std::string dir = tu::temp_dir("dp-resume");
  auto args = [&](const std::string& run) {
    return std::vector<std::string>{"run",
                                    "--data",
                                    tu::corpus_path(),
                                    "--nproc",
                                    "2",
                                    "--budget",
                                    "2G",
                                    "--model",
                                    "gpt-mini",
                                    "--global-batch",
                                    "16",
                                    "--micro-batch",
                                    "4",
                                    "--precision",
                                    "fp32",
                                    "--checkpointing",
                                    "off",
                                    "--steps",
                                    "40",
                                    "--log-every",
                                    "1",
                                    "--eval-sequences",
                                    "8",
                                    "--run-dir",
                                    dir + "/" + run,
                                    "--profile-dir",
                                    dir + "/prof-" + run,
                                    "--json"};
  };
  const nlohmann::json full = parse_json(tu::run_autotune(args("full")));

  const pid_t launcher = tu::start_autotune(args("stopped"));
  const std::string steps = dir + "/stopped/steps.jsonl";
  for (int i = 0; i < 1200; ++i) {
    if (std::filesystem::exists(steps) &&
        tu::read_file(steps).find("\"step\":2,") != std::string::npos)
      break;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  ASSERT_EQ(kill(launcher, SIGTERM), 0);
  int status = 0;
  ASSERT_EQ(waitpid(launcher, &status, 0), launcher);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 143) << "stopped by SIGTERM after a checkpoint";
  ASSERT_FALSE(tu::list_dir(dir + "/stopped/checkpoints").empty());

  auto resume = args("stopped");
  resume.insert(resume.end(), {"--resume", "auto"});
  const nlohmann::json resumed = parse_json(tu::run_autotune(resume));
  EXPECT_GT(resumed.at("first_step").get<int64_t>(), 0) << "it resumed, not restarted";
  EXPECT_LT(resumed.at("first_step").get<int64_t>(), 40) << "the stop came before the end";
  EXPECT_EQ(resumed.at("steps"), 40);
  EXPECT_EQ(resumed.at("ranks")[0].at("params_digest"), resumed.at("ranks")[1].at("params_digest"));
  EXPECT_EQ(resumed.at("params_digest"), full.at("params_digest"))
      << "the resumed run trained a different model";
}

TEST(Distributed, SplitOptimizerStatesTrainTheSameParametersWithHalfTheStatesPerRank) {
  // ZeRO-1: each rank keeps and updates the AdamW states of its half of the parameters, then
  // broadcasts them. Same ranks, same samples, same plan otherwise as the unsplit run. gpt-mini:
  // its 6.6 MB of states make the saving (3.3 MB per rank) stand well above the few hundred KB
  // a tensor peak moves by between runs (the batch prefetch, Gloo's buffers).
  const std::string whole_dir = tu::temp_dir("dp-whole"), split_dir = tu::temp_dir("dp-split");
  auto split_args = pinned_run(split_dir, 4, 2, 6, "gpt-mini");
  split_args.insert(split_args.end(), {"--shard-optimizer", "on"});
  auto whole_args = pinned_run(whole_dir, 4, 2, 6, "gpt-mini");
  whole_args.insert(whole_args.end(), {"--shard-optimizer", "off"});
  const nlohmann::json whole = parse_json(tu::run_autotune(whole_args));
  const nlohmann::json split = parse_json(tu::run_autotune(split_args));
  ASSERT_EQ(split.at("ranks").size(), 2u) << split.dump();
  ASSERT_EQ(whole.at("ranks").size(), 2u) << whole.dump();
  EXPECT_EQ(split.at("plan").at("optimizer_shards"), 2);
  EXPECT_EQ(whole.at("plan").value("optimizer_shards", 1), 1);

  // The same parameters: AdamW is elementwise, and every rank clips with the same global norm.
  const auto a = checkpoint_parameters(whole_dir + "/run", "gpt-mini");
  const auto b = checkpoint_parameters(split_dir + "/run", "gpt-mini");
  ASSERT_EQ(a.size(), b.size());
  ASSERT_FALSE(a.empty());
  double worst = 0;
  for (const auto& [name, t] : a)
    worst = std::max(worst, (t - b.at(name)).abs().max().item<double>());
  std::printf("largest parameter difference, whole vs split states: %.3g\n", worst);
  EXPECT_LE(worst, 1e-6);
  EXPECT_EQ(split.at("ranks")[0].at("params_digest"), split.at("ranks")[1].at("params_digest"));

  // Half the states per rank, all of them between the ranks, and a tensor peak lower by that.
  const int64_t all_states = whole.at("ranks")[0].at("optimizer_state_bytes");
  int64_t sum = 0;
  for (int r = 0; r < 2; ++r) {
    const auto& w = whole.at("ranks")[r];
    const auto& s = split.at("ranks")[r];
    const int64_t mine = s.at("optimizer_state_bytes");
    sum += mine;
    std::printf("rank %d: states %lld of %lld bytes, tensor peak %lld vs %lld bytes\n", r,
                static_cast<long long>(mine), static_cast<long long>(all_states),
                static_cast<long long>(s.at("peak_tensor_bytes").get<int64_t>()),
                static_cast<long long>(w.at("peak_tensor_bytes").get<int64_t>()));
    EXPECT_EQ(w.at("optimizer_state_bytes"), all_states);
    EXPECT_GT(mine, 0.4 * static_cast<double>(all_states)) << s.dump();
    EXPECT_LT(mine, 0.6 * static_cast<double>(all_states)) << s.dump();
    EXPECT_LE(s.at("peak_tensor_bytes").get<int64_t>() + (all_states - mine) * 8 / 10,
              w.at("peak_tensor_bytes").get<int64_t>())
        << "the tensor peak did not drop by the states this rank no longer keeps";
    EXPECT_GT(s.at("broadcast_s").get<double>(), 0) << "the updated parameters were broadcast";
  }
  EXPECT_EQ(sum, all_states);
  EXPECT_TRUE(
      std::filesystem::exists(split_dir + "/run/checkpoints/optimizer_step_00000006.rank1.pt"))
      << "rank 1 keeps its share of the states beside rank 0's checkpoint";
}

TEST(Distributed, SplitOptimizerStatesResumeExactlyAndOnlyWithEveryShard) {
  // A 6-step run with checkpoints at steps 3 and 6. Removing step 6's rank-1 shard stands for a
  // run stopped between the shards and rank 0's file: resume must skip step 6 (its states are
  // not all there), continue from step 3, and end on the parameters of the run never stopped.
  const std::string dir = tu::temp_dir("dp-split-resume");
  auto args = pinned_run(dir, 4, 2);
  args.insert(args.end(), {"--shard-optimizer", "on", "--checkpoint-every", "3"});
  const nlohmann::json full = parse_json(tu::run_autotune(args));
  const std::string ck = dir + "/run/checkpoints/";
  ASSERT_TRUE(std::filesystem::exists(ck + "step_00000003.pt"));
  ASSERT_TRUE(std::filesystem::remove(ck + "optimizer_step_00000006.rank1.pt"));

  auto resume = args;
  resume.push_back("--resume");
  const tu::ProcessResult r = tu::run_autotune(resume);
  const nlohmann::json resumed = parse_json(r);
  EXPECT_EQ(resumed.at("first_step"), 3) << r.err;
  EXPECT_NE(r.err.find("lacks a rank's optimizer shard"), std::string::npos) << r.err;
  EXPECT_EQ(resumed.at("params_digest"), full.at("params_digest"))
      << "the resumed run trained a different model";

  // One process cannot resume states split over two ranks: one line naming the fix.
  auto alone = pinned_run(dir, 4, 1);
  alone.insert(alone.end(), {"--resume"});
  const tu::ProcessResult one = tu::run_autotune(alone);
  EXPECT_EQ(one.exit_code, 2) << one.err;
  EXPECT_NE(one.err.find("resume it with --nproc 2"), std::string::npos) << one.err;
}

TEST(Distributed, AllReducesOverlappedWithBackwardAverageTheSameGradients) {
  // gpt-mini's 3.3 MB of gradients make two buckets (the first of 1 MiB starts while backward
  // goes on). Micro-batch 2 x grad_accum 2: only the second backward's gradients are final, so
  // only it may start all-reduces. Overlapped or started after backward, the sums are the same.
  auto run = [&](const char* overlap, const std::vector<std::string>& env = {}) {
    std::vector<std::string> e = {std::string("AUTOTUNE_OVERLAP_ALLREDUCE=") + overlap};
    e.insert(e.end(), env.begin(), env.end());
    return parse_json(tu::run_autotune(
        pinned_run(tu::temp_dir(std::string("dp-overlap-") + overlap), 2, 2, 6, "gpt-mini"), e));
  };
  const nlohmann::json after = run("0"), during = run("1");
  ASSERT_EQ(during.at("ranks").size(), 2u) << during.dump();
  EXPECT_EQ(during.at("plan").at("grad_accum"), 2);
  EXPECT_EQ(during.at("ranks")[0].at("allreduce_calls"), 6);
  EXPECT_EQ(during.at("ranks")[0].at("params_digest"), during.at("ranks")[1].at("params_digest"));
  EXPECT_EQ(during.at("params_digest"), after.at("params_digest"))
      << "overlapping the all-reduces changed the averaged gradients";
  // An OOM on one rank before its last backward: it runs the step's all-reduces with zeros so
  // the other rank's overlapped ones complete, then both recover the same way.
  const nlohmann::json oom =
      run("1", {"AUTOTUNE_INJECT_OOM=2:backward", "AUTOTUNE_INJECT_OOM_RANK=1"});
  ASSERT_EQ(oom.at("ranks").size(), 2u) << oom.dump();
  for (const auto& r : oom.at("ranks")) {
    EXPECT_EQ(r.at("oom_recoveries"), 1) << r.dump();
    EXPECT_EQ(r.at("plan").at("micro_batch"), 1) << r.dump();
  }
  EXPECT_EQ(oom.at("ranks")[0].at("params_digest"), oom.at("ranks")[1].at("params_digest"));
  EXPECT_EQ(oom.at("steps"), 6);
}

TEST(Distributed, TheRankWithTheSmallestBudgetProbesForAll) {
  // Two ranks started by hand, as a cluster launcher does, whose devices differ: a budget of 4%
  // of 24 GiB on rank 0 and of 17 GiB on rank 1 (AUTOTUNE_FAKE_MEM_TOTAL stands in for the
  // device's size). Rank 1's budget is the smaller, so rank 1 probes, and the plan it finds is
  // verified on both and fits each rank's own budget.
  const std::string dir = tu::temp_dir("dp-unlike");
  const int port = free_loopback_port();
  const std::vector<std::string> args = {"run",
                                         "--data",
                                         tu::corpus_path(),
                                         "--budget",
                                         "4%",
                                         "--model",
                                         "gpt-mini",
                                         "--global-batch",
                                         "16",
                                         "--steps",
                                         "3",
                                         "--eval-sequences",
                                         "8",
                                         "--run-dir",
                                         dir + "/run",
                                         "--profile-dir",
                                         dir + "/prof",
                                         "--json"};
  auto env_of = [&](int rank, const char* total) {
    return std::vector<std::string>{"RANK=" + std::to_string(rank),
                                    "LOCAL_RANK=" + std::to_string(rank),
                                    "WORLD_SIZE=2",
                                    "MASTER_ADDR=127.0.0.1",
                                    "MASTER_PORT=" + std::to_string(port),
                                    "OMP_NUM_THREADS=1",
                                    std::string("AUTOTUNE_FAKE_MEM_TOTAL=") + total};
  };
  tu::ProcessResult r1;
  std::thread rank1([&] { r1 = tu::run_autotune(args, env_of(1, "17G")); });
  const tu::ProcessResult r0 = tu::run_autotune(args, env_of(0, "24G"));
  rank1.join();
  ASSERT_EQ(r1.exit_code, 0) << r1.err;
  const nlohmann::json j = parse_json(r0);
  ASSERT_EQ(j.at("ranks").size(), 2u) << j.dump();
  EXPECT_EQ(j.at("prober_rank"), 1) << r0.err;
  EXPECT_FALSE(j.at("trials").empty()) << "rank 1's trials reach rank 0's summary";
  const auto& a = j.at("ranks")[0];
  const auto& b = j.at("ranks")[1];
  EXPECT_LT(b.at("budget_bytes").get<uint64_t>(), a.at("budget_bytes").get<uint64_t>());
  EXPECT_EQ(a.at("plan"), b.at("plan"));
  for (const auto& r : j.at("ranks")) {
    EXPECT_LE(r.at("verified_peak_bytes").get<uint64_t>(), r.at("budget_bytes").get<uint64_t>())
        << r.dump();
    EXPECT_LE(r.at("peak_budget_bytes").get<uint64_t>(), r.at("budget_bytes").get<uint64_t>())
        << r.dump();
  }
  EXPECT_NE(j.at("profile").get<std::string>().find("/prof/"), std::string::npos);
  EXPECT_TRUE(std::filesystem::exists(j.at("profile").get<std::string>()))
      << "the prober saved its profile";
}

TEST(Distributed, TrainWithNprocTrainsLikeRunWithTheSamePlan) {
  // `train --nproc 2` and `torchrun ... autotune train` with the plan that `run --nproc 2`
  // pins: the same ranks, samples and plan, so the same parameters.
  const std::string dir = tu::temp_dir("dp-train");
  auto train_args = [&](const std::string& run) {
    return std::vector<std::string>{"train",       "--data",        tu::corpus_path(),
                                    "--model",     "gpt-tiny",      "--global-batch",
                                    "8",           "--micro-batch", "4",
                                    "--precision", "fp32",          "--checkpointing",
                                    "off",         "--steps",       "6",
                                    "--run-dir",   dir + "/" + run, "--eval-sequences",
                                    "8",           "--json"};
  };
  const nlohmann::json run = parse_json(tu::run_autotune(pinned_run(dir + "/run", 4, 2)));
  auto nproc_args = train_args("nproc");
  nproc_args.insert(nproc_args.end(), {"--nproc", "2"});
  const nlohmann::json train = parse_json(tu::run_autotune(nproc_args));
  EXPECT_EQ(train.at("world_size"), 2);
  EXPECT_EQ(train.at("effective_batch"), 8);
  EXPECT_EQ(train.at("plan").at("micro_batch"), 4);
  EXPECT_EQ(train.at("plan").at("grad_accum"), 1) << "one rank's share of the global batch";
  EXPECT_EQ(train.at("ranks")[0].at("params_digest"), train.at("ranks")[1].at("params_digest"));
  EXPECT_EQ(train.at("params_digest"), run.at("params_digest"))
      << "train --nproc 2 and run --nproc 2 trained the same plan to different parameters";

  const std::string torchrun =
      std::filesystem::path(AUTOTUNE_PYTHON).parent_path().string() + "/torchrun";
  std::vector<std::string> cmd = {"--no-python", "--standalone", "--nproc-per-node", "2",
                                  AUTOTUNE_BIN};
  const auto args = tu::on_cpu(train_args("torchrun"));
  cmd.insert(cmd.end(), args.begin(), args.end());
  const tu::ProcessResult r = tu::run_program(torchrun, cmd, {"OMP_NUM_THREADS=1"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(nlohmann::json::parse(r.out).at("params_digest"), run.at("params_digest"))
      << "torchrun ... autotune train trained another model";
}

TEST(Distributed, ARankThatCannotStartIsNamedWithItsErrorAndNothingIsLeftRunning) {
  try {
    launch_local_ranks(2, {"autotune", "run"}, std::chrono::seconds(1), "/nonexistent/autotune");
    FAIL() << "a rank that cannot start was not reported";
  } catch (const RuntimeError& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("cannot start rank 0 (/nonexistent/autotune)"), std::string::npos) << what;
    EXPECT_NE(what.find("No such file or directory"), std::string::npos) << what;
  }
  errno = 0;
  EXPECT_EQ(waitpid(-1, nullptr, WNOHANG), -1);
  EXPECT_EQ(errno, ECHILD) << "a child of the launcher is left";
}

TEST(Distributed, ASigintToTheLauncherIsAStopNotAFailure) {
  const std::string dir = tu::temp_dir("dp-sigint");
  const std::string err = dir + "/stderr";
  auto args = tu::on_cpu(pinned_run(dir, 4, 2, 100000));
  args.insert(args.begin(), AUTOTUNE_BIN);
  args.insert(args.end(), {"--log-every", "1"});
  const pid_t launcher = start_with_stderr(args, err);
  ASSERT_GT(launcher, 0);
  const std::string steps = dir + "/run/steps.jsonl";
  for (int i = 0; i < 1200 && !(std::filesystem::exists(steps) &&
                                tu::read_file(steps).find("\"step\":2,") != std::string::npos);
       ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  ASSERT_TRUE(std::filesystem::exists(steps)) << tu::read_file(err);
  ASSERT_EQ(kill(launcher, SIGINT), 0);
  int status = 0;
  pid_t done = 0;
  const auto t0 = std::chrono::steady_clock::now();
  while ((done = waitpid(launcher, &status, WNOHANG)) == 0 &&
         std::chrono::steady_clock::now() - t0 < std::chrono::seconds(60))
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  if (done == 0) {
    kill(launcher, SIGKILL);
    waitpid(launcher, &status, 0);
    FAIL() << "the launcher did not stop within 60 s of SIGINT\n" << tu::read_file(err);
  }
  const std::string text = tu::read_file(err);
  ASSERT_TRUE(WIFEXITED(status)) << text;
  EXPECT_EQ(WEXITSTATUS(status), 130) << text;
  EXPECT_NE(text.find("Interrupt received: stopping the ranks"), std::string::npos) << text;
  EXPECT_EQ(text.find("stopping the other ranks"), std::string::npos)
      << "a forwarded stop was reported as a rank's failure:\n"
      << text;
  EXPECT_FALSE(tu::list_dir(dir + "/run/checkpoints").empty()) << "the stop saved the last step";
  // No rank outlives the launcher.
  const std::string mark = "AUTOTUNE_LAUNCHER_PID=" + std::to_string(launcher);
  for (const auto& e : std::filesystem::directory_iterator("/proc")) {
    const std::string name = e.path().filename().string();
    if (name.find_first_not_of("0123456789") != std::string::npos) continue;
    std::ifstream env(e.path() / "environ");
    std::string var;
    while (std::getline(env, var, '\0')) EXPECT_NE(var, mark) << "rank " << name << " still runs";
  }
}
