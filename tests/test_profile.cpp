// Profiles: reuse without probing, safe against corruption and concurrent writers, read-only
// stores, presets, and the automatic ultra-low-mem choice. These run the real binary.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <nlohmann/json.hpp>

#include "autotune/machine.h"
#include "autotune/profile.h"
#include "test_support.h"

namespace tu = autotune::testing;

namespace fs = std::filesystem;
using namespace autotune;
using tu::run_autotune;

namespace {
// A budget comfortably above this binary's baseline: the tuner has room, the run is quick.
std::vector<std::string> run_args(const std::string& store, const std::string& budget = "1G") {
  return {"probe",    "--model", "gpt-tiny",       "--data", tu::corpus_path(),
          "--budget", budget,    "--global-batch", "8",      "--profile-dir",
          store,      "--json"};
}

nlohmann::json probe(const std::vector<std::string>& args, int expect_exit = 0,
                     std::string* err = nullptr) {
  auto r = run_autotune(args);
  EXPECT_EQ(r.exit_code, expect_exit) << r.err;
  if (err) *err = r.err;
  if (r.exit_code != 0) return {};
  return nlohmann::json::parse(r.out);
}

std::string only_profile(const std::string& store) {
  std::vector<std::string> files;
  for (auto& e : fs::directory_iterator(store))
    if (e.path().extension() == ".json") files.push_back(e.path());
  EXPECT_EQ(files.size(), 1u);
  return files.empty() ? "" : files[0];
}
}  // namespace

TEST(Profile, SecondRunReusesWithZeroTrials) {
  const std::string store = tu::temp_dir("store-reuse");
  auto first = probe(run_args(store));
  ASSERT_FALSE(first.is_null());
  EXPECT_FALSE(first.at("reused_profile").get<bool>());
  EXPECT_GE(first.at("trials").size(), 1u);
  std::string err;
  auto second = probe(run_args(store), 0, &err);
  EXPECT_TRUE(second.at("reused_profile").get<bool>());
  EXPECT_EQ(second.at("trials").size(), 0u);
  EXPECT_EQ(second.at("plan"), first.at("plan"));
  EXPECT_NE(err.find("reusing profile"), std::string::npos);

  // A changed budget, model or global batch misses.
  for (auto change : std::vector<std::pair<std::string, std::string>>{
           {"--budget", "900M"}, {"--model", "gpt-mini"}, {"--global-batch", "16"}}) {
    auto args = run_args(store);
    for (size_t i = 0; i + 1 < args.size(); ++i)
      if (args[i] == change.first) args[i + 1] = change.second;
    auto j = probe(args);
    EXPECT_FALSE(j.at("reused_profile").get<bool>()) << change.first;
  }
}

TEST(Profile, CorruptProfilesAreReportedAndReprobed) {
  const std::string store = tu::temp_dir("store-corrupt");
  ASSERT_FALSE(probe(run_args(store)).is_null());
  const std::string path = only_profile(store);
  const std::string good = tu::read_file(path);
  auto j = nlohmann::json::parse(good);
  auto wrong_type = j;
  wrong_type["plan"]["micro_batch"] = "eight";
  auto newer = j;
  newer["schema"] = 99;
  auto no_fit = j;  // a plan far beyond the budget: verification fails
  no_fit["plan"]["micro_batch"] = 8;
  no_fit["plan"]["grad_accum"] = 1;
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"truncated", good.substr(0, good.size() / 2)},
      {"invalid JSON", "{not json"},
      {"wrong type", wrong_type.dump()},
      {"newer schema", newer.dump()},
  };
  for (const auto& [name, content] : cases) {
    tu::write_file(path, content);
    std::string err;
    auto out = probe(run_args(store), 0, &err);
    ASSERT_FALSE(out.is_null()) << name;
    EXPECT_FALSE(out.at("reused_profile").get<bool>()) << name;
    EXPECT_NE(err.find("re-probing"), std::string::npos) << name << ": " << err;
    // A valid new profile replaced it.
    EXPECT_NO_THROW(ProfileStore(store).load(path)) << name;
  }
  // A stored plan that no longer fits: a gpt-mini profile made at 1G, given with --profile at a
  // budget between micro-batch 1's measured peak and micro-batch 32's. Its two verification
  // steps fail, and the new probe picks a smaller micro-batch.
  auto mini = [&](const std::string& dir, const std::string& budget) {
    return std::vector<std::string>{"probe",
                                    "--model",
                                    "gpt-mini",
                                    "--data",
                                    tu::corpus_path(),
                                    "--budget",
                                    budget,
                                    "--global-batch",
                                    "32",
                                    "--precision",
                                    "fp32",
                                    "--profile-dir",
                                    dir,
                                    "--json"};
  };
  auto peak_of = [&](const std::string& mb) {
    auto args = mini(tu::temp_dir("store-peak-" + mb), "1G");
    args.insert(args.end(), {"--micro-batch", mb});
    return probe(args).at("trials").at(0).at("peak_bytes").get<uint64_t>();
  };
  const uint64_t peak1 = peak_of("1"), peak32 = peak_of("32");
  ASSERT_LT(peak1 + (32u << 20), peak32) << "micro-batch 32 must need clearly more than 1";
  const std::string mini_store = tu::temp_dir("store-mini");
  ASSERT_FALSE(probe(mini(mini_store, "1G")).is_null());
  const std::string mini_path = only_profile(mini_store);
  auto stored = nlohmann::json::parse(tu::read_file(mini_path));
  stored["plan"]["micro_batch"] = 32;
  stored["plan"]["grad_accum"] = 1;
  tu::write_file(mini_path, stored.dump());
  // usable = 98% of the budget (the default margin 2%) lies midway between the two peaks
  const uint64_t budget = (peak1 + peak32) / 2 * 100 / 98;
  auto args = mini(mini_store, std::to_string(budget));
  args.insert(args.end(), {"--profile", mini_path});
  std::string err;
  auto out = probe(args, 0, &err);
  ASSERT_FALSE(out.is_null()) << err;
  EXPECT_NE(err.find("no longer fits"), std::string::npos) << err;
  EXPECT_FALSE(out.at("reused_profile").get<bool>());
  EXPECT_GE(out.at("trials").size(), 1u);
  EXPECT_LT(out.at("plan").at("micro_batch").get<int64_t>(), 32);
}

