#include "autotune/size.h"

#include <cctype>
#include <cmath>
#include <cstdio>

#include "autotune/errors.h"

namespace autotune {

namespace {
[[noreturn]] void bad_size(const std::string& text, const std::string& why) {
  throw UsageError("invalid size '" + text + "': " + why +
                   "; write e.g. 10G (=10 GiB), 10GiB, 10GB (=10^10 bytes), 512M, 0.5T, 1048576 "
                   "or 80%");
}
}  // namespace

uint64_t parse_size(const std::string& text, std::optional<uint64_t> total_bytes) {
  std::string s;
  for (char c : text)
    if (!std::isspace(static_cast<unsigned char>(c))) s += c;
  if (s.empty()) bad_size(text, "empty");
  size_t i = 0;
  while (i < s.size() && (std::isdigit(static_cast<unsigned char>(s[i])) || s[i] == '.')) ++i;
  std::string number = s.substr(0, i), unit = s.substr(i);
  if (number.empty() || number == "." || number.find('.') != number.rfind('.'))
    bad_size(text, "it must start with a positive number");
  double value = std::strtod(number.c_str(), nullptr);
  for (auto& c : unit) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));

  double bytes = 0;
  if (unit == "%") {
    if (!total_bytes) bad_size(text, "a percentage needs a known device total");
    if (value <= 0 || value > 100) bad_size(text, "a percentage must be in (0, 100]");
    bytes = value / 100.0 * static_cast<double>(*total_bytes);
  } else {
    double mult = 0;
    struct Unit {
      const char* name;
      double mult;
    };
    static const Unit units[] = {
        {"", 1},       {"B", 1},        {"K", 0x1p10},   {"KIB", 0x1p10}, {"KB", 1e3},
        {"M", 0x1p20}, {"MIB", 0x1p20}, {"MB", 1e6},     {"G", 0x1p30},   {"GIB", 0x1p30},
        {"GB", 1e9},   {"T", 0x1p40},   {"TIB", 0x1p40}, {"TB", 1e12},
    };
    for (const auto& u : units)
      if (unit == u.name) mult = u.mult;
    if (mult == 0) bad_size(text, "unknown unit '" + s.substr(i) + "'");
    bytes = value * mult;
  }
  // 2^63: beyond any real memory and the largest value that converts exactly.
  if (!std::isfinite(bytes) || bytes >= 0x1p63) bad_size(text, "too large");
  if (bytes < 1) bad_size(text, "must be at least 1 byte");
  return static_cast<uint64_t>(bytes);
}

std::string format_bytes(uint64_t bytes) {
  static const char* names[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB"};
  double v = static_cast<double>(bytes);
  int k = 0;
  while (v >= 1024.0 && k < 5) {
    v /= 1024.0;
    ++k;
  }
  char buf[32];
  if (k == 0)
    std::snprintf(buf, sizeof buf, "%llu B", static_cast<unsigned long long>(bytes));
  else
    std::snprintf(buf, sizeof buf, "%.2f %s", v, names[k]);
  return buf;
}

uint64_t parse_margin(const std::string& text, std::optional<uint64_t> budget_bytes,
                      const std::string& budget_text) {
  if (!text.empty() && text.back() == '%') {
    double pct = -1;
    try {
      size_t used = 0;
      pct = std::stod(text.substr(0, text.size() - 1), &used);
      if (used != text.size() - 1) pct = -1;
    } catch (const std::exception&) {
      pct = -1;
    }
    if (!(pct >= 0 && pct < 100))
      throw UsageError("invalid --margin '" + text + "': use a percentage in [0, 100) or a size");
    return budget_bytes ? static_cast<uint64_t>(static_cast<double>(*budget_bytes) * pct / 100.0)
                        : 0;
  }
  const uint64_t bytes = parse_size(text);
  if (budget_bytes && bytes >= *budget_bytes)
    throw UsageError("--margin " + text + " is not below the budget " + budget_text);
  return bytes;
}

}  // namespace autotune
