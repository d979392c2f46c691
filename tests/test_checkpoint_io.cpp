// Checkpoint writes that fail (disk full, file-size limit, unwritable directory): a clear error,
// the previous checkpoint intact, no temp file left. A file-size limit (RLIMIT_FSIZE) makes the
// write fail half-way with EFBIG exactly where a full disk fails with ENOSPC.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/resource.h>

#include <filesystem>

#include "autotune/checkpoint.h"
#include "autotune/errors.h"
#include "autotune/gpt_workload.h"
#include "test_support.h"

namespace tu = autotune::testing;
namespace fs = std::filesystem;
using namespace autotune;

namespace {
std::vector<std::string> names_in(const std::string& dir) {
  std::vector<std::string> out;
  for (const auto& e : fs::directory_iterator(dir)) out.push_back(e.path().filename().string());
  std::sort(out.begin(), out.end());
  return out;
}

// Sets the soft file-size limit for the scope; SIGXFSZ ignored so writes fail with EFBIG.
class FileSizeLimit {
 public:
  explicit FileSizeLimit(rlim_t bytes) {
    ::getrlimit(RLIMIT_FSIZE, &old_);
    old_handler_ = ::signal(SIGXFSZ, SIG_IGN);
    struct rlimit small = old_;
    small.rlim_cur = bytes;
    ok_ = ::setrlimit(RLIMIT_FSIZE, &small) == 0;
  }
  ~FileSizeLimit() {
    ::setrlimit(RLIMIT_FSIZE, &old_);
    ::signal(SIGXFSZ, old_handler_);
  }
  bool ok() const { return ok_; }

 private:
  struct rlimit old_ {};
  sighandler_t old_handler_ = SIG_DFL;
  bool ok_ = false;
};
}  // namespace

TEST(CheckpointIo, WriteFailureKeepsThePreviousCheckpointAndNoTempFile) {
  GptWorkload w(load_gpt_config("gpt-tiny"), TokenFile::open(tu::corpus_path()), 3);
  Plan p;
  p.micro_batch = 2;
  auto model = w.build(p, torch::kCPU, 3);
  torch::optim::AdamW opt(model->parameters(), torch::optim::AdamWOptions(1e-3));
  const std::string run = tu::temp_dir("ckpt-io");
  const torch::Tensor scale = torch::ones({1});

  const std::string first =
      save_checkpoint(run, {1, p, 3, w.config()}, *model, opt, scale, /*keep=*/3);
  const std::string first_bytes = tu::read_file(first);
  ASSERT_GT(first_bytes.size(), 64u * 1024) << "the limit below must cut the write half-way";

  std::string what;
  bool runtime_error = false;
  {
    FileSizeLimit limit(64 * 1024);
    ASSERT_TRUE(limit.ok());
    try {
      save_checkpoint(run, {2, p, 3, w.config()}, *model, opt, scale, 3);
    } catch (const RuntimeError& e) {
      runtime_error = true;
      what = e.what();
    } catch (...) {
    }
  }
  EXPECT_TRUE(runtime_error) << "a failed checkpoint write must throw RuntimeError";
  EXPECT_EQ(what.find('\n'), std::string::npos) << "one line: " << what;
  EXPECT_NE(what.find("step_00000002.pt"), std::string::npos) << what;
  EXPECT_NE(what.find("free disk space"), std::string::npos) << "must name the fix: " << what;
  EXPECT_NE(what.find("intact"), std::string::npos) << what;

  EXPECT_EQ(names_in(checkpoint_dir(run)), std::vector<std::string>{"step_00000001.pt"})
      << "a partial checkpoint or temp file was left";
  EXPECT_EQ(tu::read_file(first), first_bytes) << "the previous checkpoint was changed";
  auto restored = w.build(p, torch::kCPU, 99);
  torch::optim::AdamW opt2(restored->parameters(), torch::optim::AdamWOptions(1e-3));
  EXPECT_EQ(load_checkpoint(first, *restored, opt2, nullptr).step, 1);
}

TEST(CheckpointIo, UnwritableRunDirIsAClearError) {
  GptWorkload w(load_gpt_config("gpt-tiny"), TokenFile::open(tu::corpus_path()), 3);
  Plan p;
  p.micro_batch = 2;
  auto model = w.build(p, torch::kCPU, 3);
  torch::optim::AdamW opt(model->parameters(), torch::optim::AdamWOptions(1e-3));
  // root ignores directory permissions; a path under a regular file is unwritable for everyone.
  const std::string dir = tu::temp_dir("ckpt-unwritable");
  tu::write_file(dir + "/file", "x");
  try {
    save_checkpoint(dir + "/file/run", {1, p, 3, w.config()}, *model, opt, torch::ones({1}), 3);
    FAIL() << "saving under a regular file must fail";
  } catch (const RuntimeError& e) {
    EXPECT_NE(std::string(e.what()).find("writable --run-dir"), std::string::npos) << e.what();
  }
}

// The real binary under a file-size limit: it must not die of SIGXFSZ; it stops with one clear
// line and exit 1, and leaves no temp file.
TEST(CheckpointIo, TrainUnderAFileSizeLimitStopsWithAClearError) {
  const std::string run = tu::temp_dir("ckpt-io-cli");
  struct rlimit old {};
  ::getrlimit(RLIMIT_FSIZE, &old);
  struct rlimit small = old;
  small.rlim_cur = 64 * 1024;  // inherited by the child; the test itself writes nothing large
  ASSERT_EQ(::setrlimit(RLIMIT_FSIZE, &small), 0);
  auto r = tu::run_autotune({"train", "--model", "gpt-tiny", "--data", tu::corpus_path(),
                             "--global-batch", "4", "--micro-batch", "4", "--steps", "3",
                             "--checkpoint-every", "1", "--eval-sequences", "0", "--run-dir", run});
  ::setrlimit(RLIMIT_FSIZE, &old);

  EXPECT_EQ(r.exit_code, 1) << r.err;
  std::string last = r.err.substr(0, r.err.find_last_not_of('\n') + 1);
  last = last.substr(last.rfind('\n') + 1);
  EXPECT_NE(last.find("free disk space"), std::string::npos) << "last line: " << last;
  if (fs::exists(checkpoint_dir(run)))
    for (const auto& name : names_in(checkpoint_dir(run)))
      EXPECT_EQ(name.find(".tmp."), std::string::npos) << "temp file left: " << name;
}
