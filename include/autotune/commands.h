// One function per CLI command. Each takes the validated RunSpec (or its own argv) and returns
// the exit code; errors travel as UsageError / RuntimeError to cli_main.
#pragma once
#include <memory>

#include "autotune/machine.h"
#include "autotune/run_spec.h"
#include "autotune/workload.h"

namespace autotune {

int train_command(const RunSpec& spec);
int estimate_command(const RunSpec& spec);
int tune_command(const RunSpec& spec);  // run and probe
int prepare_data_command(int argc, char** argv);
int profiles_command(int argc, char** argv);

// The workload a spec's --model names, from the table in src/workload_registry.cpp: a TorchScript
// FILE.pt on safetensors data, an LSTM preset, or a GPT preset/JSON on a token file. The data
// path follows the memory mode's policy (read mode, cache cap, prefetch).
std::unique_ptr<Workload> make_workload(const RunSpec& spec, const ModePolicy& policy = {});

void init_logging_once();

}  // namespace autotune
