#include "run/child_process.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "autotune/errors.h"
#include "autotune/memory.h"

namespace autotune {

int make_memfd(const char* name) {
  const int fd = ::memfd_create(name, MFD_CLOEXEC);
  if (fd < 0)
    throw RuntimeError(std::string("cannot create a child's output file (memfd_create): ") +
                       std::strerror(errno));
  return fd;
}

std::string drain_memfd(int fd) {
  std::string out;
  char buf[65536];
  ::lseek(fd, 0, SEEK_SET);
  for (;;) {
    const ssize_t n = ::read(fd, buf, sizeof buf);
    if (n > 0) {
      out.append(buf, static_cast<size_t>(n));
    } else if (n < 0 && errno == EINTR) {
      continue;
    } else {
      break;
    }
  }
  return out;
}

std::string last_line(const std::string& text) {
  std::istringstream in(text);
  std::string line, last;
  while (std::getline(in, line))
    if (line.find_first_not_of(" \t\r") != std::string::npos) last = line;
  return last;
}

void child_oom_first() {
  const int fd = ::open("/proc/self/oom_score_adj", O_WRONLY | O_CLOEXEC);
  if (fd < 0) return;
  if (::write(fd, "1000", 4) < 0) {
  }
  ::close(fd);
}

void child_join_cgroup(const char* procs_path, const char* what) {
  if (!procs_path) return;
  const int fd = ::open(procs_path, O_WRONLY | O_CLOEXEC);
  if (fd < 0 || ::write(fd, "0", 1) != 1) {
    if (::write(2, what, std::strlen(what)) < 0) {
    }
    ::_exit(126);
  }
  ::close(fd);
}

void child_keep_fd(int fd, int target) {
  if (fd == target)
    ::fcntl(target, F_SETFD, 0);
  else
    ::dup2(fd, target);  // dup2's copy has no close-on-exec
}

void child_unblock_signals() {
  sigset_t none;
  sigemptyset(&none);
  ::sigprocmask(SIG_SETMASK, &none, nullptr);
}

uint64_t rss_of(pid_t pid) {
  return read_process_memory("/proc/" + std::to_string(pid) + "/status").rss_bytes;
}

namespace {
// Field 5 of /proc/<pid>/stat (after the parenthesised name, which may hold spaces).
pid_t process_group_of(const std::string& pid) {
  std::ifstream f("/proc/" + pid + "/stat");
  std::string s((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  const auto close = s.rfind(')');
  if (close == std::string::npos) return -1;
  std::istringstream rest(s.substr(close + 2));
  std::string state;
  pid_t ppid = 0, pgrp = -1;
  rest >> state >> ppid >> pgrp;
  return pgrp;
}

uint64_t pss_of(const std::string& pid) {
  std::ifstream f("/proc/" + pid + "/smaps_rollup");
  std::string key;
  uint64_t kib = 0;
  while (f >> key) {
    if (key == "Pss:") {
      f >> kib;
      return kib * 1024;
    }
    f.ignore(1 << 20, '\n');
  }
  return 0;
}
}  // namespace

std::vector<pid_t> group_pids(pid_t pgid) {
  std::vector<pid_t> pids;
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator("/proc", ec)) {
    const std::string name = e.path().filename().string();
    if (name.empty() || name.find_first_not_of("0123456789") != std::string::npos) continue;
    if (process_group_of(name) == pgid) pids.push_back(static_cast<pid_t>(std::stol(name)));
  }
  return pids;
}

uint64_t pss_bytes(const std::vector<pid_t>& pids) {
  uint64_t total = 0;
  for (const pid_t pid : pids) total += pss_of(std::to_string(pid));
  return total;
}

}  // namespace autotune
