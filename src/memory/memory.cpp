#include "autotune/memory.h"

#include "autotune/machine.h"
#include "memory/cpu_allocator.h"

#include <malloc.h>
#include <sys/mman.h>

#include <ATen/DeviceAccelerator.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <charconv>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <string_view>
#include <utility>
#include <vector>

namespace autotune {

#ifdef AUTOTUNE_WITH_CUDA
namespace detail {
std::string cuda_device_name(c10::DeviceIndex index);  // src/memory/cuda_memory.cpp
}
#endif

// ---- process and system readers -----------------------------------------------------------------
namespace {

namespace fs = std::filesystem;

// /proc and cgroup files are small; a file that is not (a wrong path, a fixture gone wrong) is read
// only this far.
constexpr size_t kMaxReadBytes = 1 << 20;
// cgroup v1 writes "no limit" as LONG_MAX rounded down to a page (9223372036854771712); anything
// this large is no limit either.
constexpr uint64_t kNoLimitBytes = uint64_t{1} << 60;

std::optional<std::string> read_small_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) return std::nullopt;
  std::string out;
  char buf[4096];
  while (out.size() < kMaxReadBytes && f.read(buf, sizeof buf).gcount() > 0)
    out.append(buf, static_cast<size_t>(f.gcount()));
  return out;
}

std::string_view trim(std::string_view s) {
  const char* ws = " \t\r\n";
  const size_t b = s.find_first_not_of(ws);
  if (b == std::string_view::npos) return {};
  return s.substr(b, s.find_last_not_of(ws) - b + 1);
}

// The whole of `s` as an unsigned decimal; nullopt for empty, garbage, sign or overflow.
std::optional<uint64_t> parse_u64(std::string_view s) {
  s = trim(s);
  if (s.empty()) return std::nullopt;
  uint64_t v = 0;
  auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (ec != std::errc() || end != s.data() + s.size()) return std::nullopt;
  return v;
}

// "  12345 kB" -> bytes. Linux writes kB (KiB); other units are accepted for robustness, anything
// unparseable or overflowing reads as 0.
uint64_t parse_kb_field(std::string_view value) {
  value = trim(value);
  const size_t digits_end = value.find_first_not_of("0123456789");
  const auto number = parse_u64(value.substr(0, digits_end));
  if (!number) return 0;
  const std::string_view unit =
      digits_end == std::string_view::npos ? std::string_view{} : trim(value.substr(digits_end));
  uint64_t mult = 0;
  if (unit.empty() || unit == "B")
    mult = 1;
  else if (unit == "kB" || unit == "KB" || unit == "k" || unit == "KiB")
    mult = uint64_t{1} << 10;
  else if (unit == "mB" || unit == "MB" || unit == "MiB")
    mult = uint64_t{1} << 20;
  else if (unit == "gB" || unit == "GB" || unit == "GiB")
    mult = uint64_t{1} << 30;
  if (mult == 0 || *number > std::numeric_limits<uint64_t>::max() / mult) return 0;
  return *number * mult;
}

// Fields of a "Key:   value unit" file (/proc/self/status, /proc/meminfo); first occurrence wins.
template <typename Fn>
void for_each_field(const std::string& text, Fn&& fn) {
  size_t pos = 0;
  while (pos < text.size()) {
    size_t eol = text.find('\n', pos);
    if (eol == std::string::npos) eol = text.size();
    const std::string_view line(text.data() + pos, eol - pos);
    const size_t colon = line.find(':');
    if (colon != std::string_view::npos) fn(trim(line.substr(0, colon)), line.substr(colon + 1));
    pos = eol + 1;
  }
}

// A cgroup limit file: "max" (v2), a huge number (v1) or 0 (a cgroup nothing could run in, so an
// odd read) mean no limit.
std::optional<uint64_t> read_limit_file(const fs::path& path) {
  const auto text = read_small_file(path.string());
  if (!text) return std::nullopt;
  const auto v = parse_u64(*text);
  if (!v || *v == 0 || *v >= kNoLimitBytes) return std::nullopt;
  return v;
}

