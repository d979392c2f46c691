// Byte sizes as users write them: "10G" == "10GiB" == 10*2^30, "10GB" == 10*10^9, "512M", "0.5T",
// plain bytes, and "80%" of a given total.
#pragma once
#include <cstdint>
#include <optional>
#include <string>

namespace autotune {

// Throws UsageError naming the accepted forms. `total_bytes` resolves percentages; without it a
// percentage is refused.
uint64_t parse_size(const std::string& text, std::optional<uint64_t> total_bytes = std::nullopt);

// "1.50 GiB", "512.0 MiB", "900 B".
std::string format_bytes(uint64_t bytes);

}  // namespace autotune
