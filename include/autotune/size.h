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

// The safety margin below a budget: "2%" of it or a size ("256M"). Throws UsageError naming the
// forms, or when the margin is not below the budget (`budget_text` as the user gave it).
// Without a budget it checks the form only.
uint64_t parse_margin(const std::string& text, std::optional<uint64_t> budget_bytes,
                      const std::string& budget_text = "");

// "1.50 GiB", "512.0 MiB", "900 B".
std::string format_bytes(uint64_t bytes);

}  // namespace autotune
