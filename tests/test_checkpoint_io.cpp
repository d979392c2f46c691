// Checkpoint writes that fail (disk full, file-size limit, unwritable directory): a clear error,
// the previous checkpoint intact, no temp file left. A file-size limit (RLIMIT_FSIZE) makes the
// write fail half-way with EFBIG exactly where a full disk fails with ENOSPC.
#include <gtest/gtest.h>

#include <filesystem>

#include "autotune/checkpoint.h"
#include "autotune/errors.h"
#include "autotune/gpt_workload.h"
#include "test_support.h"

namespace tu = autotune::testing;
namespace fs = std::filesystem;
using namespace autotune;

namespace {
// A gpt-tiny model and its optimizer: what a checkpoint holds.
struct TinyRun {
  GptWorkload w{load_gpt_config("gpt-tiny"), TokenFile::open(tu::corpus_path()), 3};
  Plan p = [] {
    Plan plan;
    plan.micro_batch = 2;
    return plan;
  }();
  std::shared_ptr<TrainableModel> model = w.build(p, torch::kCPU, 3);
  torch::optim::AdamW opt{model->parameters(), torch::optim::AdamWOptions(1e-3)};
  std::string save(const std::string& run_dir, int64_t step) {
    return save_checkpoint(run_dir, {step, p, 3, w.config()}, *model, opt, torch::ones({1}),
                           /*keep=*/3);
  }
};
}  // namespace

TEST(CheckpointIo, WriteFailureKeepsThePreviousCheckpointAndNoTempFile) {
  TinyRun t;
  const std::string run = tu::temp_dir("ckpt-io");
  const std::string first = t.save(run, 1);
  const std::string first_bytes = tu::read_file(first);
  ASSERT_GT(first_bytes.size(), 64u * 1024) << "the limit below must cut the write half-way";

  std::string what;
  bool runtime_error = false;
  {
    tu::FileSizeLimit limit(64 * 1024);
    ASSERT_TRUE(limit.ok());
    try {
      t.save(run, 2);
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

  EXPECT_EQ(tu::list_dir(checkpoint_dir(run)), std::vector<std::string>{"step_00000001.pt"})
      << "a partial checkpoint or temp file was left";
  EXPECT_EQ(tu::read_file(first), first_bytes) << "the previous checkpoint was changed";
  auto restored = t.w.build(t.p, torch::kCPU, 99);
  torch::optim::AdamW opt2(restored->parameters(), torch::optim::AdamWOptions(1e-3));
  EXPECT_EQ(load_checkpoint(first, *restored, opt2, nullptr).step, 1);
}

TEST(CheckpointIo, UnwritableRunDirIsAClearError) {
  TinyRun t;
  // root ignores directory permissions; a path under a regular file is unwritable for everyone.
  const std::string dir = tu::temp_dir("ckpt-unwritable");
  tu::write_file(dir + "/file", "x");
  try {
    t.save(dir + "/file/run", 1);
    FAIL() << "saving under a regular file must fail";
  } catch (const RuntimeError& e) {
    EXPECT_NE(std::string(e.what()).find("writable --run-dir"), std::string::npos) << e.what();
  }
}

// The real binary under a file-size limit: it must not die of SIGXFSZ; it stops with one clear
// line and exit 1, and leaves no temp file.
TEST(CheckpointIo, TrainUnderAFileSizeLimitStopsWithAClearError) {
  const std::string run = tu::temp_dir("ckpt-io-cli");
  tu::ProcessResult r;
  {
    // Inherited by the child with SIGXFSZ at its default (the binary must ignore it itself); the
    // test process writes nothing large meanwhile.
    tu::FileSizeLimit limit(64 * 1024, /*ignore_sigxfsz=*/false);
    ASSERT_TRUE(limit.ok());
    r = tu::run_autotune({"train", "--model", "gpt-tiny", "--data", tu::corpus_path(),
                          "--global-batch", "4", "--micro-batch", "4", "--steps", "3",
                          "--checkpoint-every", "1", "--eval-sequences", "0", "--run-dir", run});
  }

  EXPECT_EQ(r.exit_code, 1) << r.err;
  std::string last = r.err.substr(0, r.err.find_last_not_of('\n') + 1);
  last = last.substr(last.rfind('\n') + 1);
  EXPECT_NE(last.find("free disk space"), std::string::npos) << "last line: " << last;
  if (fs::exists(checkpoint_dir(run)))
    for (const auto& name : tu::list_dir(checkpoint_dir(run)))
      EXPECT_EQ(name.find(".tmp."), std::string::npos) << "temp file left: " << name;
}
