// Every workload autotune trains, chosen from --model. Adding one: its own source file with a
// `claims` test and a factory, and one line in this table; the tuner, the trainer and the
// commands talk to the Workload interface only and stay as they are.
#include <memory>

#include "autotune/gpt_workload.h"
#include "autotune/lstm_workload.h"
#include "autotune/torchscript_workload.h"
#include "autotune/workload_registry.h"

namespace autotune {

namespace {
struct WorkloadKind {
  const char* kind;
  bool (*claims)(const std::string& model);  // first match wins
  std::unique_ptr<Workload> (*make)(const RunSpec& spec, const ModePolicy& policy);
};

const WorkloadKind kWorkloads[] = {
    {"torchscript", is_torchscript_model, make_torchscript_workload},  // FILE.pt
    {"lstm", is_lstm_model, make_lstm_workload},                       // lstm-small, ...
    // GPT presets or a JSON config: the default, so an unknown name gets its list of presets.
    {"gpt", [](const std::string&) { return true; }, make_gpt_workload},
};
}  // namespace

std::unique_ptr<Workload> make_workload(const RunSpec& spec, const ModePolicy& policy) {
  for (const auto& w : kWorkloads)
    if (w.claims(spec.model)) return w.make(spec, policy);
  return nullptr;  // unreachable: the last entry claims every model
}

}  // namespace autotune
