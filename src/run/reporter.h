// Human output (stderr, through spdlog): the settings table, progress lines, recoveries and the
// final summary. Machine output (--json) is built from the same RunSummary by the CLI.
#pragma once
#include <functional>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "autotune/trainer.h"

namespace autotune {

// "Key | value" rows printed as an aligned table, like llm.c's start-up printout. `always`: also
// under --quiet (the final summaries).
void print_table(const std::string& title,
                 const std::vector<std::pair<std::string, std::string>>& rows, bool always = false);

// The one live line of a terminal (a progress bar), kept under the log lines: every log message
// clears it, prints, and draws it again. Only where stderr is a terminal, NO_COLOR is unset and
// --json is not given (live_line::enabled); elsewhere nothing is ever redrawn, so output to a
// pipe or a file holds no control characters.
namespace live_line {
bool enabled();
void set_enabled(bool on);  // decided once by init_logging and the CLI
void draw(const std::string& line);
void clear();  // removes the line for good (the next log message stays below the last one)
}  // namespace live_line

struct ConsoleOptions {
  int64_t log_every = 10;       // plain lines: every N steps (and the first and last)
  bool quiet = false;           // no step lines; the summary only
  std::string unit = "tokens";  // the workload's throughput unit
  std::optional<uint64_t> budget_bytes;
  std::function<uint64_t()> memory_now;         // the budget figure now, for the bar
  std::function<nlohmann::json()> data_report;  // the summary's "data" row (optional)
};

class ConsoleReporter : public TrainObserver {
 public:
  explicit ConsoleReporter(ConsoleOptions options) : opt_(std::move(options)) {}
  void on_start(const Plan& plan, const TrainOptions& opt, int64_t first_step) override;
  void on_step(const StepStats& s) override;
  void on_eval(int64_t step, double val_loss) override;
  void on_recovery(const Recovery& r) override;
  void on_checkpoint(int64_t step, const std::string& path) override;
  void on_end(const RunSummary& s) override;

 private:
  ConsoleOptions opt_;
  int64_t first_step_ = 0;
  double elapsed_s_ = 0;  // training seconds so far, for the ETA
  double tokens_ = 0;
  double last_draw_s_ = -1;  // the bar is redrawn at most ~5 times a second
};

// Configures spdlog: messages to stderr with a short prefix, colours and the live line only on a
// terminal without NO_COLOR.
void init_logging();

}  // namespace autotune
