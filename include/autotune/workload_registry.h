// The workload a spec's --model names, from the table in src/models/workload_registry.cpp: a
// TorchScript FILE.pt on safetensors data, an LSTM preset, or a GPT preset/JSON on a token file
// (docs/MODELS.md). The data path follows the memory mode's policy (read mode, cache cap,
// prefetch).
#pragma once
#include <memory>

#include "autotune/machine.h"
#include "autotune/run_spec.h"
#include "autotune/workload.h"

namespace autotune {

// Throws UsageError naming the fix for an unknown model or unreadable data.
std::unique_ptr<Workload> make_workload(const RunSpec& spec, const ModePolicy& policy = {});

}  // namespace autotune
