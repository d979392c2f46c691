#include "autotune/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include <nlohmann/json.hpp>

#include "autotune/errors.h"
#include "autotune/splitmix.h"
#include "util/atomic_file.h"

namespace autotune {

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "safetensors files are little-endian");

namespace {

// A header larger than this is not a tensor table (the format's own readers cap it at 100 MB).
constexpr uint64_t kMaxHeaderBytes = 100'000'000;

struct DtypeName {
  const char* name;
  c10::ScalarType type;
};
const DtypeName kDtypes[] = {
    {"F64", c10::ScalarType::Double}, {"F32", c10::ScalarType::Float},
    {"F16", c10::ScalarType::Half},   {"BF16", c10::ScalarType::BFloat16},
    {"I64", c10::ScalarType::Long},   {"I32", c10::ScalarType::Int},
    {"I16", c10::ScalarType::Short},  {"I8", c10::ScalarType::Char},
    {"U8", c10::ScalarType::Byte},    {"BOOL", c10::ScalarType::Bool},
};

[[noreturn]] void refuse(const std::string& path, const std::string& problem) {
  throw UsageError("safetensors file " + one_line(path) + ": " + problem +
                   "; write it with safetensors.torch.save_file (docs/MODELS.md)");
}

}  // namespace

std::string safetensors_dtype(c10::ScalarType t) {
  for (const auto& d : kDtypes)
    if (d.type == t) return d.name;
  throw UsageError(std::string("no safetensors dtype for ") + c10::toString(t));
}

uint64_t SafetensorsEntry::row_bytes() const {
  uint64_t n = c10::elementSize(scalar_type);
  for (size_t i = 1; i < shape.size(); ++i) n *= static_cast<uint64_t>(shape[i]);
  return n;
}

const SafetensorsEntry* SafetensorsFile::find(const std::string& name) const {
  for (const auto& e : entries_)
    if (e.name == name) return &e;
  return nullptr;
}

SafetensorsFile::~SafetensorsFile() {
  if (map_base_ != nullptr) ::munmap(map_base_, map_bytes_);
  if (fd_ >= 0) ::close(fd_);
}

namespace {
// One tensor's entry of the header, checked: a known dtype, a shape of non-negative ints whose
// bytes match its offsets, offsets within the `data_bytes` after the header, and a first
// dimension (the sample count).
SafetensorsEntry parse_entry(const std::string& path, const std::string& name,
                             const nlohmann::json& v, uint64_t data_bytes) {
  const std::string where = "tensor '" + one_line(name) + "'";
  if (!v.is_object() || !v.contains("dtype") || !v.contains("shape") ||
      !v.contains("data_offsets") || !v["dtype"].is_string() || !v["shape"].is_array() ||
      !v["data_offsets"].is_array() || v["data_offsets"].size() != 2)
    refuse(path, where + " needs dtype, shape and data_offsets [begin, end]");
  SafetensorsEntry e;
  e.name = name;
  e.dtype = v["dtype"].get<std::string>();
  const auto known = std::find_if(std::begin(kDtypes), std::end(kDtypes),
                                  [&](const DtypeName& d) { return e.dtype == d.name; });
  if (known == std::end(kDtypes))
    refuse(path, where + " has unknown dtype '" + one_line(e.dtype) +
                     "' (autotune reads F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL)");
  e.scalar_type = known->type;
  uint64_t numel = 1;
  for (const auto& d : v["shape"]) {
    if (!d.is_number_unsigned()) refuse(path, where + " has a shape that is not non-negative ints");
    const uint64_t n = d.get<uint64_t>();
    if (n != 0 && numel > (uint64_t{1} << 50) / n) refuse(path, where + " is impossibly large");
    numel *= n;
    e.shape.push_back(static_cast<int64_t>(n));
  }
  for (const auto& o : v["data_offsets"])
    if (!o.is_number_unsigned()) refuse(path, where + " has offsets that are not non-negative");
  e.begin = v["data_offsets"][0].get<uint64_t>();
  e.end = v["data_offsets"][1].get<uint64_t>();
  if (e.begin > e.end || e.end > data_bytes)
    refuse(path, where + " has data_offsets [" + std::to_string(e.begin) + ", " +
                     std::to_string(e.end) + "] out of range of the " + std::to_string(data_bytes) +
                     " data bytes");
  if (e.end - e.begin != numel * c10::elementSize(e.scalar_type))
    refuse(path, where + ": its shape and dtype need " +
                     std::to_string(numel * c10::elementSize(e.scalar_type)) +
                     " bytes but its offsets span " + std::to_string(e.end - e.begin));
  if (e.shape.empty())
    refuse(path, where +
                     " is a scalar; every tensor needs the sample count as its first "
                     "dimension");
  return e;
}
}  // namespace

