// The data path's report (Workload::data_report(): read mode, sample cache, prefetch) as one
// line, for the memory monitor's lines and the run's summary.
#pragma once
#include <string>

#include <nlohmann/json.hpp>

namespace autotune {

// "pread, cache 93.1% hit (1210/1300), 1.90 MiB of 2.00 MiB, prefetch 1: 98.0% hit"; empty for
// null.
std::string describe_data_report(const nlohmann::json& report);

}  // namespace autotune
