#include "autotune/plan.h"

#include <sstream>

#include "autotune/errors.h"

namespace autotune {

std::string to_string(Precision p) {
  switch (p) {
    case Precision::fp32:
      return "fp32";
    case Precision::bf16:
      return "bf16";
    case Precision::fp16:
      return "fp16";
  }
  return "?";
}

Precision parse_precision(const std::string& s) {
  if (s == "fp32") return Precision::fp32;
  if (s == "bf16") return Precision::bf16;
  if (s == "fp16") return Precision::fp16;
  throw UsageError("invalid precision '" + s + "': use fp32, bf16 or fp16");
}

std::string Plan::describe() const {
  static const Plan defaults;
  std::ostringstream o;
  for_each_knob([&](const auto& k) {
    const auto& v = this->*k.field;
    if (k.shown == Shown::never || (k.shown == Shown::unless_default && v == defaults.*k.field))
      return;
    if (o.tellp() > 0) o << ' ';
    if (k.shown != Shown::bare) o << k.json_key() << '=';
    o << knob_text(v);
  });
  return o.str();
}

bool Plan::operator==(const Plan& o) const {
  bool same = true;
  for_each_knob([&](const auto& k) { same = same && this->*k.field == o.*k.field; });
  return same;
}

nlohmann::json pins_json(const Pins& pins) {
  nlohmann::json j = nlohmann::json::object();
  for_each_knob([&](const auto& k) {
    if (k.in_fingerprint && pins.*k.pin) j[k.key] = knob_json(*(pins.*k.pin));
  });
  return j;
}

void apply_pins(const Pins& pins, Plan& plan, std::vector<std::string>* overridden) {
  for_each_knob([&](const auto& k) {
    if constexpr (std::decay_t<decltype(k)>::kDirect) {
      if (k.batch_split || !(pins.*k.pin)) return;
      plan.*k.field = *(pins.*k.pin);
      if (overridden) overridden->push_back(std::string(k.key) + " (--" + k.flag + ")");
    }
  });
}

std::vector<std::pair<std::string, std::string>> plan_rows(const Plan& plan) {
  std::vector<std::pair<std::string, std::string>> rows;
  for_each_knob([&](const auto& k) {
    if (k.shown != Shown::never) rows.push_back({k.json_key(), knob_text(plan.*k.field)});
  });
  return rows;
}

void to_json(nlohmann::json& j, const Plan& p) {
  static const Plan defaults;
  j = nlohmann::json::object();
  for_each_knob([&](const auto& k) {
    if (k.written_at_default || p.*k.field != defaults.*k.field)
      j[k.json_key()] = knob_json(p.*k.field);
  });
}

namespace {
void read_knob(const nlohmann::json& j, int64_t& v) {
  v = j.get<int64_t>();
}
void read_knob(const nlohmann::json& j, bool& v) {
  v = j.get<bool>();
}
void read_knob(const nlohmann::json& j, Precision& v) {
  v = parse_precision(j.get<std::string>());
}
}  // namespace

void from_json(const nlohmann::json& j, Plan& p) {
  p = Plan{};
  bool valid = true;
  for_each_knob([&](const auto& k) {
    auto& v = p.*k.field;
    if (k.required_in_json || j.contains(k.json_key())) read_knob(j.at(k.json_key()), v);
    if constexpr (std::is_same_v<std::decay_t<decltype(v)>, int64_t>)
      valid = valid && v >= k.min_value;
  });
  if (!valid) throw UsageError("plan has a non-positive micro_batch/grad_accum or a negative size");
}

}  // namespace autotune
