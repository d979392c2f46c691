// What the parent of a child process needs from it: its output captured in a memfd, the last line
// of that output, and its memory as /proc shows it. Shared by the isolated trials (this binary as
// the child) and script mode (the user's command as the child).
#pragma once
#include <sys/types.h>

#include <cstdint>
#include <string>
#include <vector>

#include "util/c_strings.h"

namespace autotune {

// An anonymous in-memory file (close-on-exec) for a child's output; throws RuntimeError.
int make_memfd(const char* name);

// Everything a memfd holds, from its start. Only once its writers are gone: it moves the offset
// they share.
std::string drain_memfd(int fd);

// The last line of `text` that is not blank ("" when there is none).
std::string last_line(const std::string& text);

// Between fork and exec (async-signal-safe calls only), what both kinds of child do:
// - the kernel's OOM killer takes this process before the one that started it;
void child_oom_first();
// - joins the cgroup whose procs file is `procs_path` (null: none), so all it maps from exec on is
//   charged there; on failure says `what` on stderr and exits 126;
void child_join_cgroup(const char* procs_path, const char* what);
// - `fd` becomes descriptor `target` and stays open across exec;
void child_keep_fd(int fd, int target);
// - exec with no signal blocked (the parent may block some).
void child_unblock_signals();

// Resident bytes of a process (0 once it is gone).
uint64_t rss_of(pid_t pid);

// The processes of process group `pgid` (from /proc).
std::vector<pid_t> group_pids(pid_t pgid);
// Proportional set size of `pids` together (a process group's: group_pids): what they hold,
// each shared page counted once (forked workers share their parent's pages).
uint64_t pss_bytes(const std::vector<pid_t>& pids);

}  // namespace autotune