std::optional<uint64_t> read_usage_file(const fs::path& path) {
  const auto text = read_small_file(path.string());
  if (!text) return std::nullopt;
  const auto v = parse_u64(*text);
  if (!v || *v >= kNoLimitBytes) return std::nullopt;
  return v;
}

struct CgroupPaths {
  std::string v2;  // "0::/a/b" -> "a/b"
  std::string v1;  // "4:memory:/a/b" -> "a/b"
};

// A path that climbs out of the mount (cgroup namespaces print "/../.." for foreign cgroups)
// is ignored: the mount root is then the process's own cgroup.
std::string sanitize_relative(std::string_view p) {
  p = trim(p);
  while (!p.empty() && p.front() == '/') p.remove_prefix(1);
  if (p.find("..") != std::string_view::npos) return {};
  return std::string(p);
}

CgroupPaths read_proc_cgroup(const std::string& path) {
  CgroupPaths out;
  const auto text = read_small_file(path);
  if (!text) return out;
  size_t pos = 0;
  while (pos < text->size()) {
    size_t eol = text->find('\n', pos);
    if (eol == std::string::npos) eol = text->size();
    const std::string_view line(text->data() + pos, eol - pos);
    pos = eol + 1;
    const size_t c1 = line.find(':');
    const size_t c2 = c1 == std::string_view::npos ? c1 : line.find(':', c1 + 1);
    if (c2 == std::string_view::npos) continue;
    const std::string_view id = line.substr(0, c1);
    const std::string_view controllers = line.substr(c1 + 1, c2 - c1 - 1);
    const std::string_view rel = line.substr(c2 + 1);
    if (id == "0" && controllers.empty()) {
      out.v2 = sanitize_relative(rel);
      continue;
    }
    size_t start = 0;
    while (start <= controllers.size()) {
      size_t comma = controllers.find(',', start);
      if (comma == std::string_view::npos) comma = controllers.size();
      if (controllers.substr(start, comma - start) == "memory") out.v1 = sanitize_relative(rel);
      start = comma + 1;
    }
  }
  return out;
}

struct CgroupReading {
  std::optional<uint64_t> limit_bytes;
  std::optional<uint64_t> usage_bytes;
};

// Walks from base/rel up to base: the tightest limit on the way binds, with the usage of the
// cgroup that sets it; without a limit, the usage of the process's own (deepest readable) cgroup.
void walk_cgroup(const fs::path& base, const std::string& rel, const char* limit_name,
                 const char* usage_name, CgroupReading& out) {
  std::error_code ec;
  if (!fs::is_directory(base, ec)) return;
  std::vector<fs::path> dirs = {base};  // base, base/a, base/a/b: the walk goes backwards
  for (const auto& part : fs::path(rel))
    if (!part.empty() && part != "/") dirs.push_back(dirs.back() / part);
  std::optional<uint64_t> leaf_usage;
  for (auto it = dirs.rbegin(); it != dirs.rend(); ++it) {
    if (!fs::is_directory(*it, ec)) continue;  // the mount root may already be our cgroup
    const auto usage = read_usage_file(*it / usage_name);
    if (!leaf_usage) leaf_usage = usage;
    const auto limit = read_limit_file(*it / limit_name);
    if (limit && (!out.limit_bytes || *limit < *out.limit_bytes)) {
      out.limit_bytes = limit;
      out.usage_bytes = usage ? usage : leaf_usage;
    }
  }
  if (!out.limit_bytes && !out.usage_bytes) out.usage_bytes = leaf_usage;
}

}  // namespace

ProcessMemory read_process_memory(const std::string& status_path) {
  ProcessMemory pm;
  const auto text = read_small_file(status_path);
  if (!text) return pm;
  bool have_rss = false, have_hwm = false;
  for_each_field(*text, [&](std::string_view key, std::string_view value) {
    if (key == "VmRSS" && !have_rss) {
      pm.rss_bytes = parse_kb_field(value);
      have_rss = true;
    } else if (key == "VmHWM" && !have_hwm) {
      pm.peak_rss_bytes = parse_kb_field(value);
      have_hwm = true;
    }
  });
  return pm;
}

