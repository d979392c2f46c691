#include "autotune/token_file.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <set>
#include <stdexcept>
#include <utility>

#include "autotune/errors.h"

namespace fs = std::filesystem;

namespace autotune {

// Tokens and header fields are stored in the host's byte order; every machine LibTorch targets
// here is little-endian, and a big-endian reader would silently read garbage.
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "token files are little-endian");

namespace {

constexpr size_t kBinarySniffBytes = 8192;   // a NUL in the first 8 KiB marks a binary file
constexpr size_t kReadChunkBytes = 1 << 20;  // prepare: 1 MiB of text in, 2 MiB of tokens out
// pread mode: tokens per positioned read. 32 KiB per thread, allocated once and reused, so a
// long run of random windows never grows the heap.
constexpr size_t kPreadChunkTokens = 16384;
const char* const kPrepareFix = "run `autotune prepare-data --input TEXT... --output FILE`";

std::string errno_text(int err) {
  return std::strerror(err);
}

// Paths go into one-line messages: a newline in a file name must not split the line.
std::string one_line(std::string s) {
  std::replace(s.begin(), s.end(), '\n', ' ');
  std::replace(s.begin(), s.end(), '\r', ' ');
  return s;
}

[[noreturn]] void refuse(const std::string& path, const std::string& problem) {
  throw UsageError("token file " + one_line(path) + ": " + problem + "; " + kPrepareFix);
}

// Closes a descriptor on scope exit unless released.
struct Fd {
  int fd = -1;
  explicit Fd(int f) : fd(f) {}
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  int release() { return std::exchange(fd, -1); }
};

// Reads up to `n` bytes at `offset`, retrying short reads and EINTR. Returns the bytes read
// (less than `n` only at end of file); -1 with errno set on error.
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

// Fills `buf` from the current position until full or end of file; -1 with errno on error.
ssize_t read_full(int fd, void* buf, size_t n) {
  size_t done = 0;
  while (done < n) {
    ssize_t r = ::read(fd, static_cast<char*>(buf) + done, n - done);
    if (r < 0) {
      if (errno == EINTR) continue;
      return -1;
    }
    if (r == 0) break;
    done += static_cast<size_t>(r);
  }
  return static_cast<ssize_t>(done);
}

void write_all(int fd, const void* buf, size_t n, const std::string& what) {
  const char* p = static_cast<const char*>(buf);
  while (n > 0) {
    ssize_t w = ::write(fd, p, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      throw RuntimeError("cannot write " + one_line(what) + ": " + errno_text(errno));
    }
    p += w;
    n -= static_cast<size_t>(w);
  }
}

// ---- prepare: input discovery --------------------------------------------------------------

struct FileId {
  dev_t dev;
  ino_t ino;
  bool operator<(const FileId& o) const { return dev != o.dev ? dev < o.dev : ino < o.ino; }
};

struct Candidate {
  fs::path path;
  FileId id;              // of the file the path finally names (symlinks resolved)
  bool via_link = false;  // the path itself is a symlink
};

// One input expanded into its regular files, sorted by path so the token stream does not depend
// on directory order. Directory symlinks inside a folder are not followed (no cycles); file
// symlinks are kept and resolved later against what was read.
std::vector<Candidate> expand_input(const std::string& input) {
  std::vector<Candidate> out;
  auto add = [&](const fs::path& p) {
    struct stat lst {
    }, st{};
    if (::lstat(p.c_str(), &lst) != 0) return;
    if (::stat(p.c_str(), &st) != 0) return;  // dangling symlink: nothing to read
    if (!S_ISREG(st.st_mode)) return;         // fifos, sockets, devices: not text files
    out.push_back({p, {st.st_dev, st.st_ino}, S_ISLNK(lst.st_mode)});
  };
  struct stat st {};
  if (::stat(input.c_str(), &st) != 0) {
    throw UsageError("input " + one_line(input) + " does not exist (" + errno_text(errno) +
                     "); give text files or folders to --input");
  }
  if (S_ISREG(st.st_mode)) {
    add(input);
  } else if (S_ISDIR(st.st_mode)) {
    std::error_code ec;
    fs::recursive_directory_iterator it(input, fs::directory_options::none, ec), end;
    if (ec) throw RuntimeError("cannot read folder " + one_line(input) + ": " + ec.message());
    for (; it != end; it.increment(ec)) {
      if (ec) throw RuntimeError("cannot read folder " + one_line(input) + ": " + ec.message());
      add(it->path());
    }
    if (ec) throw RuntimeError("cannot read folder " + one_line(input) + ": " + ec.message());
    // fs::path ordering compares element by element, so a folder's files stay together.
    std::sort(out.begin(), out.end(),
              [](const Candidate& a, const Candidate& b) { return a.path < b.path; });
  } else {
    throw UsageError("input " + one_line(input) +
                     " is neither a file nor a folder; give text files or folders to --input");
  }
  return out;
}

// Removes the temp file unless the write was committed by the rename.
struct TempFile {
  std::string path;
  int fd = -1;
  ~TempFile() {
    if (fd >= 0) ::close(fd);
    if (!path.empty()) ::unlink(path.c_str());
  }
};

void fsync_dir(const fs::path& dir) {
  Fd d(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (d.fd < 0 || ::fsync(d.fd) != 0) {
    throw RuntimeError("cannot sync folder " + one_line(dir.string()) + ": " + errno_text(errno));
  }
}

}  // namespace

// ---- prepare_token_file ------------------------------------------------------------------------

PrepareStats prepare_token_file(const std::vector<std::string>& inputs, const std::string& output,
                                double val_fraction) {
  if (inputs.empty())
    throw UsageError("prepare-data needs at least one --input TEXT file or folder");
  if (output.empty()) throw UsageError("prepare-data needs --output FILE");
  if (!(val_fraction > 0.0 && val_fraction < 1.0)) {
    throw UsageError("validation fraction must be in (0, 1), got " + std::to_string(val_fraction));
  }

  // Discover everything before creating any file, so bad inputs leave nothing behind.
  std::vector<Candidate> files;
  for (const auto& input : inputs) {
    auto part = expand_input(input);
    files.insert(files.end(), part.begin(), part.end());
  }
  // A symlink whose target is itself among the inputs (fortunes' `x.u8 -> x`) is a duplicate
  // wherever it sorts; the target is read at its own position.
  std::set<FileId> direct;
  for (const auto& c : files)
    if (!c.via_link) direct.insert(c.id);

  fs::path out_path(output);
  fs::path dir = out_path.has_parent_path() ? out_path.parent_path() : fs::path(".");
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) {
    throw RuntimeError("cannot create folder " + one_line(dir.string()) + " for " +
                       one_line(output) + ": " + ec.message());
  }

