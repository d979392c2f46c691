#include "data/data_report.h"

#include <spdlog/fmt/fmt.h>

#include "autotune/size.h"

namespace autotune {

std::string describe_data_report(const nlohmann::json& r) {
  if (!r.is_object()) return {};
  auto u = [&](const char* k) { return r.value(k, uint64_t{0}); };
  std::string out = r.value("read_mode", std::string("?"));
  if (u("cache_capacity_bytes") > 0)
    out +=
        fmt::format(", cache {:.1f}% hit ({}/{}), {} of {}", 100.0 * r.value("cache_hit_rate", 0.0),
                    u("cache_hits"), u("cache_hits") + u("cache_misses"),
                    format_bytes(u("cache_bytes_in_use")), format_bytes(u("cache_capacity_bytes")));
  else
    out += ", no cache";
  if (u("prefetch_batches") > 0)
    out += fmt::format(", prefetch {}: {:.1f}% hit", u("prefetch_batches"),
                       100.0 * r.value("prefetch_hit_rate", 0.0));
  return out;
}

}  // namespace autotune
