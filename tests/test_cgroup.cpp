// Inside a memory cgroup the kernel has the last word: a run that grows past the limit is killed
// (exit 137) with no chance to shrink. The test makes a cgroup of limit L (cgroup v1 or v2, where
// this process may), shows that the kernel kills an uncapped run in it (so the limit binds), and
// that `autotune --budget L` and `--budget 100%` (the cgroup limit) either train to the end or stop
// with one clear line: never killed.
#include <gtest/gtest.h>

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <optional>
#include <sstream>

#include <nlohmann/json.hpp>

#include "test_support.h"

namespace tu = autotune::testing;
namespace fs = std::filesystem;

extern char** environ;

namespace {

constexpr uint64_t kMiB = uint64_t{1} << 20;

// The process's own cgroup directory for the memory controller, v1 or v2, if one is mounted.
struct CgroupRoot {
  fs::path dir;
  bool v2 = false;
};

std::optional<CgroupRoot> own_memory_cgroup() {
  std::ifstream f("/proc/self/cgroup");
  std::string line;
  std::optional<CgroupRoot> v2;
  while (std::getline(f, line)) {
    const auto c1 = line.find(':'), c2 = line.find(':', c1 + 1);
    if (c1 == std::string::npos || c2 == std::string::npos) continue;
    const std::string controllers = line.substr(c1 + 1, c2 - c1 - 1);
    std::string rel = line.substr(c2 + 1);
    while (!rel.empty() && rel.front() == '/') rel.erase(0, 1);
    if (("," + controllers + ",").find(",memory,") != std::string::npos &&
        fs::exists("/sys/fs/cgroup/memory/memory.limit_in_bytes"))
      return CgroupRoot{fs::path("/sys/fs/cgroup/memory") / rel, false};
    if (line.rfind("0::", 0) == 0) {
      for (const char* mount : {"/sys/fs/cgroup", "/sys/fs/cgroup/unified"})
        if (fs::exists(fs::path(mount) / "cgroup.controllers"))
          v2 = CgroupRoot{fs::path(mount) / rel, true};
    }
  }
  return v2;
}

bool write_text(const fs::path& p, const std::string& text) {
  std::ofstream f(p);
  f << text;
  f.flush();
  return static_cast<bool>(f);
}

// A child cgroup with a memory limit; removed at the end (its processes are gone by then).
class MemoryCgroup {
 public:
  static std::optional<MemoryCgroup> make(uint64_t limit_bytes, std::string* why) {
    const auto root = own_memory_cgroup();
    if (!root) {
      *why = "no memory cgroup controller is mounted (/proc/self/cgroup)";
      return std::nullopt;
    }
    MemoryCgroup cg;
    cg.v2_ = root->v2;
    cg.dir_ = root->dir / ("autotune-test-" + std::to_string(::getpid()));
    std::error_code ec;
    fs::create_directory(cg.dir_, ec);
    if (ec) {
      *why = "cannot create " + cg.dir_.string() + ": " + ec.message() +
             " (needs root and a writable cgroup hierarchy)";
      return std::nullopt;
    }
    const std::string limit = std::to_string(limit_bytes);
    const bool ok = cg.v2_ ? write_text(cg.dir_ / "memory.max", limit) &&
                                 (!fs::exists(cg.dir_ / "memory.swap.max") ||
                                  write_text(cg.dir_ / "memory.swap.max", "0"))
                           : write_text(cg.dir_ / "memory.limit_in_bytes", limit);
    if (!ok) {
      *why = "cannot set the memory limit of " + cg.dir_.string() +
             (cg.v2_ ? " (is the memory controller enabled in cgroup.subtree_control?)" : "");
      fs::remove(cg.dir_, ec);
      return std::nullopt;
    }
    return cg;
  }
  MemoryCgroup(MemoryCgroup&& o) noexcept : dir_(std::move(o.dir_)), v2_(o.v2_) { o.dir_.clear(); }
  ~MemoryCgroup() {
    std::error_code ec;
    if (!dir_.empty()) fs::remove(dir_, ec);
  }
  const fs::path& dir() const { return dir_; }
  fs::path procs() const { return dir_ / "cgroup.procs"; }