  TempFile tmp;
  {
    std::string templ = (dir / ("." + out_path.filename().string() + ".tmp-XXXXXX")).string();
    std::vector<char> buf(templ.begin(), templ.end());
    buf.push_back('\0');
    tmp.fd = ::mkstemp(buf.data());
    if (tmp.fd < 0) {
      throw RuntimeError("cannot create a temporary file in " + one_line(dir.string()) + ": " +
                         errno_text(errno));
    }
    tmp.path = buf.data();
    // mkstemp makes 0600; a data file is meant to be shared like any other output.
    mode_t mask = ::umask(0);
    ::umask(mask);
    ::fchmod(tmp.fd, 0666 & ~mask);
  }

  TokenFileHeader header{};
  write_all(tmp.fd, &header, sizeof header, tmp.path);  // placeholder; rewritten at the end

  PrepareStats stats;
  std::set<FileId> read_ids;
  std::vector<unsigned char> text(kReadChunkBytes);
  std::vector<uint16_t> tokens(kReadChunkBytes);
  uint64_t total_tokens = 0;
  auto emit = [&](const unsigned char* p, size_t n) {
    for (size_t i = 0; i < n; ++i) tokens[i] = p[i];
    write_all(tmp.fd, tokens.data(), n * sizeof(uint16_t), tmp.path);
    total_tokens += n;
  };

