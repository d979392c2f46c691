// Files that are either wholly old or wholly new: temp file in the same directory, fsync,
// rename, fsync of the directory. Used for token files, checkpoints and profiles.
#pragma once
#include <cstddef>
#include <functional>
#include <string>

namespace autotune {

// Throws RuntimeError naming the path and the cause (no space, permission, ...). On failure the
// temp file is removed and `path` is untouched.
void atomic_write(const std::string& path, const std::string& bytes);

// Writes all n bytes to fd, retrying short writes and EINTR. Returns 0, or the errno that stopped
// it (ENOSPC, EFBIG, EIO, ...).
int write_all(int fd, const void* data, size_t n);

// For writers that need a file name (torch archives): `write(tmp_path)` fills the temp file.
void atomic_write_with(const std::string& path,
                       const std::function<void(const std::string& tmp_path)>& write);

}  // namespace autotune
