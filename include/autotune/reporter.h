// Human output (stderr, through spdlog): the settings table, progress lines, recoveries and the
// final summary. Machine output (--json) is built from the same RunSummary by the CLI.
#pragma once
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "autotune/trainer.h"

namespace autotune {

// "Key | value" rows printed as an aligned table, like llm.c's start-up printout.
void print_table(const std::string& title,
                 const std::vector<std::pair<std::string, std::string>>& rows);

// One line from Workload::data_report(): "pread, cache 93.1% hit (1210/1300), 1.90 MiB of
// 2.00 MiB, prefetch 1: 98.0% hit"; empty for null.
std::string describe_data_report(const nlohmann::json& report);

class ConsoleReporter : public TrainObserver {
 public:
  // data_report: read at the end for the summary's "data" row (optional).
  explicit ConsoleReporter(int64_t log_every, std::function<nlohmann::json()> data_report = {})
      : log_every_(log_every), data_report_(std::move(data_report)) {}
  void on_start(const Plan& plan, const TrainOptions& opt, int64_t first_step) override;
  void on_step(const StepStats& s) override;
  void on_eval(int64_t step, double val_loss) override;
  void on_recovery(const Recovery& r) override;
  void on_checkpoint(int64_t step, const std::string& path) override;
  void on_end(const RunSummary& s) override;

 private:
  int64_t log_every_;
  std::function<nlohmann::json()> data_report_;
  int64_t first_step_ = 0;
  double elapsed_s_ = 0;  // training seconds so far, for the ETA
  double tokens_ = 0;
};

// Configures spdlog: messages to stderr with a short prefix.
void init_logging();

}  // namespace autotune