  for (const auto& c : files) {
    // Hard links, or two symlinks to one file outside the inputs, are read once too.
    if ((c.via_link && direct.count(c.id)) || read_ids.count(c.id)) {
      ++stats.linked_files;
      continue;
    }
    Fd in(::open(c.path.c_str(), O_RDONLY | O_CLOEXEC));
    if (in.fd < 0) {
      throw RuntimeError("cannot open input " + one_line(c.path.string()) + ": " +
                         errno_text(errno));
    }
    bool first = true;
    for (;;) {
      ssize_t n = read_full(in.fd, text.data(), text.size());
      if (n < 0) {
        throw RuntimeError("cannot read input " + one_line(c.path.string()) + ": " +
                           errno_text(errno));
      }
      if (first) {
        first = false;
        size_t sniff = std::min(static_cast<size_t>(n), kBinarySniffBytes);
        if (std::memchr(text.data(), 0, sniff) != nullptr) {
          ++stats.skipped_files;
          break;
        }
        read_ids.insert(c.id);
        if (stats.files > 0) {
          const unsigned char sep = '\n';
          emit(&sep, 1);
        }
        ++stats.files;
      }
      if (n == 0) break;
      emit(text.data(), static_cast<size_t>(n));
      stats.bytes_in += static_cast<uint64_t>(n);
      if (static_cast<size_t>(n) < text.size()) break;
    }
  }

  if (stats.files == 0 || stats.bytes_in == 0) {
    throw UsageError("no text found in the inputs (" + std::to_string(stats.skipped_files) +
                     " binary files skipped); give text files or folders to --input");
  }
  uint64_t val =
      static_cast<uint64_t>(std::floor(static_cast<double>(total_tokens) * val_fraction));
  if (val == 0 || val >= total_tokens) {
    throw UsageError("input is too small: " + std::to_string(total_tokens) +
                     " tokens leave an empty train or validation split at validation fraction " +
                     std::to_string(val_fraction) + "; give more text");
  }
  stats.val_tokens = val;
  stats.train_tokens = total_tokens - val;

  std::memcpy(header.magic, kTokenMagic, sizeof header.magic);
  header.version = kTokenFormatVersion;
  header.vocab_size = 256;
  header.dtype_bytes = sizeof(uint16_t);
  header.train_tokens = stats.train_tokens;
  header.val_tokens = stats.val_tokens;
  for (size_t done = 0; done < sizeof header;) {
    ssize_t w = ::pwrite(tmp.fd, reinterpret_cast<const char*>(&header) + done,
                         sizeof header - done, static_cast<off_t>(done));
    if (w < 0 && errno == EINTR) continue;
    if (w < 0) throw RuntimeError("cannot write " + one_line(tmp.path) + ": " + errno_text(errno));
    done += static_cast<size_t>(w);
  }
  if (::fsync(tmp.fd) != 0) {
    throw RuntimeError("cannot sync " + one_line(tmp.path) + ": " + errno_text(errno));
  }
  // close() can report a deferred write error (NFS): check it before committing.
  int fd = std::exchange(tmp.fd, -1);
  if (::close(fd) != 0) {
    throw RuntimeError("cannot close " + one_line(tmp.path) + ": " + errno_text(errno));
  }
  if (::rename(tmp.path.c_str(), output.c_str()) != 0) {
    throw RuntimeError("cannot rename " + one_line(tmp.path) + " to " + one_line(output) + ": " +
                       errno_text(errno));
  }
  tmp.path.clear();  // committed: nothing to remove
  fsync_dir(dir);
  return stats;
}

// ---- TokenFile ---------------------------------------------------------------------------------

