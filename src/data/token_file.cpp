#include "autotune/token_file.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <set>
#include <stdexcept>
#include <utility>

#include "autotune/errors.h"
#include "util/atomic_file.h"

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

void write_all(int fd, const void* buf, size_t n, const std::string& what) {
  if (const int err = autotune::write_all(fd, buf, n))
    throw RuntimeError("cannot write " + one_line(what) + ": " + errno_text(err));
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

// Streams the text of `files` into `fd` as byte tokens (uint16 each), a newline between files,
// skipping binary files and second names of one file. Fills stats' file and byte counts and
// returns the tokens written.
uint64_t write_tokens(int fd, const std::string& fd_path, const std::vector<Candidate>& files,
                      PrepareStats& stats) {
  // A symlink whose target is itself among the inputs (fortunes' `x.u8 -> x`) is a duplicate
  // wherever it sorts; the target is read at its own position.
  std::set<FileId> direct;
  for (const auto& c : files)
    if (!c.via_link) direct.insert(c.id);
  std::set<FileId> read_ids;
  std::vector<unsigned char> text(kReadChunkBytes);
  std::vector<uint16_t> tokens(kReadChunkBytes);
  uint64_t total_tokens = 0;
  auto emit = [&](const unsigned char* p, size_t n) {
    for (size_t i = 0; i < n; ++i) tokens[i] = p[i];
    write_all(fd, tokens.data(), n * sizeof(uint16_t), fd_path);
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
    for (uint64_t offset = 0;; offset += text.size()) {
      const ssize_t n = pread_full(in.fd, text.data(), text.size(), offset);
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
  return total_tokens;
}

// The header at offset 0, over the placeholder written first.
void write_header(int fd, const std::string& fd_path, const TokenFileHeader& header) {
  for (size_t done = 0; done < sizeof header;) {
    ssize_t w = ::pwrite(fd, reinterpret_cast<const char*>(&header) + done, sizeof header - done,
                         static_cast<off_t>(done));
    if (w < 0 && errno == EINTR) continue;
    if (w < 0) throw RuntimeError("cannot write " + one_line(fd_path) + ": " + errno_text(errno));
    done += static_cast<size_t>(w);
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
  fs::path out_path(output);
  fs::path dir = out_path.has_parent_path() ? out_path.parent_path() : fs::path(".");
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) {
    throw RuntimeError("cannot create folder " + one_line(dir.string()) + " for " +
                       one_line(output) + ": " + ec.message());
  }

  PrepareStats stats;
  atomic_write_with(output, [&](const std::string& tmp) {
    Fd out(::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666));
    if (out.fd < 0) {
      throw RuntimeError("cannot create a temporary file in " + one_line(dir.string()) + ": " +
                         errno_text(errno));
    }
    TokenFileHeader header{};
    write_all(out.fd, &header, sizeof header, tmp);  // placeholder; rewritten at the end
    const uint64_t total_tokens = write_tokens(out.fd, tmp, files, stats);
    if (stats.files == 0 || stats.bytes_in == 0) {
      throw UsageError("no text found in the inputs (" + std::to_string(stats.skipped_files) +
                       " binary files skipped); give text files or folders to --input");
    }
    const auto val =
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
    write_header(out.fd, tmp, header);
    // close() can report a deferred write error (NFS): check it before committing.
    if (::close(out.release()) != 0)
      throw RuntimeError("cannot close " + one_line(tmp) + ": " + errno_text(errno));
  });
  return stats;
}

// ---- TokenFile ---------------------------------------------------------------------------------

std::string to_string(TokenFormat f) {
  switch (f) {
    case TokenFormat::autotune:
      return "autotune .tok (uint16)";
    case TokenFormat::nanogpt:
      return "nanoGPT .bin (raw uint16)";
    case TokenFormat::llmc_v1:
      return "llm.c .bin v1 (uint16)";
    case TokenFormat::llmc_v7:
      return "llm.c .bin v7 (uint32)";
  }
  return "?";
}

namespace {

// The validation file a .bin's name implies: "train" -> "val" in the file name (nanoGPT's
// train.bin / val.bin, llm.c's x_train.bin / x_val.bin and x_train_000001.bin / x_val_000000.bin).
std::string sibling_val_file(const std::string& path) {
  const fs::path p(path);
  std::string name = p.filename().string();
  const auto at = name.rfind("train");
  if (at == std::string::npos) return "";
  name.replace(at, 5, "val");
  fs::path candidate = p.parent_path() / name;
  std::error_code ec;
  if (fs::is_regular_file(candidate, ec)) return candidate.string();
  // llm.c numbers its shards: x_val_000000.bin beside x_train_000001.bin.
  const auto digits = name.find_first_of("0123456789", at);
  const auto dot = name.rfind('.');
  if (digits != std::string::npos && dot != std::string::npos && digits < dot) {
    std::string zero = name;
    for (auto i = digits; i < dot; ++i)
      if (std::isdigit(static_cast<unsigned char>(zero[i]))) zero[i] = '0';
    candidate = p.parent_path() / zero;
    if (fs::is_regular_file(candidate, ec)) return candidate.string();
  }
  return "";
}

// The layout of a file and where its tokens start, from its first bytes. Refuses files that are
// none of the formats, and .bin files whose llm.c header is damaged.
struct Layout {
  TokenFormat format = TokenFormat::autotune;
  uint32_t token_bytes = 2;
  uint64_t data_offset = 0;
  uint64_t tokens = 0;  // the .bin formats: all of the file's tokens
};

Layout sniff_bin(const std::string& path, int fd, uint64_t size) {
  Layout l;
  int32_t h[256] = {};
  if (size >= kLlmcHeaderBytes) {
    ssize_t got = pread_full(fd, h, sizeof h, 0);
    if (got != static_cast<ssize_t>(sizeof h)) refuse(path, "cannot be read");
    const bool llmc_magic = h[0] == kLlmcMagicGpt2 || h[0] == kLlmcMagicLlama3;
    // A header in llm.c's shape (a known version and a token count that fills the file) with
    // another magic is a damaged llm.c file, not raw tokens that happen to look like one.
    const bool shaped = (h[1] == 1 && h[2] > 0 && kLlmcHeaderBytes + uint64_t(h[2]) * 2 == size) ||
                        (h[1] == 7 && h[2] > 0 && kLlmcHeaderBytes + uint64_t(h[2]) * 4 == size);
    if (!llmc_magic && shaped)
      refuse(path, "has an llm.c header with magic " + std::to_string(h[0]) + " (expected " +
                       std::to_string(kLlmcMagicGpt2) + " or " + std::to_string(kLlmcMagicLlama3) +
                       ")");
    if (llmc_magic) {
      const int32_t want_version = h[0] == kLlmcMagicGpt2 ? 1 : 7;
      if (h[1] != want_version)
        refuse(path, "has llm.c magic " + std::to_string(h[0]) + " with version " +
                         std::to_string(h[1]) + " (this build reads version " +
                         std::to_string(want_version) + " for that magic)");
      l.format = h[0] == kLlmcMagicGpt2 ? TokenFormat::llmc_v1 : TokenFormat::llmc_v7;
      l.token_bytes = h[0] == kLlmcMagicGpt2 ? 2 : 4;
      l.data_offset = kLlmcHeaderBytes;
      if (h[2] <= 0) refuse(path, "has an llm.c header with no tokens");
      l.tokens = static_cast<uint64_t>(h[2]);
      const uint64_t expected = kLlmcHeaderBytes + l.tokens * l.token_bytes;
      if (size < expected)
        refuse(path, "is truncated: its llm.c header promises " + std::to_string(l.tokens) +
                         " tokens (" + std::to_string(expected) + " bytes) but the file has " +
                         std::to_string(size) + " bytes");
      if (size > expected)
        refuse(path, "has " + std::to_string(size - expected) + " trailing bytes after the " +
                         std::to_string(l.tokens) + " tokens its llm.c header declares");
      return l;
    }
  }
  if (fs::path(path).extension() != ".bin")
    refuse(path,
           "is not a token file (wrong magic: neither ATTOKENS nor llm.c's, and not a "
           "nanoGPT .bin of raw uint16 tokens)");
  if (size % 2 != 0)
    refuse(path, "is truncated: a nanoGPT .bin holds 2-byte tokens but the file has an odd " +
                     std::string("number of bytes (") + std::to_string(size) + ")");
  l.format = TokenFormat::nanogpt;
  l.tokens = size / 2;
  return l;
}

// Opens `path` for reading (refusing folders, empty and unreadable files) and reports its size.
std::pair<int, uint64_t> open_checked(const std::string& path) {
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
  return {fd.release(), size};
}

}  // namespace

TokenFile::Source::~Source() {
  if (map_base != nullptr) ::munmap(map_base, map_bytes);
  if (fd >= 0) ::close(fd);
}

TokenFile::~TokenFile() = default;

namespace {
// The header of an autotune .tok file, checked against the file's size: refuses (naming the file
// and what is wrong) a short, truncated or padded file, an unknown version, dtype or vocabulary,
// and impossible or empty splits.
TokenFileHeader checked_header(const std::string& path, int fd, uint64_t size) {
  if (size < sizeof(TokenFileHeader)) {
    refuse(path, "is shorter than the 64-byte header (" + std::to_string(size) +
                     " bytes); it is not a complete token file");
  }
  TokenFileHeader h{};
  ssize_t got = pread_full(fd, &h, sizeof h, 0);
  if (got < 0) refuse(path, "cannot be read (" + errno_text(errno) + ")");
  if (static_cast<size_t>(got) != sizeof h) refuse(path, "was truncated while reading the header");
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
  return h;
}
}  // namespace

std::shared_ptr<TokenFile> TokenFile::open(const std::string& path, ReadMode mode,
                                           const std::string& val_path) {
  std::shared_ptr<TokenFile> tf(new TokenFile());
  tf->path_ = path;
  tf->mode_ = mode;
  tf->val_path_arg_ = val_path;

  // Each file is mapped (mmap) or kept open (pread); the descriptor closes with its Source.
  auto make_source = [mode](const std::string& p, int fd, uint64_t size) {
    auto src = std::make_shared<Source>();
    src->path = p;
    src->fd = fd;
    if (mode == ReadMode::mmap) {
      void* base = ::mmap(nullptr, size, PROT_READ, MAP_SHARED, fd, 0);
      if (base == MAP_FAILED)
        throw RuntimeError("cannot memory-map token file " + one_line(p) + ": " +
                           errno_text(errno) + "; try the pread read mode (--mode ultra-low)");
      src->map_base = base;
      src->map_bytes = size;
      ::close(std::exchange(src->fd, -1));  // the mapping keeps the file alive
    }
    return src;
  };

  const auto [fd, size] = open_checked(path);
  Fd guard(fd);
  char magic[sizeof kTokenMagic] = {};
  if (size >= sizeof magic && pread_full(fd, magic, sizeof magic, 0) != sizeof magic)
    refuse(path, "cannot be read");
  if (std::memcmp(magic, kTokenMagic, sizeof magic) == 0) {
    if (!val_path.empty())
      throw UsageError("--val-data " + one_line(val_path) + ": " + one_line(path) +
                       " is an autotune .tok file and holds its own validation split; drop "
                       "--val-data");
    const TokenFileHeader h = checked_header(path, fd, size);
    auto src = make_source(path, guard.release(), size);
    tf->format_ = TokenFormat::autotune;
    tf->vocab_size_ = h.vocab_size;
    tf->train_ = {src, sizeof h, h.train_tokens};
    tf->val_ = {src, sizeof h + h.train_tokens * 2, h.val_tokens};
    tf->val_note_ = "its validation split";
    return tf;
  }

  // nanoGPT or llm.c: the validation split is another file, or this one's last 10%.
  const Layout l = sniff_bin(path, fd, size);
  tf->format_ = l.format;
  tf->token_bytes_ = l.token_bytes;
  auto src = make_source(path, guard.release(), size);
  const std::string val_file = val_path.empty() ? sibling_val_file(path) : val_path;
  if (!val_file.empty()) {
    const auto [vfd, vsize] = open_checked(val_file);
    Fd vguard(vfd);
    const Layout vl = sniff_bin(val_file, vfd, vsize);
    if (vl.format != l.format)
      throw UsageError("--val-data " + one_line(val_file) + " is " + to_string(vl.format) +
                       " but " + one_line(path) + " is " + to_string(l.format) +
                       "; give a validation file of the same format");
    tf->train_ = {src, l.data_offset, l.tokens};
    tf->val_ = {make_source(val_file, vguard.release(), vsize), vl.data_offset, vl.tokens};
    tf->val_note_ = one_line(val_file);
  } else {
    const uint64_t val_tokens = l.tokens / 10;
    if (val_tokens == 0 || l.tokens - val_tokens == 0)
      refuse(path, "has " + std::to_string(l.tokens) +
                       " tokens, too few for a train and a validation split");
    tf->train_ = {src, l.data_offset, l.tokens - val_tokens};
    tf->val_ = {src, l.data_offset + (l.tokens - val_tokens) * l.token_bytes, val_tokens};
    tf->val_note_ = "its last 10%";
  }
  const uint32_t max_token = tf->scan_max_token();
  tf->vocab_size_ = max_token + 1;
  return tf;
}

std::shared_ptr<TokenFile> TokenFile::reopen(ReadMode mode) const {
  return open(path_, mode, val_path_arg_);
}

std::string TokenFile::describe() const {
  return to_string(format_) + ", " + std::to_string(train_.tokens) + " train + " +
         std::to_string(val_.tokens) + " val tokens (validation: " + val_note_ + ")";
}

uint32_t TokenFile::scan_max_token() const {
  // Every token, once, through positioned reads of a descriptor of its own: through the memory
  // map the scan would leave the whole file resident, which the budget counts. The model's
  // vocab_size is then checked against the largest (GptWorkload).
  uint32_t max_token = 0;
  std::vector<char> buf(kPreadChunkTokens * 4);
  for (Split split : {Split::train, Split::val}) {
    const Part& p = part(split);
    Fd fd(::open(p.source->path.c_str(), O_RDONLY | O_CLOEXEC));
    if (fd.fd < 0) refuse(p.source->path, "cannot be opened (" + errno_text(errno) + ")");
    for (uint64_t done = 0; done < p.tokens;) {
      const uint64_t n = std::min<uint64_t>(kPreadChunkTokens, p.tokens - done);
      if (pread_full(fd.fd, buf.data(), n * token_bytes_, p.byte_offset + done * token_bytes_) !=
          static_cast<ssize_t>(n * token_bytes_))
        refuse(p.source->path, "cannot be read to its end");
      for (uint64_t i = 0; i < n; ++i) {
        uint32_t t = 0;
        std::memcpy(&t, buf.data() + i * token_bytes_, token_bytes_);  // little-endian
        max_token = std::max(max_token, t);
      }
      done += n;
    }
  }
  return max_token;
}

uint64_t TokenFile::tokens(Split split) const {
  return part(split).tokens;
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
  const Part& p = part(split);
  const uint64_t byte_offset = p.byte_offset + offset * token_bytes_;
  auto widen = [&](const char* src, size_t k, int64_t* dst) {
    if (token_bytes_ == 2) {
      const auto* t = reinterpret_cast<const uint16_t*>(src);
      for (size_t i = 0; i < k; ++i) dst[i] = t[i];
    } else {
      const auto* t = reinterpret_cast<const uint32_t*>(src);
      for (size_t i = 0; i < k; ++i) dst[i] = t[i];
    }
  };
  if (mode_ == ReadMode::mmap) {
    widen(static_cast<const char*>(p.source->map_base) + byte_offset, static_cast<size_t>(count),
          out);
    return;
  }
  thread_local std::vector<char> buffer(kPreadChunkTokens * 4);
  uint64_t done = 0;
  const uint64_t want = static_cast<uint64_t>(count);
  while (done < want) {
    const size_t chunk = static_cast<size_t>(std::min<uint64_t>(want - done, kPreadChunkTokens));
    ssize_t got = pread_full(p.source->fd, buffer.data(), chunk * token_bytes_,
                             byte_offset + done * token_bytes_);
    if (got < 0) {
      throw RuntimeError("cannot read token file " + one_line(p.source->path) + ": " +
                         errno_text(errno));
    }
    if (static_cast<size_t>(got) != chunk * token_bytes_) {
      throw RuntimeError("token file " + one_line(p.source->path) +
                         " became shorter while open (was it rewritten?); " + kPrepareFix);
    }
    widen(buffer.data(), chunk, out + done);
    done += chunk;
  }
}

double TokenFile::unigram_val_loss() const {
  const uint32_t vocab = vocab_size_;
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
  const double denom = static_cast<double>(train_.tokens) + vocab;
  double nats = 0.0;
  for (uint32_t t = 0; t < vocab; ++t) {
    if (val_counts[t] == 0) continue;
    const double p = (static_cast<double>(train_counts[t]) + 1.0) / denom;
    nats -= static_cast<double>(val_counts[t]) * std::log(p);
  }
  return nats / static_cast<double>(val_.tokens);
}

}  // namespace autotune
