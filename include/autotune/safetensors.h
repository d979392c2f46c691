// safetensors files (the Hugging Face tensor file): an 8-byte little-endian header length N, a
// JSON header of name -> {dtype, shape, data_offsets: [begin, end]} (offsets into the bytes after
// the header; an optional "__metadata__" string map), then the raw little-endian tensor bytes.
//
// As autotune's sample data every tensor has the sample count as its first dimension: sample i is
// row i of each named tensor. Rows are gathered through a memory map, or with positioned reads
// into the batch itself (ultra-low-mem: resident memory stays flat).
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <torch/torch.h>

#include "autotune/token_file.h"

namespace autotune {

struct SafetensorsEntry {
  std::string name;
  std::string dtype;  // as in the file: F32, F16, BF16, I64, I32, U8, BOOL, ...
  c10::ScalarType scalar_type = c10::ScalarType::Float;
  std::vector<int64_t> shape;
  uint64_t begin = 0, end = 0;  // byte offsets after the header
  uint64_t row_bytes() const;   // bytes of one sample (a row of the first dimension)
};

class SafetensorsFile {
 public:
  // Opens and validates: header longer than the file, a header that is not a JSON object,
  // unknown dtype, shapes and offsets that do not agree, offsets out of range or overlapping,
  // no tensors, a tensor without a sample dimension, first dimensions that disagree. Each
  // throws UsageError with one line naming the file, the tensor and the fix.
  static std::shared_ptr<SafetensorsFile> open(const std::string& path,
                                               ReadMode mode = ReadMode::mmap);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  ReadMode mode() const { return mode_; }
  const std::vector<SafetensorsEntry>& entries() const { return entries_; }
  const SafetensorsEntry* find(const std::string& name) const;
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  int64_t samples() const { return samples_; }
  // Content identity for profile fingerprints: a hash of the header and the file size.
  uint64_t fingerprint() const { return fingerprint_; }

  // Rows `rows` of tensor `name`, gathered into a new CPU tensor [rows.size(), ...].
  torch::Tensor gather(const std::string& name, const std::vector<int64_t>& rows) const;

 private:
  SafetensorsFile() = default;
  std::string path_;
  ReadMode mode_ = ReadMode::mmap;
  int fd_ = -1;
  void* map_base_ = nullptr;
  size_t map_bytes_ = 0;
  uint64_t data_offset_ = 0;  // 8 + header length
  std::vector<SafetensorsEntry> entries_;
  std::map<std::string, std::string> metadata_;
  int64_t samples_ = 0;
  uint64_t fingerprint_ = 0;
};

// Writes `tensors` (contiguous CPU tensors, in this order) as a safetensors file, atomically.
void write_safetensors(const std::string& path,
                       const std::vector<std::pair<std::string, torch::Tensor>>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

// The safetensors dtype name of a scalar type ("F32", ...); throws for one it has none for.
std::string safetensors_dtype(c10::ScalarType t);

}  // namespace autotune
