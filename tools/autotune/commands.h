// One function per CLI command. Each takes the validated RunSpec (or its own argv) and returns
// the exit code; errors travel as UsageError / RuntimeError to cli_main.
#pragma once
#include <memory>

#include "autotune/run_spec.h"
#include "autotune/workload_registry.h"

namespace autotune {

int train_command(const RunSpec& spec);
int estimate_command(const RunSpec& spec);
int tune_command(const RunSpec& spec);  // run and probe
int prepare_data_command(int argc, char** argv);
int profiles_command(int argc, char** argv);

// spdlog's pattern and level, once per process (a command may call it again).
void init_logging_once();

}  // namespace autotune
