// Errors that reach the user as one line and an exit code.
#pragma once
#include <stdexcept>
#include <string>

namespace autotune {

// Bad flags, bad sizes, bad config files: exit code 2. The message names the fix.
struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Anything that goes wrong while running (infeasible budget, unreadable file, disk full): exit 1.
struct RuntimeError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// The user stopped the command (SIGINT, SIGTERM) where nothing was left to save: exit 128 + signal.
struct StoppedBySignal : RuntimeError {
  StoppedBySignal(int sig, const std::string& what) : RuntimeError(what), signal(sig) {}
  int signal;
};

constexpr int kExitOk = 0;
constexpr int kExitRuntime = 1;
constexpr int kExitUsage = 2;
constexpr int kExitSigint = 130;
constexpr int kExitSigterm = 143;

}  // namespace autotune
