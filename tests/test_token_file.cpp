// Token files: prepare-data round trip, refusal of every kind of bad file, atomic writes, the
// real default corpus, and flat resident memory of the pread read path.
#include "autotune/token_file.h"

#include <gtest/gtest.h>
#include <signal.h>
#include <sys/fsuid.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "autotune/errors.h"
#include "autotune/gpt_workload.h"
#include "test_support.h"

namespace fs = std::filesystem;
using autotune::GptWorkload;
using autotune::load_gpt_config;
using autotune::prepare_token_file;
using autotune::PrepareStats;
using autotune::ReadMode;
using autotune::RuntimeError;
using autotune::Split;
using autotune::TokenFile;
using autotune::TokenFileHeader;
using autotune::TokenFormat;
using autotune::UsageError;
using autotune::testing::FileSizeLimit;
using autotune::testing::list_dir;
using autotune::testing::read_file;
using autotune::testing::run_autotune;
using autotune::testing::temp_dir;
using autotune::testing::write_file;

namespace {

const char* const kFortunes = "/usr/share/games/fortunes";
const ReadMode kModes[] = {ReadMode::mmap, ReadMode::pread};

const char* mode_name(ReadMode m) {
  return m == ReadMode::mmap ? "mmap" : "pread";
}

TokenFileHeader valid_header(uint64_t train, uint64_t val) {
  TokenFileHeader h{};
  std::memcpy(h.magic, autotune::kTokenMagic, sizeof h.magic);
  h.version = autotune::kTokenFormatVersion;
  h.vocab_size = 256;
  h.dtype_bytes = 2;
  h.train_tokens = train;
  h.val_tokens = val;
  return h;
}

// A header followed by `tokens` 2-byte tokens (values 'a'..'z').
std::string token_file_bytes(const TokenFileHeader& h, uint64_t tokens) {
  std::string s(reinterpret_cast<const char*>(&h), sizeof h);
  for (uint64_t i = 0; i < tokens; ++i) {
    uint16_t t = static_cast<uint16_t>('a' + i % 26);
    s.append(reinterpret_cast<const char*>(&t), 2);
  }
  return s;
}

std::string read_all(const TokenFile& tf, Split split) {
  std::vector<int64_t> buf(tf.tokens(split));
  tf.read(split, 0, static_cast<int64_t>(buf.size()), buf.data());
  std::string s;
  for (int64_t t : buf) s.push_back(static_cast<char>(t));
  return s;
}

// Resident set size of this process in bytes, from VmRSS in /proc/self/status.
uint64_t vm_rss_bytes() {
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line)) {
    if (line.rfind("VmRSS:", 0) == 0) return std::stoull(line.substr(6)) * 1024;  // kB
  }
  ADD_FAILURE() << "no VmRSS in /proc/self/status";
  return 0;
}

}  // namespace

// ---- prepare-data round trip -------------------------------------------------------------------