 private:
  MemoryCgroup() = default;
  fs::path dir_;
  bool v2_ = false;
};

struct Outcome {
  bool signalled = false;
  int signal = 0;
  int exit_code = -1;
  std::string out, err;
};

// Runs the real binary inside the cgroup: a shell joins it, then execs autotune.
Outcome run_in(const MemoryCgroup& cg, const std::vector<std::string>& args) {
  const std::string dir = tu::temp_dir("cgroup-run");
  const std::string out_path = dir + "/out", err_path = dir + "/err";
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_addopen(&fa, 1, out_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawn_file_actions_addopen(&fa, 2, err_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
  std::vector<std::string> argv_s = {"/bin/sh", "-c", "echo $$ > \"$0\" && exec \"$@\"",
                                     cg.procs().string(), AUTOTUNE_BIN};
  argv_s.insert(argv_s.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (auto& a : argv_s) argv.push_back(a.data());
  argv.push_back(nullptr);
  pid_t pid = 0;
  const int rc = posix_spawn(&pid, "/bin/sh", &fa, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&fa);
  Outcome o;
  if (rc != 0) {
    o.err = std::string("posix_spawn failed: ") + std::strerror(rc);
    return o;
  }
  int status = 0;
  waitpid(pid, &status, 0);
  o.signalled = WIFSIGNALED(status);
  o.signal = o.signalled ? WTERMSIG(status) : 0;
  o.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + o.signal;
  o.out = tu::read_file(out_path);
  o.err = tu::read_file(err_path);
  return o;
}

std::string last_line(const std::string& text) {
  std::istringstream in(text);
  std::string line, last;
  while (std::getline(in, line))
    if (!line.empty()) last = line;
  return last;
}

}  // namespace

// The issue's scenario: the 6-layer, d_model-384, seq-256 GPT with dropout 0.1 at global batch 16,
// in a container of 600 MiB.
TEST(Cgroup, TheKernelKillsAnUncappedRunAndNeverABudgetedOne) {
  AUTOTUNE_SKIP_UNDER_ASAN();
  constexpr uint64_t kLimit = 600 * kMiB;
  std::string why;
  auto cg = MemoryCgroup::make(kLimit, &why);
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
  const Outcome uncapped = run_in(
      *cg, with({"train"}, {"--micro-batch", "16", "--steps", "2", "--eval-sequences", "0"}));
  ASSERT_TRUE(uncapped.signalled && uncapped.signal == SIGKILL)
      << "the cgroup limit did not bind: exit " << uncapped.exit_code << "\n"
      << uncapped.err;

  for (const std::string budget : {"600M", "100%"}) {
    SCOPED_TRACE("--budget " + budget);
    const Outcome o = run_in(
        *cg, with({"--budget", budget}, {"--steps", "3", "--eval-sequences", "4", "--profile-dir",
                                         dir + "/profiles-" + budget, "--json"}));
    EXPECT_FALSE(o.signalled) << "killed by signal " << o.signal << "\n" << o.err;
    if (o.exit_code == 0) {
      const auto j = nlohmann::json::parse(o.out);
      EXPECT_EQ(j.at("steps").get<int64_t>(), 3);
      EXPECT_TRUE(j.at("within_budget").get<bool>());
      EXPECT_LE(j.at("budget_bytes").get<uint64_t>(), kLimit);
      std::printf("--budget %s: plan %s, peak %.1f MiB of %.1f MiB\n", budget.c_str(),
                  j.at("plan").dump().c_str(), j.at("memory").at("peak_bytes").get<double>() / kMiB,
                  j.at("budget_bytes").get<double>() / kMiB);
    } else {
      // Stopped: exit 1 with one line that names what would fit.
      EXPECT_EQ(o.exit_code, 1) << o.err;
      EXPECT_NE(last_line(o.err).find("try"), std::string::npos) << last_line(o.err);
    }
  }
}
