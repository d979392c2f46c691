// StepLog: one JSON line per logged step in run_dir/steps.jsonl (the loss curve and what each
// step cost: time, page faults, CPU allocations), for plots and for scripts/bench-vs-python.
// An observer: it reads the device scalars only at its log points.
#pragma once
#include <cstdint>
#include <string>

#include "autotune/trainer.h"
#include "util/jsonl_log.h"

namespace autotune {

class StepLog : public TrainObserver {
 public:
  // Appends to `path` (a resumed run continues the file, without the records of the steps it
  // repeats); every_steps as --log-every (step 1 and the last step are always written).
  StepLog(const std::string& path, int64_t every_steps);

  void on_start(const Plan& plan, const TrainOptions& opt, int64_t first_step) override;
  void on_step(const StepStats& s) override;

 private:
  struct Counters {
    int64_t page_faults = 0;   // minor + major, this process
    int64_t allocations = 0;   // CPU allocator calls
    int64_t segment_maps = 0;  // CPU allocator segments mapped (fresh pages)
  };
  static Counters now();
  JsonlLog out_;
  int64_t every_steps_;
  Counters last_;  // at the end of the previous step
};

}  // namespace autotune
