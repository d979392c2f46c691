// Human output (stderr, through spdlog): the settings table, progress lines, recoveries and the
// final summary. Machine output (--json) is built from the same RunSummary by the CLI.
#pragma once
#include <string>
#include <utility>
#include <vector>

#include "autotune/trainer.h"

namespace autotune {

// "Key | value" rows printed as an aligned table, like llm.c's start-up printout.
void print_table(const std::string& title,
                 const std::vector<std::pair<std::string, std::string>>& rows);

class ConsoleReporter : public TrainObserver {
 public:
  explicit ConsoleReporter(int64_t log_every) : log_every_(log_every) {}
  void on_start(const Plan& plan, const TrainOptions& opt, int64_t first_step) override;
  void on_step(const StepStats& s) override;
  void on_eval(int64_t step, double val_loss) override;
  void on_recovery(const Recovery& r) override;
  void on_checkpoint(int64_t step, const std::string& path) override;
  void on_end(const RunSummary& s) override;

 private:
  int64_t log_every_;
  int64_t first_step_ = 0;
  double elapsed_s_ = 0;  // training seconds so far, for the ETA
  double tokens_ = 0;
};

// Configures spdlog: messages to stderr with a short prefix.
void init_logging();

}  // namespace autotune