bool reset_peak_rss(const std::string& clear_refs_path) {
  std::ofstream f(clear_refs_path);
  if (!f) return false;
  f << "5";
  f.flush();
  return static_cast<bool>(f);
}

uint64_t SystemMemory::effective_total_bytes() const {
  if (!cgroup_limit_bytes) return total_bytes;
  if (total_bytes == 0) return *cgroup_limit_bytes;
  return std::min(total_bytes, *cgroup_limit_bytes);
}

uint64_t SystemMemory::effective_available_bytes() const {
  if (!cgroup_limit_bytes) return available_bytes;
  const uint64_t usage = cgroup_usage_bytes.value_or(0);
  const uint64_t headroom = *cgroup_limit_bytes > usage ? *cgroup_limit_bytes - usage : 0;
  if (total_bytes == 0) return headroom;  // no meminfo: the cgroup is all we know
  return std::min(available_bytes, headroom);
}

SystemMemory read_system_memory(const std::string& meminfo_path, const std::string& cgroup_root) {
  const std::string proc_cgroup = cgroup_root == "/sys/fs/cgroup" ? "/proc/self/cgroup" : "";
  return read_system_memory(meminfo_path, cgroup_root, proc_cgroup);
}

SystemMemory read_system_memory(const std::string& meminfo_path, const std::string& cgroup_root,
                                const std::string& proc_cgroup_path) {
  SystemMemory sm;
  if (const auto text = read_small_file(meminfo_path)) {
    std::optional<uint64_t> available, free_b, buffers, cached;
    for_each_field(*text, [&](std::string_view key, std::string_view value) {
      if (key == "MemTotal" && sm.total_bytes == 0) sm.total_bytes = parse_kb_field(value);
      if (key == "MemAvailable" && !available) available = parse_kb_field(value);
      if (key == "MemFree" && !free_b) free_b = parse_kb_field(value);
      if (key == "Buffers" && !buffers) buffers = parse_kb_field(value);
      if (key == "Cached" && !cached) cached = parse_kb_field(value);
    });
    // Kernels before 3.14 have no MemAvailable: free + page cache is the usual stand-in.
    if (available)
      sm.available_bytes = *available;
    else if (free_b)
      sm.available_bytes = *free_b + buffers.value_or(0) + cached.value_or(0);
    if (sm.total_bytes != 0) sm.available_bytes = std::min(sm.available_bytes, sm.total_bytes);
  }

  const CgroupPaths rel =
      proc_cgroup_path.empty() ? CgroupPaths{} : read_proc_cgroup(proc_cgroup_path);
  const fs::path root(cgroup_root);
  CgroupReading v2, v1;
  // v2 at the root (unified) or under unified/ (hybrid); v1 under memory/.
  walk_cgroup(root, rel.v2, "memory.max", "memory.current", v2);
  if (!v2.limit_bytes && !v2.usage_bytes)
    walk_cgroup(root / "unified", rel.v2, "memory.max", "memory.current", v2);
  walk_cgroup(root / "memory", rel.v1, "memory.limit_in_bytes", "memory.usage_in_bytes", v1);

  const CgroupReading* bound = nullptr;
  for (const CgroupReading* r : {&v2, &v1})
    if (r->limit_bytes && (!bound || *r->limit_bytes < *bound->limit_bytes)) bound = r;
  if (bound) {
    sm.cgroup_limit_bytes = bound->limit_bytes;
    sm.cgroup_usage_bytes = bound->usage_bytes;
  } else {
    sm.cgroup_usage_bytes = v2.usage_bytes ? v2.usage_bytes : v1.usage_bytes;
  }
  return sm;
}

