// Presets: named tuner policies shipped as JSON in profiles/presets/ (low_memory, default,
// high_performance, ultra_low_mem), validated like profiles. A preset sets starting knobs and
// bounds; flags given on the command line win over it.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "autotune/plan.h"
#include "autotune/run_spec.h"

namespace autotune {

struct Preset {
  std::string name;
  std::string description;
  Mode mode = Mode::auto_;
  bool start_small = false;     // "start": "small" | "estimate"
  int64_t max_micro_batch = 0;  // 0: no bound
  std::vector<Precision> precisions;
  std::string checkpointing = "auto";  // auto | on | off
  int64_t eval_batch = 0;
  double margin_percent = 5;
  int64_t monitor_every_steps = 50;
};

// Reads `dir/NAME.json` (or a path). Throws UsageError naming the file and the field.
Preset load_preset(const std::string& name_or_path, const std::string& dir = "profiles/presets");
Preset preset_from_json(const nlohmann::json& j, const std::string& origin);

// Applies a preset to a spec: only knobs the user did not give on the command line.
void apply_preset(const Preset& p, RunSpec& spec, bool margin_given, bool mode_given);

}  // namespace autotune