std::shared_ptr<TokenFile> TokenFile::open(const std::string& path, ReadMode mode) {
  std::shared_ptr<TokenFile> tf(new TokenFile());
  tf->path_ = path;
  tf->mode_ = mode;

  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) {
    if (errno == ENOENT || errno == ENOTDIR) refuse(path, "does not exist");
    if (errno == EACCES) refuse(path, "is not readable (permission denied)");
    refuse(path, "cannot be read (" + errno_text(errno) + ")");
  }
  if (S_ISDIR(st.st_mode)) refuse(path, "is a folder, not a token file");
  if (!S_ISREG(st.st_mode)) refuse(path, "is not a regular file");
  Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (fd.fd < 0) {
    if (errno == EACCES || errno == EPERM) refuse(path, "is not readable (permission denied)");
    refuse(path, "cannot be opened (" + errno_text(errno) + ")");
  }
  if (::fstat(fd.fd, &st) != 0) refuse(path, "cannot be inspected (" + errno_text(errno) + ")");
  const uint64_t size = static_cast<uint64_t>(st.st_size);
  if (size == 0) refuse(path, "is empty");
  if (size < sizeof(TokenFileHeader)) {
    refuse(path, "is shorter than the 64-byte header (" + std::to_string(size) +
                     " bytes); it is not a complete token file");
  }
  TokenFileHeader& h = tf->header_;
  ssize_t got = pread_full(fd.fd, &h, sizeof h, 0);
  if (got < 0) refuse(path, "cannot be read (" + errno_text(errno) + ")");
  if (static_cast<size_t>(got) != sizeof h) refuse(path, "was truncated while reading the header");
  if (std::memcmp(h.magic, kTokenMagic, sizeof h.magic) != 0) {
    refuse(path, "is not a token file (wrong magic; expected ATTOKENS)");
  }
  if (h.version != kTokenFormatVersion) {
    refuse(path, "has unsupported format version " + std::to_string(h.version) +
                     " (this build reads version " + std::to_string(kTokenFormatVersion) + ")");
  }
  if (h.dtype_bytes != sizeof(uint16_t)) {
    refuse(path, "has unsupported dtype_bytes " + std::to_string(h.dtype_bytes) +
                     " (this build reads 2-byte tokens)");
  }
  if (h.vocab_size == 0 || h.vocab_size > 65536) {
    refuse(path, "has invalid vocab_size " + std::to_string(h.vocab_size) +
                     " (must be 1..65536 for 2-byte tokens)");
  }
  uint64_t total = 0, payload = 0, expected = 0;
  if (__builtin_add_overflow(h.train_tokens, h.val_tokens, &total) ||
      __builtin_mul_overflow(total, uint64_t{h.dtype_bytes}, &payload) ||
      __builtin_add_overflow(payload, uint64_t{sizeof h}, &expected)) {
    refuse(path, "has impossible token counts in its header (train " +
                     std::to_string(h.train_tokens) + ", val " + std::to_string(h.val_tokens) +
                     ")");
  }
  if (size < expected) {
    refuse(path, "is truncated: the header promises " + std::to_string(total) + " tokens (" +
                     std::to_string(expected) + " bytes) but the file has " + std::to_string(size) +
                     " bytes");
  }
  if (size > expected) {
    refuse(path, "has " + std::to_string(size - expected) + " trailing bytes after the " +
                     std::to_string(total) + " tokens its header declares");
  }
  if (h.train_tokens == 0) refuse(path, "has an empty train split");
  if (h.val_tokens == 0) refuse(path, "has an empty validation split");

  if (mode == ReadMode::mmap) {
    void* base = ::mmap(nullptr, size, PROT_READ, MAP_SHARED, fd.fd, 0);
    if (base == MAP_FAILED) {
      throw RuntimeError("cannot memory-map token file " + one_line(path) + ": " +
                         errno_text(errno) + "; try the pread read mode (--mode ultra-low)");
    }
    tf->map_base_ = base;
    tf->map_bytes_ = size;
    tf->map_ = reinterpret_cast<const uint16_t*>(static_cast<const char*>(base) + sizeof h);
    // The mapping keeps the file alive; the descriptor is not needed any more.
  } else {
    tf->fd_ = fd.release();
  }
  return tf;
}