TEST(Profile, ConcurrentWritersNeverTearTheFile) {
  const std::string dir = tu::temp_dir("store-race");
  ProfileStore store(dir);
  Profile a, b;
  a.fingerprint.model_name = "writer-a";
  a.fingerprint.global_batch = 8;
  a.plan.micro_batch = 8;
  a.trials.resize(200);  // a large file makes a torn write likely if writes were not atomic
  b = a;
  b.fingerprint.model_name = "writer-b";
  b.plan.micro_batch = 4;
  b.plan.grad_accum = 2;
  const std::string path = dir + "/race.json";
  for (int round = 0; round < 20; ++round) {
    pid_t pa = fork();
    if (pa == 0) {
      for (int i = 0; i < 5; ++i) store.save(a, path);
      _exit(0);
    }
    pid_t pb = fork();
    if (pb == 0) {
      for (int i = 0; i < 5; ++i) store.save(b, path);
      _exit(0);
    }
    int sa = 0, sb = 0;
    waitpid(pa, &sa, 0);
    waitpid(pb, &sb, 0);
    ASSERT_EQ(WEXITSTATUS(sa), 0);
    ASSERT_EQ(WEXITSTATUS(sb), 0);
    auto p = store.load(path);
    ASSERT_TRUE(p);
    const auto name = p->fingerprint.model_name;
    EXPECT_TRUE(name == "writer-a" || name == "writer-b");
    EXPECT_EQ(p->to_json(), (name == "writer-a" ? a : b).to_json());
  }
  // No temp files left behind.
  for (auto& e : fs::directory_iterator(dir))
    EXPECT_EQ(e.path().filename().string().find(".tmp."), std::string::npos) << e.path();
}

TEST(Profile, ReadOnlyStoreWarnsOrFails) {
  // Not a read-only directory (root ignores permission bits): a path under a regular file is
  // unwritable for everyone.
  const std::string base = tu::temp_dir("store-ro");
  tu::write_file(base + "/file", "x");
  const std::string store = base + "/file/profiles";  // cannot be created: parent is a file
  std::string err;
  auto out = probe(run_args(store), 0, &err);
  EXPECT_FALSE(out.is_null());
  EXPECT_NE(err.find("going on without saving"), std::string::npos) << err;
  auto args = run_args(store);
  args.push_back("--require-profile-save");
  auto r = run_autotune(args);
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("--require-profile-save"), std::string::npos) << r.err;
}

TEST(Mode, SmallMachineSelectsUltraLowAndSaysWhy) {
  MachineFacts small{8ull << 30, 6ull << 30, "test"};
  auto c = choose_mode(Mode::auto_, 10ull << 30, small);
  EXPECT_EQ(c.mode, Mode::ultra_low);
  EXPECT_NE(c.reason.find("ultra-low-mem"), std::string::npos);
  EXPECT_EQ(choose_mode(Mode::normal, 10ull << 30, small).mode, Mode::normal);
  MachineFacts big{64ull << 30, 60ull << 30, "test"};
  EXPECT_EQ(choose_mode(Mode::auto_, 10ull << 30, big).mode, Mode::normal);
  MachineFacts mid{32ull << 30, 20ull << 30, "test"};
  EXPECT_EQ(choose_mode(Mode::auto_, 10ull << 30, mid).mode, Mode::low);
  EXPECT_EQ(choose_mode(Mode::auto_, 10ull << 30, {32ull << 30, 11ull << 30, "t"}).mode,
            Mode::ultra_low);

  // Through the binary with substituted figures.
  const std::string store = tu::temp_dir("store-mode");
  auto r = run_autotune(run_args(store),
                        {"AUTOTUNE_FAKE_MEM_TOTAL=8G", "AUTOTUNE_FAKE_MEM_AVAILABLE=6G"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(nlohmann::json::parse(r.out).at("mode"), "ultra-low");
  EXPECT_NE(r.err.find("ultra-low-mem: a small machine"), std::string::npos) << r.err;
  auto args = run_args(store);
  args.insert(args.end(), {"--mode", "normal"});
  auto r2 = run_autotune(args, {"AUTOTUNE_FAKE_MEM_TOTAL=8G", "AUTOTUNE_FAKE_MEM_AVAILABLE=6G"});
  ASSERT_EQ(r2.exit_code, 0) << r2.err;
  EXPECT_EQ(nlohmann::json::parse(r2.out).at("mode"), "normal");
}
