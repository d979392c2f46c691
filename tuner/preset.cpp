#include "autotune/preset.h"

#include <filesystem>
#include <fstream>
#include <set>

#include "autotune/errors.h"

namespace autotune {

Preset preset_from_json(const nlohmann::json& j, const std::string& origin) {
  auto bad = [&](const std::string& field, const std::string& why) {
    return UsageError("preset " + origin + ": field '" + field + "' " + why);
  };
  if (!j.is_object()) throw UsageError("preset " + origin + ": expected a JSON object");
  static const std::set<std::string> known = {
      "schema",          "kind",           "name",
      "description",     "mode",           "start",
      "max_micro_batch", "precisions",     "checkpointing",
      "eval_batch",      "margin_percent", "monitor_every_steps"};
  for (auto it = j.begin(); it != j.end(); ++it)
    if (!known.count(it.key())) throw bad(it.key(), "is unknown");
  if (!j.contains("schema") || !j["schema"].is_number_integer() || j["schema"].get<int>() != 1)
    throw bad("schema", "must be 1");
  auto str = [&](const char* f) {
    if (!j.contains(f) || !j[f].is_string()) throw bad(f, "must be a string");
    return j[f].get<std::string>();
  };
  // str(), not j.value(): value() throws json's type_error for a non-string (found by fuzzing).
  if (str("kind") != "preset") throw bad("kind", "must be \"preset\"");
  auto integer = [&](const char* f, int64_t lo, int64_t hi) {
    if (!j.contains(f) || !j[f].is_number_integer()) throw bad(f, "must be an integer");
    int64_t v = j[f].get<int64_t>();
    if (v < lo || v > hi)
      throw bad(f, "must be in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]");
    return v;
  };
  Preset p;
  p.name = str("name");
  p.description = j.contains("description") ? str("description") : "";
  const auto mode = parse_mode(str("mode"));
  if (!mode) throw bad("mode", "must be auto, normal, low or ultra-low");
  p.mode = *mode;
  const std::string start = str("start");
  if (start != "small" && start != "estimate") throw bad("start", "must be small or estimate");
  p.start_small = start == "small";
  p.max_micro_batch = integer("max_micro_batch", 0, 1 << 20);
  if (!j.contains("precisions") || !j["precisions"].is_array() || j["precisions"].empty())
    throw bad("precisions", "must be a non-empty array of fp32, bf16, fp16");
  for (const auto& v : j["precisions"]) {
    if (!v.is_string()) throw bad("precisions", "must hold strings");
    try {
      p.precisions.push_back(parse_precision(v.get<std::string>()));
    } catch (const UsageError&) {
      throw bad("precisions", "has '" + v.get<std::string>() + "'; use fp32, bf16, fp16");
    }
  }
  p.checkpointing = str("checkpointing");
  if (p.checkpointing != "auto" && p.checkpointing != "on" && p.checkpointing != "off")
    throw bad("checkpointing", "must be auto, on or off");
  p.eval_batch = integer("eval_batch", 0, 1 << 20);
  if (!j.contains("margin_percent") || !j["margin_percent"].is_number())
    throw bad("margin_percent", "must be a number");
  p.margin_percent = j["margin_percent"].get<double>();
  if (!(p.margin_percent >= 0 && p.margin_percent < 50))
    throw bad("margin_percent", "must be in [0, 50)");
  p.monitor_every_steps = integer("monitor_every_steps", 0, 1 << 20);
  return p;
}

Preset load_preset(const std::string& name_or_path, const std::string& dir) {
  std::string path = name_or_path;
  if (!std::filesystem::exists(path)) path = dir + "/" + name_or_path + ".json";
  std::ifstream f(path);
  if (!f)
    throw UsageError("unknown preset '" + name_or_path + "': no " + path +
                     "; shipped presets: low_memory, default, high_performance, ultra_low_mem");
  nlohmann::json j = nlohmann::json::parse(f, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) throw UsageError("preset " + path + ": not valid JSON");
  return preset_from_json(j, path);
}

void apply_preset(const Preset& p, RunSpec& spec, bool margin_given, bool mode_given) {
  if (!mode_given) spec.mode = p.mode;
  if (!margin_given) spec.margin_text = std::to_string(p.margin_percent) + "%";
  if (!spec.checkpointing && p.checkpointing != "auto")
    spec.checkpointing = p.checkpointing == "on";
  if (!spec.precision && p.precisions.size() == 1) spec.precision = p.precisions.front();
  if (!spec.eval_batch && p.eval_batch > 0) spec.eval_batch = p.eval_batch;
  spec.preset_start_small = p.start_small;
  spec.preset_max_micro_batch = p.max_micro_batch;
  spec.preset_precisions = p.precisions;
  spec.log_every_memory = p.monitor_every_steps;
}

}  // namespace autotune
