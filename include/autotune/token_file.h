// Binary token files: a 64-byte header then uint16 tokens, the train split followed by the
// validation split. Byte-level tokens (vocab 256) to start; the header leaves room for more.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace autotune {

constexpr char kTokenMagic[8] = {'A', 'T', 'T', 'O', 'K', 'E', 'N', 'S'};
constexpr uint32_t kTokenFormatVersion = 1;

#pragma pack(push, 1)
struct TokenFileHeader {
  char magic[8];          // kTokenMagic
  uint32_t version;       // kTokenFormatVersion
  uint32_t vocab_size;    // 256 for bytes
  uint32_t dtype_bytes;   // 2 (uint16 tokens)
  uint32_t reserved;      // 0
  uint64_t train_tokens;  // tokens in the train split
  uint64_t val_tokens;    // tokens in the validation split (after the train split)
  uint8_t pad[24];        // zero; header is 64 bytes
};
#pragma pack(pop)
static_assert(sizeof(TokenFileHeader) == 64, "token file header is 64 bytes");

enum class Split { train, val };

struct PrepareStats {
  int64_t files = 0;          // text files read
  int64_t skipped_files = 0;  // binary files (NUL bytes) skipped
  int64_t linked_files = 0;   // symlinks or hard links to a file read once already, skipped
  uint64_t bytes_in = 0;
  uint64_t train_tokens = 0;
  uint64_t val_tokens = 0;
};

// Turns text files or folders (recursively, sorted, binary files skipped) into a token file.
// The last `val_fraction` of the tokens is the validation split. Written atomically.
// Throws UsageError for missing inputs or no text, RuntimeError for I/O failures.
PrepareStats prepare_token_file(const std::vector<std::string>& inputs, const std::string& output,
                                double val_fraction = 0.1);

// How windows are read: through a shared memory map (fast, the OS page cache grows resident
// memory as the file is touched) or with positioned reads into a reused buffer (ultra-low-mem:
// resident memory stays flat however long the run).
enum class ReadMode { mmap, pread };

class TokenFile {
 public:
  // Opens and validates: missing/unreadable/empty file, wrong magic, unknown version, bad dtype,
  // size not matching the header (truncated). Throws UsageError with one line naming the file,
  // the problem and the fix ("run autotune prepare-data ...").
  static std::shared_ptr<TokenFile> open(const std::string& path, ReadMode mode = ReadMode::mmap);
  ~TokenFile();
  TokenFile(const TokenFile&) = delete;
  TokenFile& operator=(const TokenFile&) = delete;

  const std::string& path() const { return path_; }
  uint32_t vocab_size() const { return header_.vocab_size; }
  uint64_t tokens(Split split) const;
  ReadMode mode() const { return mode_; }

  // Copies tokens [offset, offset + count) of `split` into `out` as int64. Thread-safe.
  void read(Split split, uint64_t offset, int64_t count, int64_t* out) const;

  // Unigram cross-entropy (nats/token) of the validation split under train-split frequencies
  // (add-one smoothed): the loss a model that ignores context would reach.
  double unigram_val_loss() const;

 private:
  TokenFile() = default;
  std::string path_;
  TokenFileHeader header_{};
  ReadMode mode_ = ReadMode::mmap;
  int fd_ = -1;
  const uint16_t* map_ = nullptr;  // whole file after the header (mmap mode)
  size_t map_bytes_ = 0;
  void* map_base_ = nullptr;
};

}  // namespace autotune