std::shared_ptr<SafetensorsFile> SafetensorsFile::open(const std::string& path, ReadMode mode) {
  std::shared_ptr<SafetensorsFile> f(new SafetensorsFile());
  f->path_ = path;
  f->mode_ = mode;
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) refuse(path, "does not exist or cannot be read");
  if (!S_ISREG(st.st_mode)) refuse(path, "is not a regular file");
  f->fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (f->fd_ < 0) refuse(path, std::string("cannot be opened (") + std::strerror(errno) + ")");
  const uint64_t size = static_cast<uint64_t>(st.st_size);
  uint64_t header_bytes = 0;
  if (size < 8 || pread_full(f->fd_, &header_bytes, 8, 0) != 8)
    refuse(path, "is shorter than the 8-byte header length");
  if (header_bytes > size - 8)
    refuse(path, "its header length (" + std::to_string(header_bytes) +
                     " bytes) is longer than the file (" + std::to_string(size) + " bytes)");
  if (header_bytes > kMaxHeaderBytes)
    refuse(path, "its header length " + std::to_string(header_bytes) + " is implausibly large");
  std::string text(header_bytes, '\0');
  if (pread_full(f->fd_, text.data(), header_bytes, 8) != static_cast<ssize_t>(header_bytes))
    refuse(path, "cannot read its header");
  const nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (!j.is_object()) refuse(path, "its header is not a JSON object");
  f->data_offset_ = 8 + header_bytes;
  const uint64_t data_bytes = size - f->data_offset_;
  f->fingerprint_ = splitmix64(size);
  for (unsigned char c : text) f->fingerprint_ = splitmix64(f->fingerprint_ ^ c);

  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string& name = it.key();
    const auto& v = it.value();
    if (name == "__metadata__") {
      if (!v.is_object()) refuse(path, "__metadata__ is not an object of strings");
      for (auto m = v.begin(); m != v.end(); ++m) {
        if (!m.value().is_string()) refuse(path, "__metadata__ '" + m.key() + "' is not a string");
        f->metadata_[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    f->entries_.push_back(parse_entry(path, name, v, data_bytes));
  }
  if (f->entries_.empty()) refuse(path, "holds no tensors");
  // Overlapping byte ranges mean a damaged or hand-made file.
  std::vector<const SafetensorsEntry*> by_begin;
  for (const auto& e : f->entries_) by_begin.push_back(&e);
  std::sort(by_begin.begin(), by_begin.end(), [](auto* a, auto* b) { return a->begin < b->begin; });
  for (size_t i = 1; i < by_begin.size(); ++i)
    if (by_begin[i]->begin < by_begin[i - 1]->end)
      refuse(path, "tensors '" + one_line(by_begin[i - 1]->name) + "' and '" +
                       one_line(by_begin[i]->name) + "' overlap");
  f->samples_ = f->entries_.front().shape[0];
  for (const auto& e : f->entries_)
    if (e.shape[0] != f->samples_)
      refuse(path, "first dimensions disagree: '" + one_line(f->entries_.front().name) + "' has " +
                       std::to_string(f->samples_) + " samples, '" + one_line(e.name) + "' has " +
                       std::to_string(e.shape[0]) +
                       "; every tensor's first dimension is the sample count");
  if (mode == ReadMode::mmap && size > 0) {
    void* base = ::mmap(nullptr, size, PROT_READ, MAP_SHARED, f->fd_, 0);
    if (base == MAP_FAILED)
      throw RuntimeError("cannot memory-map " + one_line(path) + ": " + std::strerror(errno) +
                         "; try --mode ultra-low (positioned reads)");
    f->map_base_ = base;
    f->map_bytes_ = size;
    ::close(std::exchange(f->fd_, -1));
  }
  return f;
}

torch::Tensor SafetensorsFile::gather(const std::string& name,
                                      const std::vector<int64_t>& rows) const {
  const SafetensorsEntry* e = find(name);
  if (e == nullptr) throw std::out_of_range("no tensor '" + name + "' in " + path_);
  std::vector<int64_t> shape = e->shape;
  shape[0] = static_cast<int64_t>(rows.size());
  torch::Tensor out = torch::empty(shape, torch::TensorOptions(e->scalar_type));
  const uint64_t row = e->row_bytes();
  char* dst = static_cast<char*>(out.data_ptr());
  for (size_t i = 0; i < rows.size(); ++i) {
    if (rows[i] < 0 || rows[i] >= samples_)
      throw std::out_of_range("sample " + std::to_string(rows[i]) + " outside " + path_);
    const uint64_t at = data_offset_ + e->begin + static_cast<uint64_t>(rows[i]) * row;
    if (map_base_ != nullptr) {
      std::memcpy(dst + i * row, static_cast<const char*>(map_base_) + at, row);
    } else if (pread_full(fd_, dst + i * row, row, at) != static_cast<ssize_t>(row)) {
      throw RuntimeError("cannot read " + path_ + " (" + std::strerror(errno) +
                         "); was it changed while open?");
    }
  }
  return out;
}

void write_safetensors(const std::string& path,
                       const std::vector<std::pair<std::string, torch::Tensor>>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  nlohmann::json header = nlohmann::json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  uint64_t offset = 0;
  std::vector<torch::Tensor> data;
  for (const auto& [name, t0] : tensors) {
    torch::Tensor t = t0.contiguous().cpu();
    const uint64_t bytes = t.nbytes();
    header[name] = {{"dtype", safetensors_dtype(t.scalar_type())},
                    {"shape", t.sizes().vec()},
                    {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
    data.push_back(t);
  }
  std::string text = header.dump();
  // Pad the header with spaces to 8 bytes, as the reference writer does (aligned data).
  text.append((8 - text.size() % 8) % 8, ' ');
  std::string bytes(8, '\0');
  const uint64_t n = text.size();
  std::memcpy(bytes.data(), &n, 8);
  bytes += text;
  for (const auto& t : data) bytes.append(static_cast<const char*>(t.data_ptr()), t.nbytes());
  atomic_write(path, bytes);
}

}  // namespace autotune