TEST(TokenFile, PrepareRoundTripFoldersBinarySymlinks) {
  std::string src = temp_dir("tok-roundtrip-src"), out_dir = temp_dir("tok-roundtrip-out");
  const std::string a = std::string(150, 'x') + "Alpha: the first file.\n";
  const std::string c = "Nested two, no trailing newline";
  const std::string e = "Deeper three.\nWith a second line.\n";
  fs::create_directories(src + "/b/d");
  write_file(src + "/a.txt", a);
  write_file(src + "/b/c.txt", c);
  write_file(src + "/b/d/e.txt", e);
  write_file(src + "/blob.bin", std::string("text\0then binary", 16));  // skipped: NUL byte
  fs::create_symlink("a.txt", src + "/z.u8");          // after its target: already read
  fs::create_symlink("b/c.txt", src + "/0first.lnk");  // before its target: still a duplicate
  fs::create_directory_symlink(".", src + "/loop");    // a folder cycle must not be followed

  const std::string out = out_dir + "/corpus.tok";
  PrepareStats st = prepare_token_file({src}, out, 0.1);

  // Sorted by path, one '\n' between files: a.txt, b/c.txt, b/d/e.txt.
  const std::string expected = a + "\n" + c + "\n" + e;
  const uint64_t total = expected.size();
  EXPECT_EQ(st.files, 3);
  EXPECT_EQ(st.skipped_files, 1);
  EXPECT_EQ(st.linked_files, 2);
  EXPECT_EQ(st.bytes_in, a.size() + c.size() + e.size());
  EXPECT_EQ(st.val_tokens, static_cast<uint64_t>(total * 0.1));
  EXPECT_EQ(st.train_tokens + st.val_tokens, total);

  // The bytes on disk: header then every byte as a little-endian uint16.
  const std::string raw = read_file(out);
  ASSERT_EQ(raw.size(), sizeof(TokenFileHeader) + 2 * total);
  TokenFileHeader h{};
  std::memcpy(&h, raw.data(), sizeof h);
  EXPECT_EQ(std::string(h.magic, 8), "ATTOKENS");
  EXPECT_EQ(h.version, 1u);
  EXPECT_EQ(h.vocab_size, 256u);
  EXPECT_EQ(h.dtype_bytes, 2u);
  EXPECT_EQ(h.train_tokens, st.train_tokens);
  EXPECT_EQ(h.val_tokens, st.val_tokens);
  for (uint64_t i = 0; i < total; ++i) {
    uint16_t t = 0;
    std::memcpy(&t, raw.data() + sizeof h + 2 * i, 2);
    ASSERT_EQ(t, static_cast<unsigned char>(expected[i])) << "token " << i;
  }
  // Only the output is left in its folder: the temp file was renamed, not copied.
  EXPECT_EQ(list_dir(out_dir), std::vector<std::string>{"corpus.tok"});

  // Deterministic: a second run writes the same bytes.
  const std::string out2 = out_dir + "/again.tok";
  prepare_token_file({src}, out2, 0.1);
  EXPECT_EQ(read_file(out2), raw);

  const std::string train_text = expected.substr(0, st.train_tokens);
  const std::string val_text = expected.substr(st.train_tokens);
  for (ReadMode mode : kModes) {
    SCOPED_TRACE(mode_name(mode));
    auto tf = TokenFile::open(out, mode);
    EXPECT_EQ(tf->mode(), mode);
    EXPECT_EQ(tf->vocab_size(), 256u);
    EXPECT_EQ(tf->tokens(Split::train), st.train_tokens);
    EXPECT_EQ(tf->tokens(Split::val), st.val_tokens);
    EXPECT_EQ(read_all(*tf, Split::train), train_text);
    EXPECT_EQ(read_all(*tf, Split::val), val_text);
    std::mt19937_64 rng(7);
    for (int i = 0; i < 200; ++i) {
      const Split split = i % 2 ? Split::train : Split::val;
      const std::string& text = split == Split::train ? train_text : val_text;
      const int64_t len = 1 + static_cast<int64_t>(rng() % std::min<uint64_t>(text.size(), 17));
      const uint64_t off = rng() % (text.size() - len + 1);
      std::vector<int64_t> w(len, -1);
      tf->read(split, off, len, w.data());
      for (int64_t j = 0; j < len; ++j)
        ASSERT_EQ(w[j], static_cast<unsigned char>(text[off + j])) << off << "+" << j;
    }
    // Bounds: the last window is fine, one token further is not, in either split.
    std::vector<int64_t> w(8);
    EXPECT_NO_THROW(tf->read(Split::val, st.val_tokens - 8, 8, w.data()));
    EXPECT_NO_THROW(tf->read(Split::val, st.val_tokens, 0, w.data()));
    EXPECT_THROW(tf->read(Split::val, st.val_tokens - 7, 8, w.data()), std::out_of_range);
    EXPECT_THROW(tf->read(Split::train, st.train_tokens, 1, w.data()), std::out_of_range);
    EXPECT_THROW(tf->read(Split::train, 0, -1, w.data()), std::out_of_range);
    EXPECT_THROW(tf->read(Split::train, UINT64_MAX, 2, w.data()), std::out_of_range);
  }
  fs::remove_all(src);
  fs::remove_all(out_dir);
}

