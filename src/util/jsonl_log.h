// An append-only JSON-lines file that survives kills and resumes: run_dir/steps.jsonl and
// run_dir/memory.jsonl. Each record is one write(2) of a whole line to a file opened with
// O_APPEND; a torn last line that a killed writer left is ended before the next record, so the
// record after it is never lost; a resumed run drops the records past the step it resumed from
// (they are written again); a write error is said once and the run goes on without the log.
#pragma once
#include <cstdint>
#include <string>

#include <nlohmann/json.hpp>

namespace autotune {

class JsonlLog {
 public:
  JsonlLog() = default;  // closed: append does nothing
  // Opens `path` for appending (creating it). Cannot: one warning, and the log stays closed.
  explicit JsonlLog(const std::string& path);
  ~JsonlLog();
  JsonlLog(const JsonlLog&) = delete;
  JsonlLog& operator=(const JsonlLog&) = delete;
  JsonlLog(JsonlLog&& o) noexcept;
  JsonlLog& operator=(JsonlLog&& o) noexcept;

  bool is_open() const { return fd_ >= 0; }
  // True once a write failed (said once; nothing more is written).
  bool failed() const { return failed_; }
  void append(const nlohmann::json& record);
  // Keeps the records whose "step" is at most `step` (a resume from the checkpoint of `step`
  // repeats the steps after it) and drops torn lines; rewritten atomically.
  void drop_after_step(int64_t step);

 private:
  void open_for_append();
  void fail(int err);
  std::string path_;
  int fd_ = -1;
  bool failed_ = false;
};

}  // namespace autotune
