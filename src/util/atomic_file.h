// Files that are either wholly old or wholly new: temp file in the same directory, fsync,
// rename, fsync of the directory. Used for token files, checkpoints and profiles. And the
// whole-buffer read and write every file reader and writer here shares.
#pragma once
#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>

namespace autotune {

// Throws RuntimeError naming the path and the cause (no space, permission, ...). On failure the
// temp file is removed and `path` is untouched.
void atomic_write(const std::string& path, const std::string& bytes);

// Writes all n bytes to fd, retrying short writes and EINTR. Returns 0, or the errno that stopped
// it (ENOSPC, EFBIG, EIO, ...).
int write_all(int fd, const void* data, size_t n);

// Reads up to `n` bytes at `offset`, retrying short reads and EINTR. Returns the bytes read
// (less than `n` only at end of file); -1 with errno set on error.
ssize_t pread_full(int fd, void* buf, size_t n, uint64_t offset);

// `s` with line breaks turned into spaces: a path or a name inside a one-line message must not
// split the line.
std::string one_line(std::string s);

// For writers that need a file name (torch archives): `write(tmp_path)` fills the temp file.
void atomic_write_with(const std::string& path,
                       const std::function<void(const std::string& tmp_path)>& write);

}  // namespace autotune
