// autotune: probe short real training steps, pick the fastest plan that fits a memory budget,
// train with it, and keep the plan as a reusable profile. All logic lives in the core library.
#include "autotune/cli.h"

int main(int argc, char** argv) {
  return autotune::cli_main(argc, argv);
}
