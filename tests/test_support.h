// Shared helpers for the test executables: temp dirs, running the real autotune binary, the
// default corpus.
#pragma once
#include <signal.h>
#include <sys/resource.h>
#include <sys/types.h>

#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

// AddressSanitizer replaces glibc's allocator (quarantine, redzones, shadow memory), so resident
// memory no longer follows tensor bytes: tests of RSS behaviour, and budgets compared against
// RSS, skip themselves in scripts/sanitize builds.
#if defined(__SANITIZE_ADDRESS__)
#define AUTOTUNE_SKIP_UNDER_ASAN() GTEST_SKIP() << "RSS behaviour differs under AddressSanitizer"
#else
#define AUTOTUNE_SKIP_UNDER_ASAN() (void)0
#endif

namespace autotune::testing {

// A fresh directory under the build tree, removed at the end of the process.
std::string temp_dir(const std::string& name);

struct ProcessResult {
  int exit_code = -1;  // exit status, or 128+signal
  std::string out;     // stdout
  std::string err;     // stderr
};
// Runs the real autotune executable with `args` (no shell), capturing stdout and stderr. The
// tests' budgets are calibrated for the CPU: a training command (run, probe, train, estimate)
// without --device gets --device cpu, so the suite tests the same thing on a GPU host.
ProcessResult run_autotune(const std::vector<std::string>& args,
                           const std::vector<std::string>& env = {});

// Starts the real executable with `args` (output discarded) and returns its pid without waiting:
// for tests that signal or kill it. Pinned to the CPU as run_autotune.
pid_t start_autotune(const std::vector<std::string>& args);

// Runs any program (an absolute path) with `args`, capturing its output.
ProcessResult run_program(const std::string& program, const std::vector<std::string>& args,
                          const std::vector<std::string>& env = {});

// `args` with --device cpu added to a training command that names no device.
std::vector<std::string> on_cpu(const std::vector<std::string>& args);

// The default corpus token file prepared by scripts/setup (data/corpus.tok in the source tree);
// prepared on demand from the fortunes texts if missing.
std::string corpus_path();

// Runs the project's venv Python (AUTOTUNE_PYTHON) with `args`, capturing its output; throws
// std::runtime_error naming the fix when that Python is missing, so a test fails loudly.
ProcessResult run_python(const std::vector<std::string>& args);

// A memory cgroup (v1 or v2) under this process's own, with a limit; removed at the end (its
// processes are gone by then). Needs root and a writable hierarchy: make() says why not.
class MemoryCgroup {
 public:
  static std::optional<MemoryCgroup> make(uint64_t limit_bytes, std::string* why);
  MemoryCgroup(MemoryCgroup&& o) noexcept : dir_(std::move(o.dir_)), v2_(o.v2_) { o.dir_.clear(); }
  ~MemoryCgroup();
  const std::filesystem::path& dir() const { return dir_; }
  std::filesystem::path procs() const { return dir_ / "cgroup.procs"; }

 private:
  MemoryCgroup() = default;
  std::filesystem::path dir_;
  bool v2_ = false;
};

// Runs the real binary inside `cg` (a shell joins it, then execs autotune), pinned to the CPU as
// run_autotune; killed by signal S: exit_code 128 + S.
ProcessResult run_autotune_in(const MemoryCgroup& cg, const std::vector<std::string>& args);

// The last non-empty line of a process's output (the one line an error gives).
std::string last_line(const std::string& text);

// a then b.
std::vector<std::string> join(std::vector<std::string> a, const std::vector<std::string>& b);

// The --json summary of a run that must have succeeded (a failed expectation otherwise, and an
// empty object to go on with).
nlohmann::json json_summary(const ProcessResult& r);

// Writes bytes to a file (for fixtures).
void write_file(const std::string& path, const std::string& bytes);
std::string read_file(const std::string& path);
// File names in dir (not recursive), sorted.
std::vector<std::string> list_dir(const std::string& dir);

// Lowers the soft file-size limit (RLIMIT_FSIZE) for the scope, so writes past `bytes` fail
// with EFBIG the way they fail with ENOSPC on a full disk. With ignore_sigxfsz the process ignores
// SIGXFSZ meanwhile (in-process writers); without it, only children that ignore it themselves
// survive the limit (tests of the real binary, which inherits the limit).
class FileSizeLimit {
 public:
  explicit FileSizeLimit(rlim_t bytes, bool ignore_sigxfsz = true) {
    ::getrlimit(RLIMIT_FSIZE, &old_);
    if (ignore_sigxfsz) old_handler_ = ::signal(SIGXFSZ, SIG_IGN);
    restore_handler_ = ignore_sigxfsz;
    struct rlimit small = old_;
    small.rlim_cur = bytes;
    ok_ = ::setrlimit(RLIMIT_FSIZE, &small) == 0;
  }
  ~FileSizeLimit() {
    ::setrlimit(RLIMIT_FSIZE, &old_);
    if (restore_handler_) ::signal(SIGXFSZ, old_handler_);
  }
  FileSizeLimit(const FileSizeLimit&) = delete;
  FileSizeLimit& operator=(const FileSizeLimit&) = delete;
  bool ok() const { return ok_; }

 private:
  struct rlimit old_ {};
  sighandler_t old_handler_ = SIG_DFL;
  bool restore_handler_ = false;
  bool ok_ = false;
};

}  // namespace autotune::testing
