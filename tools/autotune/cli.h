// The command line: parse into a RunSpec (validated in one place), dispatch to a command, map
// errors to one line and an exit code (0 ok, 1 runtime, 2 usage, 130/143 stopped by a signal).
#pragma once

namespace autotune {

int cli_main(int argc, char** argv);

}  // namespace autotune
