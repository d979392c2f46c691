// safetensors as sample data: every dtype round-trips (C++ <-> the files Python writes), rows are
// gathered the same by memory map and by positioned reads, and each kind of bad file is refused
// with one line and exit code 2.
#include <gtest/gtest.h>

#include <cstring>

#include <nlohmann/json.hpp>

#include "autotune/errors.h"
#include "autotune/safetensors.h"
#include "test_support.h"

namespace tu = autotune::testing;
using namespace autotune;

namespace {

const std::string kScript =
    std::string(AUTOTUNE_SOURCE_DIR) + "/tests/fixtures/safetensors_dtypes.py";

// The pattern of tests/fixtures/safetensors_dtypes.py, sample i element j = pattern(i * 3 + j).
torch::Tensor pattern(c10::ScalarType dtype) {
  auto k = torch::arange(15, torch::kFloat64).reshape({5, 3});
  if (dtype == torch::kBool) return k.to(torch::kLong).remainder(3).eq(0);
  if (dtype == torch::kUInt8) return (k * 17).remainder(256).to(dtype);
  if (c10::isFloatingType(dtype)) return ((k - 7) * 0.375).to(dtype);
  return ((k - 7) * 1000003).to(dtype);
}

const std::vector<std::pair<std::string, c10::ScalarType>> kDtypes = {
    {"f32", torch::kFloat32}, {"f16", torch::kFloat16}, {"bf16", torch::kBFloat16},
    {"f64", torch::kFloat64}, {"i64", torch::kInt64},   {"i32", torch::kInt32},
    {"u8", torch::kUInt8},    {"bool", torch::kBool}};

// A file from a header (JSON text) and raw data bytes.
std::string file_bytes(const std::string& header, const std::string& data, int64_t claimed = -1) {
  std::string out(8, '\0');
  const uint64_t n = claimed >= 0 ? static_cast<uint64_t>(claimed) : header.size();
  std::memcpy(out.data(), &n, 8);
  return out + header + data;
}

void expect_refused(const std::string& path, const std::string& problem) {
  for (ReadMode mode : {ReadMode::mmap, ReadMode::pread}) {
    try {
      SafetensorsFile::open(path, mode);
      ADD_FAILURE() << path << " was accepted; expected: " << problem;
    } catch (const UsageError& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find(problem), std::string::npos) << msg;
      EXPECT_NE(msg.find(path), std::string::npos) << msg;
      EXPECT_EQ(msg.find('\n'), std::string::npos) << "not one line: " << msg;
    }
  }
}

}  // namespace

TEST(Safetensors, EveryDtypeRoundTripsBothWays) {
  const std::string dir = tu::temp_dir("st-dtypes");
  // Python writes, C++ reads.
  auto w = tu::run_python({kScript, "write", dir + "/py.safetensors"});
  ASSERT_EQ(w.exit_code, 0) << w.err;
  for (ReadMode mode : {ReadMode::mmap, ReadMode::pread}) {
    auto f = SafetensorsFile::open(dir + "/py.safetensors", mode);
    EXPECT_EQ(f->samples(), 5);
    for (const auto& [name, dtype] : kDtypes) {
      const torch::Tensor got = f->gather(name, {0, 1, 2, 3, 4});
      EXPECT_EQ(got.scalar_type(), dtype) << name;
      EXPECT_TRUE(torch::equal(got, pattern(dtype))) << name;
      // Rows in any order: sample 3 then sample 1.
      EXPECT_TRUE(torch::equal(f->gather(name, {3, 1}),
                               pattern(dtype).index_select(0, torch::tensor({3, 1}))))
          << name;
    }
  }
  // C++ writes, Python reads.
  std::vector<std::pair<std::string, torch::Tensor>> tensors;
  for (const auto& [name, dtype] : kDtypes) tensors.emplace_back(name, pattern(dtype));
  write_safetensors(dir + "/cpp.safetensors", tensors, {{"made_by", "test"}});
  auto check = tu::run_python({kScript, "check", dir + "/cpp.safetensors"});
  EXPECT_EQ(check.exit_code, 0) << check.err;
  EXPECT_EQ(SafetensorsFile::open(dir + "/cpp.safetensors")->metadata().at("made_by"), "test");
}

TEST(Safetensors, EachBadFileIsRefusedWithItsLine) {
  const std::string dir = tu::temp_dir("st-bad");
  auto with = [&](const std::string& name, const std::string& bytes) {
    tu::write_file(dir + "/" + name, bytes);
    return dir + "/" + name;
  };
  const std::string data(64, '\x01');  // 16 floats
  auto entry = [](const char* dtype, const char* shape, int b, int e) {
    return std::string("\"t\":{\"dtype\":\"") + dtype + "\",\"shape\":" + shape +
           ",\"data_offsets\":[" + std::to_string(b) + "," + std::to_string(e) + "]}";
  };
  // The fixture itself is fine: every refusal below comes from the one thing changed.
  EXPECT_NO_THROW(SafetensorsFile::open(
      with("good.safetensors", file_bytes("{" + entry("F32", "[4,4]", 0, 64) + "}", data))));

  expect_refused(with("long.safetensors", file_bytes("{}", data, 1 << 20)), "longer than the file");
  expect_refused(with("json.safetensors", file_bytes("[1,2]", data)), "not a JSON object");
  expect_refused(
      with("dtype.safetensors", file_bytes("{" + entry("F8", "[4,4]", 0, 64) + "}", data)),
      "unknown dtype 'F8'");
  expect_refused(
      with("range.safetensors", file_bytes("{" + entry("F32", "[8,4]", 0, 128) + "}", data)),
      "out of range");
  expect_refused(
      with("span.safetensors", file_bytes("{" + entry("F32", "[4,4]", 0, 60) + "}", data)),
      "offsets span 60");
  expect_refused(
      with("overlap.safetensors",
           file_bytes("{\"a\":{\"dtype\":\"F32\",\"shape\":[2,4],\"data_offsets\":[0,32]},"
                      "\"b\":{\"dtype\":\"F32\",\"shape\":[2,4],\"data_offsets\":[16,48]}}",
                      data)),
      "overlap");
  expect_refused(
      with("dims.safetensors",
           file_bytes("{\"a\":{\"dtype\":\"F32\",\"shape\":[2,4],\"data_offsets\":[0,32]},"
                      "\"b\":{\"dtype\":\"F32\",\"shape\":[4,2],\"data_offsets\":[32,64]}}",
                      data)),
      "first dimensions disagree");
  expect_refused(with("scalar.safetensors", file_bytes("{" + entry("F32", "[]", 0, 4) + "}", data)),
                 "scalar");
  expect_refused(with("empty.safetensors", file_bytes("{}", data)), "no tensors");
  expect_refused(with("short.safetensors", "abc"), "shorter than the 8-byte header");

  // Through the binary: one line, exit 2.
  auto r = tu::run_autotune({"train", "--model", dir + "/m.pt", "--data",
                             dir + "/overlap.safetensors", "--device", "cpu"});
  EXPECT_EQ(r.exit_code, 2) << r.err;
}
