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

// The layouts `--data` takes, detected from the file's first bytes (and name):
//   autotune  .tok: a 64-byte header (TokenFileHeader), uint16 train split then validation split
//   nanogpt   nanoGPT's train.bin: raw little-endian uint16 tokens, no header
//   llmc_v1   llm.c's .bin: 256 int32 (magic 20240520, version 1, token count), then uint16
//   llmc_v7   llm.c's .bin: 256 int32 (magic 20240801, version 7, token count), then uint32
enum class TokenFormat { autotune, nanogpt, llmc_v1, llmc_v7 };
std::string to_string(TokenFormat f);

constexpr int32_t kLlmcMagicGpt2 = 20240520;    // version 1, uint16 tokens
constexpr int32_t kLlmcMagicLlama3 = 20240801;  // version 7, uint32 tokens
constexpr size_t kLlmcHeaderBytes = 256 * sizeof(int32_t);

class TokenFile {
 public:
  // Opens and validates any TokenFormat. Problems (missing/unreadable/empty file, wrong magic,
  // unknown version, bad dtype, size not matching the header, a truncated token) throw
  // UsageError with one line naming the file, the problem and the fix. The validation split:
  // a .tok file's own; for the .bin formats `val_path` when given, else the file named like
  // this one with "train" replaced by "val" when it exists (nanoGPT's val.bin, llm.c's *_val_*),
  // else the last 10% of the tokens.
  static std::shared_ptr<TokenFile> open(const std::string& path, ReadMode mode = ReadMode::mmap,
                                         const std::string& val_path = "");
  // The same files again with another read mode.
  std::shared_ptr<TokenFile> reopen(ReadMode mode) const;
  ~TokenFile();
  TokenFile(const TokenFile&) = delete;
  TokenFile& operator=(const TokenFile&) = delete;

  const std::string& path() const { return path_; }
  TokenFormat format() const { return format_; }
  // For the settings table: format, token width, where the validation split comes from.
  std::string describe() const;
  // The header's (.tok) or the largest token + 1 (the .bin formats, scanned at open).
  uint32_t vocab_size() const { return vocab_size_; }
  uint64_t tokens(Split split) const;
  ReadMode mode() const { return mode_; }

  // Copies tokens [offset, offset + count) of `split` into `out` as int64. Thread-safe.
  void read(Split split, uint64_t offset, int64_t count, int64_t* out) const;

  // Unigram cross-entropy (nats/token) of the validation split under train-split frequencies
  // (add-one smoothed): the loss a model that ignores context would reach.
  double unigram_val_loss() const;

 private:
  // One open file: its descriptor (pread) or mapping (mmap).
  struct Source {
    std::string path;
    int fd = -1;
    void* map_base = nullptr;
    size_t map_bytes = 0;
    ~Source();
  };
  // Where a split's tokens are: a byte offset into a source and a count.
  struct Part {
    std::shared_ptr<Source> source;
    uint64_t byte_offset = 0;
    uint64_t tokens = 0;
  };
  TokenFile() = default;
  const Part& part(Split split) const { return split == Split::train ? train_ : val_; }
  uint32_t scan_max_token() const;

  std::string path_, val_path_arg_, val_note_;
  TokenFormat format_ = TokenFormat::autotune;
  ReadMode mode_ = ReadMode::mmap;
  uint32_t token_bytes_ = 2;
  uint32_t vocab_size_ = 0;
  Part train_, val_;
};

}  // namespace autotune
