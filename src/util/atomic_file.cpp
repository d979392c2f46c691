#include "util/atomic_file.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <random>

#include <c10/util/Exception.h>

#include "autotune/errors.h"

namespace fs = std::filesystem;

namespace autotune {

namespace {
std::string temp_path_for(const std::string& path) {
  static thread_local std::mt19937_64 rng{std::random_device{}()};
  return path + ".tmp." + std::to_string(::getpid()) + "." + std::to_string(rng() % 1000000);
}

void fsync_path(const std::string& p, bool directory) {
  int fd = ::open(p.c_str(), directory ? (O_RDONLY | O_DIRECTORY) : O_RDONLY);
  if (fd < 0) throw RuntimeError("cannot open " + p + " to sync it: " + std::strerror(errno));
  int rc = ::fsync(fd);
  int err = errno;
  ::close(fd);
  // Some file systems refuse fsync on directories (EINVAL); the rename is still atomic there.
  if (rc != 0 && !(directory && err == EINVAL))
    throw RuntimeError("cannot sync " + p + ": " + std::strerror(err));
}

std::string parent_of(const std::string& path) {
  auto parent = fs::path(path).parent_path();
  return parent.empty() ? "." : parent.string();
}
}  // namespace

void atomic_write_with(const std::string& path,
                       const std::function<void(const std::string& tmp_path)>& write) {
  const std::string tmp = temp_path_for(path);
  try {
    write(tmp);
    fsync_path(tmp, false);
    if (::rename(tmp.c_str(), path.c_str()) != 0)
      throw RuntimeError("cannot rename " + tmp + " to " + path + ": " + std::strerror(errno));
  } catch (const RuntimeError&) {
    std::error_code ec;
    fs::remove(tmp, ec);
    throw;
  } catch (const UsageError&) {  // the writer found its input bad: nothing is written
    std::error_code ec;
    fs::remove(tmp, ec);
    throw;
  } catch (const c10::OutOfMemoryError&) {  // the caller may release memory and write again
    std::error_code ec;
    fs::remove(tmp, ec);
    throw;
  } catch (const std::exception& e) {
    std::error_code ec;
    fs::remove(tmp, ec);
    // One line: LibTorch's errors carry a backtrace after the first line.
    std::string what = e.what();
    throw RuntimeError("cannot write " + path + ": " + what.substr(0, what.find('\n')));
  }
  fsync_path(parent_of(path), true);
}

ssize_t pread_full(int fd, void* buf, size_t n, uint64_t offset) {
  size_t done = 0;
  while (done < n) {
    ssize_t r =
        ::pread(fd, static_cast<char*>(buf) + done, n - done, static_cast<off_t>(offset + done));
    if (r < 0) {
      if (errno == EINTR) continue;
      return -1;
    }
    if (r == 0) break;
    done += static_cast<size_t>(r);
  }
  return static_cast<ssize_t>(done);
}

std::string one_line(std::string s) {
  std::replace(s.begin(), s.end(), '\n', ' ');
  std::replace(s.begin(), s.end(), '\r', ' ');
  return s;
}

int write_all(int fd, const void* data, size_t n) {
  const char* p = static_cast<const char*>(data);
  for (size_t done = 0; done < n;) {
    const ssize_t w = ::write(fd, p + done, n - done);
    if (w < 0 && errno == EINTR) continue;
    if (w < 0) return errno;
    done += static_cast<size_t>(w);
  }
  return 0;
}

void atomic_write(const std::string& path, const std::string& bytes) {
  atomic_write_with(path, [&](const std::string& tmp) {
    int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd < 0)
      throw RuntimeError("cannot create " + tmp + ": " + std::strerror(errno) + "; check that " +
                         parent_of(path) + " exists and is writable");
    if (const int err = write_all(fd, bytes.data(), bytes.size()); err != 0) {
      ::close(fd);
      throw RuntimeError("cannot write " + path + ": " + std::strerror(err) +
                         (err == ENOSPC ? "; free disk space" : ""));
    }
    if (::close(fd) != 0) throw RuntimeError("cannot write " + path + ": " + std::strerror(errno));
  });
}

}  // namespace autotune
