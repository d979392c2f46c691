// Shared helpers for the test executables: temp dirs, running the real autotune binary, the
// default corpus.
#pragma once
#include <string>
#include <vector>

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
// Runs the real autotune executable with `args` (no shell), capturing stdout and stderr.
ProcessResult run_autotune(const std::vector<std::string>& args,
                           const std::vector<std::string>& env = {});

// The default corpus token file prepared by scripts/setup (data/corpus.tok in the source tree);
// prepared on demand from the fortunes texts if missing.
std::string corpus_path();

// Writes bytes to a file (for fixtures).
void write_file(const std::string& path, const std::string& bytes);
std::string read_file(const std::string& path);

}  // namespace autotune::testing
