// autotune: probe short real training steps, pick the fastest plan that fits a memory budget,
// train with it, and keep the plan as a reusable profile. The commands are the autotune_app
// library beside this file (tools/autotune); the work is the core library's (src/, tuner/).
#include "cli.h"

int main(int argc, char** argv) {
  return autotune::cli_main(argc, argv);
}
