#include "util/jsonl_log.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <sstream>

#include <spdlog/spdlog.h>

#include "autotune/errors.h"
#include "util/atomic_file.h"

namespace autotune {

JsonlLog::JsonlLog(const std::string& path) : path_(path) {
  open_for_append();
}

JsonlLog::~JsonlLog() {
  if (fd_ >= 0) ::close(fd_);
}

JsonlLog::JsonlLog(JsonlLog&& o) noexcept
    : path_(std::move(o.path_)), fd_(o.fd_), failed_(o.failed_) {
  o.fd_ = -1;
}

JsonlLog& JsonlLog::operator=(JsonlLog&& o) noexcept {
  if (this != &o) {
    if (fd_ >= 0) ::close(fd_);
    path_ = std::move(o.path_);
    fd_ = o.fd_;
    failed_ = o.failed_;
    o.fd_ = -1;
  }
  return *this;
}

void JsonlLog::open_for_append() {
  fd_ = ::open(path_.c_str(), O_RDWR | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  if (fd_ < 0) {
    spdlog::warn("cannot write {}: {}; going on without it", path_, std::strerror(errno));
    failed_ = true;
    return;
  }
  // A writer killed mid-line left a torn last line: end it, so the next record starts a line
  // of its own (readers skip the torn one).
  struct stat st {};
  char last = '\n';
  if (::fstat(fd_, &st) == 0 && st.st_size > 0 && ::pread(fd_, &last, 1, st.st_size - 1) == 1 &&
      last != '\n') {
    if (const int err = write_all(fd_, "\n", 1)) fail(err);
  }
}

void JsonlLog::fail(int err) {
  if (!failed_) spdlog::warn("cannot write {}: {}; going on without it", path_, std::strerror(err));
  failed_ = true;
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
}

void JsonlLog::append(const nlohmann::json& record) {
  if (fd_ < 0) return;
  const std::string line = record.dump() + "\n";
  if (const int err = write_all(fd_, line.data(), line.size())) fail(err);
}

void JsonlLog::drop_after_step(int64_t step) {
  if (fd_ < 0) return;
  struct stat st {};
  if (::fstat(fd_, &st) != 0) return;
  std::string text(static_cast<size_t>(st.st_size), '\0');
  const ssize_t got = pread_full(fd_, text.data(), text.size(), 0);
  text.resize(got > 0 ? static_cast<size_t>(got) : 0);
  std::istringstream in(text);
  std::string line, kept;
  bool dropped = false;
  while (std::getline(in, line)) {
    const auto j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded() || !j.is_object() || j.value("step", int64_t{0}) > step) {
      dropped = true;
      continue;
    }
    kept += line + "\n";
  }
  if (!dropped) return;
  try {
    atomic_write(path_, kept);
  } catch (const RuntimeError& e) {
    spdlog::warn("{}; the records of the repeated steps stay in {} twice", e.what(), path_);
    return;
  }
  ::close(fd_);  // the rename replaced the file this descriptor appends to
  fd_ = -1;
  open_for_append();
}

}  // namespace autotune