TEST(TokenFile, PrepareKeepsTheOrderOfInputFiles) {
  std::string dir = temp_dir("tok-order");
  write_file(dir + "/first", "zzz first given\n");
  write_file(dir + "/second", "aaa second given\n");
  PrepareStats st = prepare_token_file({dir + "/first", dir + "/second"}, dir + "/o.tok", 0.25);
  EXPECT_EQ(st.files, 2);
  auto tf = TokenFile::open(dir + "/o.tok");
  EXPECT_EQ(read_all(*tf, Split::train) + read_all(*tf, Split::val),
            "zzz first given\n\naaa second given\n");
  fs::remove_all(dir);
}

// ---- refusing bad files ------------------------------------------------------------------------

namespace {
void expect_refused(const std::string& path, const std::string& problem) {
  for (ReadMode mode : kModes) {
    SCOPED_TRACE(std::string(mode_name(mode)) + " " + path);
    try {
      TokenFile::open(path, mode);
      ADD_FAILURE() << "opened a bad token file; expected: " << problem;
    } catch (const UsageError& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find(path), std::string::npos) << msg;
      EXPECT_NE(msg.find(problem), std::string::npos) << msg;
      EXPECT_NE(msg.find("run `autotune prepare-data --input TEXT... --output FILE`"),
                std::string::npos)
          << msg;
      EXPECT_EQ(msg.find('\n'), std::string::npos) << "not one line: " << msg;
    }
  }
}
}  // namespace

TEST(TokenFile, RefusesEachKindOfBadFileWithOneLine) {
  const std::string dir = temp_dir("tok-bad");
  auto with = [&](const std::string& name, const std::string& bytes) {
    write_file(dir + "/" + name, bytes);
    return dir + "/" + name;
  };
  const std::string good = token_file_bytes(valid_header(90, 10), 100);
  // The fixture itself is fine: every refusal below comes from the one thing changed.
  for (ReadMode mode : kModes) EXPECT_NO_THROW(TokenFile::open(with("good.tok", good), mode));

  expect_refused(dir + "/missing.tok", "does not exist");
  expect_refused(with("empty.tok", ""), "is empty");
  expect_refused(with("short.tok", good.substr(0, 40)), "shorter than the 64-byte header");
  expect_refused(dir, "is a folder");

  std::string magic = good;
  magic[0] = 'X';
  expect_refused(with("magic.tok", magic), "wrong magic");
  expect_refused(with("text.tok", std::string(200, 't')), "wrong magic");

  auto header_variant = [&](auto change) {
    TokenFileHeader h = valid_header(90, 10);
    change(h);
    return token_file_bytes(h, 100);
  };
  expect_refused(with("version.tok", header_variant([](auto& h) { h.version = 7; })),
                 "unsupported format version 7");
  expect_refused(with("dtype.tok", header_variant([](auto& h) { h.dtype_bytes = 4; })),
                 "unsupported dtype_bytes 4");
  expect_refused(with("vocab.tok", header_variant([](auto& h) { h.vocab_size = 0; })),
                 "invalid vocab_size 0");
  expect_refused(with("truncated.tok", good.substr(0, good.size() - 2)), "is truncated");
  expect_refused(with("trailing.tok", good + "xyz"), "3 trailing bytes");
  expect_refused(with("huge.tok", header_variant([](auto& h) { h.train_tokens = UINT64_MAX; })),
                 "impossible token counts");
  expect_refused(with("notrain.tok", token_file_bytes(valid_header(0, 10), 10)),
                 "empty train split");
  expect_refused(with("noval.tok", token_file_bytes(valid_header(10, 0), 10)),
                 "empty validation split");
  fs::remove_all(dir);
}

TEST(TokenFile, RefusesAnUnreadableFile) {
  const std::string dir = temp_dir("tok-perm");
  const std::string path = dir + "/locked.tok";
  write_file(path, token_file_bytes(valid_header(90, 10), 100));
  fs::permissions(path, fs::perms::none);
  if (::geteuid() == 0) {
    // Root ignores permission bits. setfsuid changes the uid used for file access checks of
    // this thread only, so the rest of the process keeps running as root.
    const uid_t nobody = 65534;
    const int before = ::setfsuid(nobody);
    const bool dropped = ::setfsuid(static_cast<uid_t>(-1)) == static_cast<int>(nobody);
    if (dropped) expect_refused(path, "not readable (permission denied)");
    ::setfsuid(static_cast<uid_t>(before));
    EXPECT_TRUE(dropped) << "cannot drop the file-system uid to test permissions";
  } else {
    expect_refused(path, "not readable (permission denied)");
  }
  fs::permissions(path, fs::perms::owner_all);
  fs::remove_all(dir);
}