TokenFile::~TokenFile() {
  if (map_base_ != nullptr) ::munmap(map_base_, map_bytes_);
  if (fd_ >= 0) ::close(fd_);
}

uint64_t TokenFile::tokens(Split split) const {
  return split == Split::train ? header_.train_tokens : header_.val_tokens;
}

void TokenFile::read(Split split, uint64_t offset, int64_t count, int64_t* out) const {
  const uint64_t n = tokens(split);
  if (count < 0 || offset > n || static_cast<uint64_t>(count) > n - offset) {
    throw std::out_of_range("token file " + one_line(path_) + ": window [" +
                            std::to_string(offset) + ", " + std::to_string(offset) + "+" +
                            std::to_string(count) + ") is outside the " +
                            (split == Split::train ? "train" : "validation") + " split of " +
                            std::to_string(n) + " tokens");
  }
  if (count == 0) return;
  if (out == nullptr) throw std::invalid_argument("TokenFile::read: null destination");
  // Token index within the whole file (the validation split follows the train split).
  const uint64_t first = (split == Split::train ? 0 : header_.train_tokens) + offset;

  if (mode_ == ReadMode::mmap) {
    const uint16_t* src = map_ + first;
    for (int64_t i = 0; i < count; ++i) out[i] = src[i];
    return;
  }
  thread_local std::vector<uint16_t> buffer(kPreadChunkTokens);
  uint64_t done = 0;
  const uint64_t want = static_cast<uint64_t>(count);
  while (done < want) {
    const size_t chunk = static_cast<size_t>(std::min<uint64_t>(want - done, buffer.size()));
    const uint64_t byte_offset = sizeof(TokenFileHeader) + (first + done) * sizeof(uint16_t);
    ssize_t got = pread_full(fd_, buffer.data(), chunk * sizeof(uint16_t), byte_offset);
    if (got < 0) {
      throw RuntimeError("cannot read token file " + one_line(path_) + ": " + errno_text(errno));
    }
    if (static_cast<size_t>(got) != chunk * sizeof(uint16_t)) {
      throw RuntimeError("token file " + one_line(path_) +
                         " became shorter while open (was it rewritten?); " + kPrepareFix);
    }
    for (size_t i = 0; i < chunk; ++i) out[done + i] = buffer[i];
    done += chunk;
  }
}

double TokenFile::unigram_val_loss() const {
  const uint32_t vocab = header_.vocab_size;
  std::vector<uint64_t> train_counts(vocab, 0), val_counts(vocab, 0);
  std::vector<int64_t> chunk(1 << 16);
  auto count_split = [&](Split split, std::vector<uint64_t>& counts) {
    const uint64_t n = tokens(split);
    for (uint64_t off = 0; off < n; off += chunk.size()) {
      const int64_t len = static_cast<int64_t>(std::min<uint64_t>(chunk.size(), n - off));
      read(split, off, len, chunk.data());
      for (int64_t i = 0; i < len; ++i) {
        const int64_t t = chunk[i];
        if (t < 0 || static_cast<uint64_t>(t) >= vocab) {
          throw RuntimeError("token file " + one_line(path_) + " holds token " + std::to_string(t) +
                             " outside its vocab of " + std::to_string(vocab) + "; " + kPrepareFix);
        }
        ++counts[static_cast<size_t>(t)];
      }
    }
  };
  count_split(Split::train, train_counts);
  count_split(Split::val, val_counts);
  // Add-one smoothing: p(t) = (c_t + 1) / (N_train + V), so unseen validation bytes cost
  // ln(N_train + V) nats instead of infinity.
  const double denom = static_cast<double>(header_.train_tokens) + vocab;
  double nats = 0.0;
  for (uint32_t t = 0; t < vocab; ++t) {
    if (val_counts[t] == 0) continue;
    const double p = (static_cast<double>(train_counts[t]) + 1.0) / denom;
    nats -= static_cast<double>(val_counts[t]) * std::log(p);
  }
  return nats / static_cast<double>(header_.val_tokens);
}

}  // namespace autotune
