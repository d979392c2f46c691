#include "test_support.h"

#include <gtest/gtest.h>

#include <fcntl.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <sstream>
#include <stdexcept>

extern char** environ;

namespace fs = std::filesystem;

namespace autotune::testing {

std::string temp_dir(const std::string& name) {
  fs::path dir = fs::path(AUTOTUNE_TEST_TMP) / (name + "-" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir.string();
}

void write_file(const std::string& path, const std::string& bytes) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f << bytes;
  if (!f) throw std::runtime_error("cannot write " + path);
}

std::string read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

namespace {
// Starts `program` with `args` (argv[0] is the program), stdin from /dev/null and stdout/stderr
// to the given files, the environment plus `env`.
pid_t spawn(const std::string& program, const std::vector<std::string>& args,
            const std::vector<std::string>& env, const std::string& out_path,
            const std::string& err_path) {
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_addopen(&fa, 1, out_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawn_file_actions_addopen(&fa, 2, err_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
  std::vector<std::string> argv_s = {program};
  argv_s.insert(argv_s.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (auto& a : argv_s) argv.push_back(a.data());
  argv.push_back(nullptr);
  std::vector<std::string> env_s;
  for (char** e = environ; *e; ++e) env_s.emplace_back(*e);
  env_s.insert(env_s.end(), env.begin(), env.end());
  std::vector<char*> envp;
  for (auto& e : env_s) envp.push_back(e.data());
  envp.push_back(nullptr);
  pid_t pid = 0;
  int rc = posix_spawn(&pid, program.c_str(), &fa, nullptr, argv.data(), envp.data());
  posix_spawn_file_actions_destroy(&fa);
  if (rc != 0) throw std::runtime_error("cannot start " + program);
  return pid;
}

// Runs `program` to the end and collects its exit code and output.
ProcessResult run(const std::string& program, const std::vector<std::string>& args,
                  const std::vector<std::string>& env) {
  // One directory per call: tests may run two processes at once from two threads.
  static std::atomic<int> calls{0};
  std::string dir = temp_dir("proc" + std::to_string(calls++));
  std::string out_path = dir + "/out", err_path = dir + "/err";
  const pid_t pid = spawn(program, args, env, out_path, err_path);
  int status = 0;
  waitpid(pid, &status, 0);
  ProcessResult r;
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  r.out = read_file(out_path);
  r.err = read_file(err_path);
  fs::remove_all(dir);
  return r;
}
}  // namespace

std::vector<std::string> on_cpu(const std::vector<std::string>& args) {
  // Script mode: what follows `--` is the user's command, not autotune's flags.
  const auto ours_end = std::find(args.begin(), args.end(), "--");
  const bool named = std::find(args.begin(), ours_end, "--device") != ours_end;
  const bool training = args.empty() || args[0].rfind("--", 0) == 0 || args[0] == "run" ||
                        args[0] == "probe" || args[0] == "train" || args[0] == "estimate";
  std::vector<std::string> out(args.begin(), ours_end);
  if (training && !named) out.insert(out.end(), {"--device", "cpu"});
  out.insert(out.end(), ours_end, args.end());
  return out;
}

pid_t start_autotune(const std::vector<std::string>& args) {
  return spawn(AUTOTUNE_BIN, on_cpu(args), {}, "/dev/null", "/dev/null");
}

ProcessResult run_autotune(const std::vector<std::string>& args,
                           const std::vector<std::string>& env) {
  return run(AUTOTUNE_BIN, on_cpu(args), env);
}

ProcessResult run_program(const std::string& program, const std::vector<std::string>& args,
                          const std::vector<std::string>& env) {
  return run(program, args, env);
}

ProcessResult run_python(const std::vector<std::string>& args) {
  if (!fs::exists(AUTOTUNE_PYTHON))
    throw std::runtime_error(std::string("the fixtures need the project's Python ") +
                             AUTOTUNE_PYTHON + " with torch; run scripts/setup");
  return run(AUTOTUNE_PYTHON, args, {});
}

std::string corpus_path() {
  static std::once_flag once;
  static std::string path = std::string(AUTOTUNE_SOURCE_DIR) + "/data/corpus.tok";
  std::call_once(once, [] {
    if (fs::exists(path)) return;
    auto r =
        run_autotune({"prepare-data", "--input", "/usr/share/games/fortunes", "--output", path});
    if (r.exit_code != 0) throw std::runtime_error("cannot prepare the default corpus: " + r.err);
  });
  return path;
}

namespace {
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
}  // namespace

std::optional<MemoryCgroup> MemoryCgroup::make(uint64_t limit_bytes, std::string* why) {
  const auto root = own_memory_cgroup();
  if (!root) {
    *why = "no memory cgroup controller is mounted (/proc/self/cgroup)";
    return std::nullopt;
  }
  static std::atomic<int> made{0};
  MemoryCgroup cg;
  cg.v2_ = root->v2;
  cg.dir_ =
      root->dir / ("autotune-test-" + std::to_string(::getpid()) + "-" + std::to_string(made++));
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

MemoryCgroup::~MemoryCgroup() {
  std::error_code ec;
  if (!dir_.empty()) fs::remove(dir_, ec);
}

ProcessResult run_autotune_in(const MemoryCgroup& cg, const std::vector<std::string>& args) {
  std::vector<std::string> sh = {"-c", "echo $$ > \"$0\" && exec \"$@\"", cg.procs().string(),
                                 AUTOTUNE_BIN};
  const std::vector<std::string> pinned = on_cpu(args);
  sh.insert(sh.end(), pinned.begin(), pinned.end());
  return run("/bin/sh", sh, {});
}

std::vector<std::string> join(std::vector<std::string> a, const std::vector<std::string>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

nlohmann::json json_summary(const ProcessResult& r) {
  EXPECT_EQ(r.exit_code, 0) << r.err;
  if (r.exit_code != 0 || r.out.empty()) return nlohmann::json::object();
  return nlohmann::json::parse(r.out);
}

std::string last_line(const std::string& text) {
  std::istringstream in(text);
  std::string line, last;
  while (std::getline(in, line))
    if (!line.empty()) last = line;
  return last;
}

std::vector<std::string> list_dir(const std::string& dir) {
  std::vector<std::string> names;
  for (const auto& e : std::filesystem::directory_iterator(dir))
    names.push_back(e.path().filename().string());
  std::sort(names.begin(), names.end());
  return names;
}

}  // namespace autotune::testing