// ---- prepare-data failures leave nothing behind
// --------------------------------------------------

TEST(TokenFile, PrepareBadInputsThrowUsageErrorAndLeaveNoFile) {
  const std::string dir = temp_dir("tok-prep-bad");
  const std::string out_dir = dir + "/out";
  fs::create_directories(out_dir);
  const std::string out = out_dir + "/c.tok";

  try {
    prepare_token_file({dir + "/no-such-input"}, out);
    ADD_FAILURE() << "missing input accepted";
  } catch (const UsageError& e) {
    EXPECT_NE(std::string(e.what()).find("no-such-input"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("does not exist"), std::string::npos) << e.what();
  }
  EXPECT_TRUE(list_dir(out_dir).empty());

  write_file(dir + "/only.bin", std::string("\0\1\2", 3));
  try {
    prepare_token_file({dir + "/only.bin"}, out);
    ADD_FAILURE() << "binary-only input accepted";
  } catch (const UsageError& e) {
    EXPECT_NE(std::string(e.what()).find("no text found"), std::string::npos) << e.what();
  }
  EXPECT_TRUE(list_dir(out_dir).empty());

  write_file(dir + "/tiny.txt", "hi");  // 2 tokens: 10% of them is no validation token
  try {
    prepare_token_file({dir + "/tiny.txt"}, out, 0.1);
    ADD_FAILURE() << "too small input accepted";
  } catch (const UsageError& e) {
    EXPECT_NE(std::string(e.what()).find("too small"), std::string::npos) << e.what();
  }
  EXPECT_TRUE(list_dir(out_dir).empty());

  EXPECT_THROW(prepare_token_file({dir + "/tiny.txt"}, out, 1.5), UsageError);
  EXPECT_THROW(prepare_token_file({}, out), UsageError);
  EXPECT_TRUE(list_dir(out_dir).empty());
  fs::remove_all(dir);
}

TEST(TokenFile, PrepareWriteFailureKeepsTheOldOutputAndRemovesTheTempFile) {
  const std::string dir = temp_dir("tok-prep-io");
  const std::string out_dir = dir + "/out";
  fs::create_directories(out_dir);
  const std::string out = out_dir + "/c.tok";
  write_file(dir + "/small.txt", std::string(100, 's'));
  prepare_token_file({dir + "/small.txt"}, out);
  const std::string old_bytes = read_file(out);

  // A file-size limit makes the write fail half-way (EFBIG) like a full disk would.
  write_file(dir + "/big.txt", std::string(1 << 20, 'b'));
  bool threw_runtime = false;
  std::string what;
  {
    FileSizeLimit limit(64 * 1024);
    ASSERT_TRUE(limit.ok());
    try {
      prepare_token_file({dir + "/big.txt"}, out);
    } catch (const RuntimeError& e) {
      threw_runtime = true;
      what = e.what();
    } catch (...) {
    }
  }

  EXPECT_TRUE(threw_runtime) << "a failed write must throw RuntimeError";
  EXPECT_NE(what.find("cannot write"), std::string::npos) << what;
  EXPECT_EQ(list_dir(out_dir), std::vector<std::string>{"c.tok"}) << "temp file left behind";
  EXPECT_EQ(read_file(out), old_bytes) << "the previous output was damaged";
  fs::remove_all(dir);
}

// ---- the real corpus ---------------------------------------------------------------------------

TEST(TokenFile, RealFortunesCorpusPreparesAndHasAPlausibleUnigramLoss) {
  ASSERT_TRUE(fs::is_directory(kFortunes))
      << kFortunes << " is missing: install Debian's fortunes package (scripts/setup does)";
  const std::string dir = temp_dir("tok-fortunes");
  const std::string out = dir + "/fortunes.tok";
  PrepareStats st = prepare_token_file({kFortunes}, out);
  std::printf(
      "[corpus] %s: %lld text files, %lld binary skipped, %lld links skipped, "
      "%llu bytes, %llu train + %llu val tokens\n",
      kFortunes, static_cast<long long>(st.files), static_cast<long long>(st.skipped_files),
      static_cast<long long>(st.linked_files), static_cast<unsigned long long>(st.bytes_in),
      static_cast<unsigned long long>(st.train_tokens),
      static_cast<unsigned long long>(st.val_tokens));
  EXPECT_GT(st.files, 10);
  EXPECT_GT(st.bytes_in, 1000000u);
  EXPECT_GT(st.skipped_files, 0) << "the .dat index files are binary";
  EXPECT_GT(st.linked_files, 0) << "the .u8 symlinks point at files already read";

  // Independent count: every regular, non-symlink file without a NUL in its first 8 KiB.
  uint64_t text_bytes = 0;
  int64_t text_files = 0;
  for (const auto& e : fs::recursive_directory_iterator(kFortunes)) {
    if (e.is_symlink() || !e.is_regular_file()) continue;
    const std::string body = read_file(e.path().string());
    if (body.substr(0, 8192).find('\0') != std::string::npos) continue;
    text_bytes += body.size();
    ++text_files;
  }
  EXPECT_EQ(st.files, text_files);
  EXPECT_EQ(st.bytes_in, text_bytes);
  EXPECT_EQ(st.train_tokens + st.val_tokens, text_bytes + text_files - 1);

  for (ReadMode mode : kModes) {
    auto tf = TokenFile::open(out, mode);
    const double loss = tf->unigram_val_loss();
    std::printf("[corpus] unigram validation loss (%s): %.4f nats/token\n", mode_name(mode), loss);
    EXPECT_GT(loss, 2.0);
    EXPECT_LT(loss, 5.0);
  }
  fs::remove_all(dir);
}

TEST(TokenFile, UnigramLossMatchesAHandComputedValue) {
  // train "aab" (a:2, b:1), val "ab": p(a) = 3/259, p(b) = 2/259 under add-one over 256.
  const std::string dir = temp_dir("tok-unigram");
  TokenFileHeader h = valid_header(3, 2);
  std::string bytes(reinterpret_cast<const char*>(&h), sizeof h);
  for (uint16_t t : {uint16_t('a'), uint16_t('a'), uint16_t('b'), uint16_t('a'), uint16_t('b')})
    bytes.append(reinterpret_cast<const char*>(&t), 2);
  write_file(dir + "/u.tok", bytes);
  const double expected = -(std::log(3.0 / 259.0) + std::log(2.0 / 259.0)) / 2.0;
  for (ReadMode mode : kModes)
    EXPECT_NEAR(TokenFile::open(dir + "/u.tok", mode)->unigram_val_loss(), expected, 1e-12);
  fs::remove_all(dir);
}

// ---- resident memory of the two read paths -----------------------------------------------------

namespace {
// Reads 10,000 random 256-token windows of the train split, checking each against the known
// content, and returns how much VmRSS grew across the loop (bytes, may be negative).
int64_t rss_growth_over_random_windows(const std::string& path, ReadMode mode,
                                       const std::vector<uint16_t>& pattern) {
  constexpr int64_t kWindow = 256;
  constexpr int kWindows = 10000;
  std::vector<int64_t> window(kWindow);
  auto tf = TokenFile::open(path, mode);
  const uint64_t n = tf->tokens(Split::train);
  // Warm-up: the per-thread read buffer and this function's heap are allocated before the
  // baseline, so only what the reads keep resident is measured.
  tf->read(Split::train, 0, kWindow, window.data());
  const uint64_t before = vm_rss_bytes();
  std::mt19937_64 rng(1234);
  for (int i = 0; i < kWindows; ++i) {
    const uint64_t off = rng() % (n - kWindow + 1);
    tf->read(Split::train, off, kWindow, window.data());
    for (int64_t j = 0; j < kWindow; j += 37) {
      if (window[j] != pattern[(off + j) % pattern.size()]) {
        ADD_FAILURE() << mode_name(mode) << " window at " << off << " differs at " << j;
        return 0;
      }
    }
  }
  const uint64_t after = vm_rss_bytes();
  return static_cast<int64_t>(after) - static_cast<int64_t>(before);
}
}  // namespace

TEST(TokenFile, PreadReadsKeepResidentMemoryFlat) {
  // 40 Mi tokens = 80 MiB of real text bytes repeated: larger than any sensible cache and
  // large enough that a memory map touched at random shows up in VmRSS.
  std::string text;
  if (fs::exists(std::string(kFortunes) + "/fortunes")) {
    text = read_file(std::string(kFortunes) + "/fortunes");
  }
  if (text.size() < 4096) {
    text =
        "It was the best of times, it was the worst of times, it was the age of wisdom, it "
        "was the age of foolishness, it was the epoch of belief, it was the epoch of "
        "incredulity.\n";
  }
  std::vector<uint16_t> pattern(text.begin(), text.end());
  for (auto& t : pattern) t &= 0xFF;  // chars may be signed; tokens are bytes
  const uint64_t total = 40ull << 20;
  const std::string dir = temp_dir("tok-rss");
  const std::string path = dir + "/big.tok";
  {
    TokenFileHeader h = valid_header(total - total / 10, total / 10);
    std::ofstream f(path, std::ios::binary);
    f.write(reinterpret_cast<const char*>(&h), sizeof h);
    std::vector<uint16_t> chunk(1 << 20);
    for (uint64_t done = 0; done < total; done += chunk.size()) {
      for (size_t i = 0; i < chunk.size(); ++i) chunk[i] = pattern[(done + i) % pattern.size()];
      f.write(reinterpret_cast<const char*>(chunk.data()), chunk.size() * 2);
    }
    ASSERT_TRUE(f.good());
  }
  ASSERT_GT(fs::file_size(path), 64ull << 20);

  const int64_t pread_growth = rss_growth_over_random_windows(path, ReadMode::pread, pattern);
  const int64_t mmap_growth = rss_growth_over_random_windows(path, ReadMode::mmap, pattern);
  std::printf(
      "[rss] 10000 random 256-token windows of an %.0f MiB token file: VmRSS grew "
      "%.2f MiB with pread, %.2f MiB with mmap\n",
      fs::file_size(path) / 1048576.0, pread_growth / 1048576.0, mmap_growth / 1048576.0);
  EXPECT_LT(pread_growth, 8ll << 20);
  fs::remove_all(dir);
}

// ---- the token files nanoGPT and llm.c users already have --------------------------------------

namespace {
std::vector<int64_t> expected_tokens(int64_t n, int64_t vocab, int64_t seed) {
  std::vector<int64_t> v(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) v[static_cast<size_t>(i)] = (i * 7919 + seed) % vocab;
  return v;
}
std::vector<int64_t> all_tokens(const TokenFile& f, Split split) {
  std::vector<int64_t> v(f.tokens(split));
  f.read(split, 0, static_cast<int64_t>(v.size()), v.data());
  return v;
}
std::string bins() {
  static const std::string dir = [] {
    const std::string d = temp_dir("token-bins");
    auto r = autotune::testing::run_python(
        {std::string(AUTOTUNE_SOURCE_DIR) + "/tests/fixtures/token_bins.py", d});
    if (r.exit_code != 0) throw std::runtime_error("token_bins.py failed: " + r.err);
    return d;
  }();
  return dir;
}
}  // namespace

TEST(TokenFile, ReadsNanoGptAndLlmcFilesAsThoseProjectsWriteThem) {
  for (ReadMode mode : kModes) {
    // nanoGPT: raw uint16; val.bin beside train.bin is the validation split.
    auto nano = TokenFile::open(bins() + "/nanogpt/train.bin", mode);
    EXPECT_EQ(nano->format(), TokenFormat::nanogpt);
    EXPECT_EQ(all_tokens(*nano, Split::train), expected_tokens(5000, 50257, 13));
    EXPECT_EQ(all_tokens(*nano, Split::val), expected_tokens(700, 50257, 29));
    int64_t largest = 0;
    for (Split split : {Split::train, Split::val})
      for (int64_t t : all_tokens(*nano, split)) largest = std::max(largest, t);
    EXPECT_EQ(nano->vocab_size(), static_cast<uint32_t>(largest + 1));
    EXPECT_NE(nano->describe().find("val.bin"), std::string::npos) << nano->describe();
    // llm.c v1: header then uint16; tiny_val.bin beside tiny_train.bin.
    auto v1 = TokenFile::open(bins() + "/llmc/tiny_train.bin", mode);
    EXPECT_EQ(v1->format(), TokenFormat::llmc_v1);
    EXPECT_EQ(all_tokens(*v1, Split::train), expected_tokens(4000, 50257, 13));
    EXPECT_EQ(all_tokens(*v1, Split::val), expected_tokens(600, 50257, 29));
    // llm.c v7: uint32 tokens beyond 65535; no val file, so its last 10% validates.
    auto v7 = TokenFile::open(bins() + "/llmc7/tiny_train.bin", mode);
    EXPECT_EQ(v7->format(), TokenFormat::llmc_v7);
    auto all = expected_tokens(3000, 128256, 13);
    EXPECT_EQ(all_tokens(*v7, Split::train), std::vector<int64_t>(all.begin(), all.end() - 300));
    EXPECT_EQ(all_tokens(*v7, Split::val), std::vector<int64_t>(all.end() - 300, all.end()));
    EXPECT_GT(v7->vocab_size(), 65536u);
    // --val-data names the validation file explicitly.
    auto given =
        TokenFile::open(bins() + "/llmc7/tiny_train.bin", mode, bins() + "/llmc7/tiny_train.bin");
    EXPECT_EQ(given->tokens(Split::val), 3000u);
  }
}

TEST(TokenFile, RefusesDamagedNanoGptAndLlmcFiles) {
  const std::string dir = temp_dir("bins-bad");
  const std::string v1 = read_file(bins() + "/llmc/tiny_train.bin");
  auto with = [&](const std::string& name, std::string bytes) {
    write_file(dir + "/" + name, bytes);
    return dir + "/" + name;
  };
  auto put_i32 = [](std::string s, size_t at, int32_t v) {
    std::memcpy(s.data() + at * 4, &v, 4);
    return s;
  };
  expect_refused(with("magic_train.bin", put_i32(v1, 0, 20240521)), "llm.c header with magic");
  expect_refused(with("version_train.bin", put_i32(v1, 1, 3)), "version 3");
  expect_refused(with("cut_train.bin", v1.substr(0, v1.size() - 10)), "is truncated");
  expect_refused(with("odd.bin", read_file(bins() + "/nanogpt/train.bin") + "x"),
                 "odd number of bytes");
  expect_refused(with("tiny.bin", std::string(2, '\0')), "too few");
}

TEST(TokenFile, TokensBeyondTheModelsVocabAreRefusedWithTheFix) {
  auto file = TokenFile::open(bins() + "/nanogpt/train.bin");
  ASSERT_GT(file->vocab_size(), 50000u);
  try {
    GptWorkload w(load_gpt_config("gpt-tiny"), file, 1);
    ADD_FAILURE() << "GPT-2 tokens accepted by a 256-token model";
  } catch (const UsageError& e) {
    EXPECT_NE(std::string(e.what()).find("set vocab_size >= " + std::to_string(file->vocab_size())),
              std::string::npos)
        << e.what();
  }
  // With the vocab it needs, the binary trains on it and names the format in its settings.
  const std::string dir = temp_dir("bins-train");
  write_file(dir + "/gpt.json", R"({"n_layer": 1, "n_head": 2, "d_model": 32, "seq_len": 32,
                                    "vocab_size": 50304})");
  auto r = run_autotune({"train", "--model", dir + "/gpt.json", "--data",
                         bins() + "/llmc/tiny_train.bin", "--device", "cpu", "--micro-batch", "2",
                         "--global-batch", "2", "--steps", "2", "--eval-sequences", "2"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.err.find("llm.c .bin v1 (uint16)"), std::string::npos) << r.err;
}