// ---- device-generic meter ----------------------------------------------------------------------
namespace {

bool accelerator_usable(torch::Device device) {
  if (device.type() == c10::DeviceType::CPU) return false;
  try {
    const auto acc = at::accelerator::getAccelerator(false);
    return acc && *acc == device.type() && at::accelerator::deviceCount() > 0;
  } catch (const std::exception&) {
    return false;
  }
}

// Whether writing "5" to clear_refs really lowers VmHWM here (a sandbox may accept the write and
// ignore it): raise the high-water mark with 16 MiB of touched pages, free them, reset, and look.
bool peak_rss_reset_works() {
  constexpr size_t kProbeBytes = 16 << 20;
  constexpr uint64_t kMustDropBytes = 8 << 20;
  if (read_process_memory().peak_rss_bytes == 0) return false;
  void* p = mmap(nullptr, kProbeBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return false;
  std::memset(p, 1, kProbeBytes);
  munmap(p, kProbeBytes);
  const uint64_t hwm_before = read_process_memory().peak_rss_bytes;
  if (!reset_peak_rss()) return false;
  const uint64_t hwm_after = read_process_memory().peak_rss_bytes;
  return hwm_after != 0 && hwm_after + kMustDropBytes <= hwm_before;
}

bool peak_rss_resettable_here() {
  const char* off = std::getenv("AUTOTUNE_NO_PEAK_RSS_RESET");
  if (off != nullptr && *off != '\0' && std::string_view(off) != "0") return false;
  static const bool works = peak_rss_reset_works();
  return works;
}

// (free, total) of an accelerator; zeros where its allocator does not implement the query (it
// throws "not implemented" on some backends) rather than failing the whole meter.
std::pair<uint64_t, uint64_t> memory_info_or_zero(c10::DeviceIndex index) {
  try {
    const auto [free_bytes, total_bytes] = at::accelerator::getMemoryInfo(index);
    return {free_bytes, total_bytes};
  } catch (const c10::Error&) {
    return {0, 0};
  }
}

uint64_t to_u64(int64_t v) {
  return v > 0 ? static_cast<uint64_t>(v) : 0;
}

}  // namespace

MemoryMeter::MemoryMeter(torch::Device device) : device_(device) {
  cpu_alloc::install();
  peak_rss_resettable_ = peak_rss_resettable_here();
  accelerator_stats_ = accelerator_usable(device);
  // "cuda" means the current device: fix it now so every later reading is of the same one.
  if (accelerator_stats_ && !device_.has_index())
    device_ = torch::Device(device_.type(), at::accelerator::getDeviceIndex());
  remeasure_baseline();
}

void MemoryMeter::remeasure_baseline() {
  const uint64_t rss = read_process_memory().rss_bytes;
  const uint64_t reserved = to_u64(cpu_alloc::reserved_bytes());
  baseline_bytes_ = rss > reserved ? rss - reserved : 0;
  if (accelerator_stats_) {
    const auto [free_bytes, total_bytes] = memory_info_or_zero(device_.index());
    const auto stats = at::accelerator::getDeviceStats(device_.index());
    const uint64_t device_reserved = to_u64(stats.reserved_bytes[0].current);
    const uint64_t used = total_bytes > free_bytes ? total_bytes - free_bytes : 0;
    // On a shared device this also holds other processes' memory: the budget then counts it,
    // which errs on the safe side.
    const uint64_t outside = device_reserved + excluded_device_bytes_;
    context_bytes_ = used > outside ? used - outside : 0;
  }
}

void MemoryMeter::reset_peaks() {
  cpu_alloc::reset_peak();
  if (peak_rss_resettable_) reset_peak_rss();
  if (accelerator_stats_) at::accelerator::resetPeakStats(device_.index());
}

MemorySample MemoryMeter::sample() const {
  MemorySample s;
  if (accelerator_stats_) {
    const auto stats = at::accelerator::getDeviceStats(device_.index());
    s.device_allocated_bytes = to_u64(stats.allocated_bytes[0].current);
    s.device_peak_allocated_bytes = to_u64(stats.allocated_bytes[0].peak);
    s.device_reserved_bytes = to_u64(stats.reserved_bytes[0].current);
    s.device_peak_reserved_bytes = to_u64(stats.reserved_bytes[0].peak);
    s.device_num_ooms = to_u64(stats.num_ooms);
    s.device_num_alloc_retries = to_u64(stats.num_alloc_retries);
    const auto [free_bytes, total_bytes] = memory_info_or_zero(device_.index());
    s.device_free_bytes = free_bytes;
    s.device_total_bytes = total_bytes;
  }
  s.tensor_bytes = to_u64(cpu_alloc::current_bytes());
  s.peak_tensor_bytes = to_u64(cpu_alloc::peak_bytes());
  s.reserved_bytes = to_u64(cpu_alloc::reserved_bytes());
  s.peak_reserved_bytes = to_u64(cpu_alloc::peak_reserved_bytes());
  const ProcessMemory pm = read_process_memory();
  s.rss_bytes = pm.rss_bytes;
  s.peak_rss_bytes = std::max(pm.peak_rss_bytes, pm.rss_bytes);
  s.budget_bytes_now = budget_figure_now(s);
  s.budget_bytes_peak = budget_figure_peak(s);
  return s;
}

uint64_t MemoryMeter::budget_figure_peak(const MemorySample& s) const {
  if (accelerator_stats_) return s.device_peak_reserved_bytes + context_bytes_;
  // What the allocator held at its peak, on top of the baseline: exact where RSS lags behind it
  // (pages reserved but not yet touched).
  const uint64_t reserved_figure = baseline_bytes_ + s.peak_reserved_bytes;
  if (peak_rss_resettable_) return std::max({s.peak_rss_bytes, s.rss_bytes, reserved_figure});
  // VmHWM is since process start: the reserved peak stands in for it, the RSS now is a floor.
  return std::max(reserved_figure, s.rss_bytes);
}

uint64_t MemoryMeter::budget_figure_now(const MemorySample& s) const {
  if (accelerator_stats_) return s.device_reserved_bytes + context_bytes_;
  return s.rss_bytes;
}

uint64_t MemoryMeter::trim_heap_above(uint64_t slack_bytes) const {
  if (!device_.is_cpu()) return 0;
  const uint64_t rss = read_process_memory().rss_bytes;
  const uint64_t accounted = baseline_bytes_ + to_u64(cpu_alloc::reserved_bytes());
  if (rss <= accounted + slack_bytes) return 0;
  malloc_trim(0);
  const uint64_t after = read_process_memory().rss_bytes;
  return rss > after ? rss - after : 0;
}

void MemoryMeter::release_cache() const {
  if (accelerator_stats_) at::accelerator::emptyCache();
  cpu_alloc::release_cache();
  malloc_trim(0);
}

DeviceMemoryInfo device_memory_info(torch::Device device) {
  DeviceMemoryInfo info;
  if (device.type() == c10::DeviceType::CPU) {
    // The host is the device: the same figures that choose the memory mode (and their
    // AUTOTUNE_FAKE_MEM_TOTAL / AVAILABLE testing aid).
    const MachineFacts host = read_machine_facts();
    info.name = "cpu";
    info.total_bytes = host.total_bytes;
    info.free_bytes = host.available_bytes;
    return info;
  }
  if (!accelerator_usable(device)) {
    info.name = device.str() + " (not available)";
    return info;
  }
  const c10::DeviceIndex index =
      device.has_index() ? device.index() : at::accelerator::getDeviceIndex();
  const auto [free_bytes, total_bytes] = memory_info_or_zero(index);
  info.total_bytes = total_bytes;
  info.free_bytes = free_bytes;
  info.name = torch::Device(device.type(), index).str();
#ifdef AUTOTUNE_WITH_CUDA
  if (device.type() == c10::DeviceType::CUDA) info.name += " " + detail::cuda_device_name(index);
#endif
  return info;
}

#ifndef AUTOTUNE_WITH_CUDA
bool enforce_device_budget(torch::Device device, uint64_t budget_bytes, uint64_t context_bytes) {
  return false;
}
#endif

}  // namespace autotune
