// `autotune report PROFILE [--run DIR] --output FILE`: one self-contained HTML file with inline SVG
// (no script, no font, no network) showing why a plan was chosen: peak memory against
// micro-batch for each (precision, checkpointing) pair with the line the search fitted, the budget
// and the usable budget, every trial marked by its outcome and the chosen plan; tokens/s against
// micro-batch; and, with the run's directory, its memory timeline per meter with the budget line
// and the OOM recoveries.
//
// The SVG carries classes a test (or a person with a DOM inspector) can find: g.series[data-pair],
// .trial.fits / .trial.over / .trial.oom / .trial.slow / .trial.error, path.fit-line,
// line.budget, line.usable, .chosen, path.meter[data-meter], line.recovery.
#pragma once
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "autotune/profile.h"

namespace autotune {

// One phase of a run's memory timeline (run_dir/memory.jsonl), or an OOM recovery in it.
struct TimelinePoint {
  int64_t step = 0;
  std::string phase;
  uint64_t budget_bytes = 0, tensor_bytes = 0, device_bytes = 0, rss_bytes = 0;
};
struct TimelineRecovery {
  int64_t step = 0;
  std::string phase, before, after;
  size_t at_point = 0;  // index of the next timeline point
};
struct Timeline {
  std::vector<TimelinePoint> points;
  std::vector<TimelineRecovery> recoveries;
};
// Reads run_dir/memory.jsonl; UsageError naming the fix when it is missing or unreadable.
Timeline read_timeline(const std::string& run_dir);

// The timeline in at most `max_points` points, so that the report's size does not grow with the
// run's steps: consecutive points are grouped into equal buckets, and each bucket becomes two
// points, its highest and its lowest value of every meter (the envelope: every peak is kept).
// A timeline of at most `max_points` points is returned as it is.
constexpr size_t kTimelineMaxPoints = 2000;
// What that bounds the whole report to, with a profile of a few dozen trials (docs/BENCHMARKS.md
// has the sizes measured).
constexpr size_t kReportMaxBytes = size_t{256} << 10;
Timeline downsample(const Timeline& tl, size_t max_points = kTimelineMaxPoints);

// The whole HTML document.
std::string render_report(const Profile& profile, const Timeline* timeline);

int report_command(int argc, char** argv);

}  // namespace autotune
