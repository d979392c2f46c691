#include "autotune/commands.h"

#include <csignal>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <mutex>

#include <spdlog/spdlog.h>
#include <cxxopts.hpp>

#include "autotune/errors.h"
#include "autotune/memory.h"
#include "autotune/memory_monitor.h"
#include "autotune/reporter.h"
#include "autotune/run_context.h"
#include "autotune/size.h"
#include "autotune/token_file.h"
#include "autotune/trainer.h"

namespace autotune {

void init_logging_once() {
  static std::once_flag once;
  std::call_once(once, [] { init_logging(); });
}

int prepare_data_command(int argc, char** argv) {
  cxxopts::Options o("autotune prepare-data", "Turn text files or folders into a token file.");
  o.add_options()("input", "text file or folder (repeatable)",
                  cxxopts::value<std::vector<std::string>>())("output", "token file to write",
                                                              cxxopts::value<std::string>())(
      "val-fraction", "share of tokens held out for validation",
      cxxopts::value<double>()->default_value("0.1"))("h,help", "show help");
  auto r = o.parse(argc, argv);
  if (r.count("help")) {
    std::cout << o.help() << std::endl;
    return kExitOk;
  }
  if (!r.unmatched().empty())
    throw UsageError("unexpected argument '" + r.unmatched()[0] + "'; see --help");
  if (!r.count("input") || !r.count("output"))
    throw UsageError("prepare-data needs --input PATH... and --output FILE");
  const double val = r["val-fraction"].as<double>();
  if (!(val > 0 && val < 1)) throw UsageError("--val-fraction must be in (0, 1)");
  auto stats = prepare_token_file(r["input"].as<std::vector<std::string>>(),
                                  r["output"].as<std::string>(), val);
  spdlog::info("prepared {}: {} files ({} binary skipped), {} read, {} train + {} val tokens",
               r["output"].as<std::string>(), stats.files, stats.skipped_files,
               format_bytes(stats.bytes_in), stats.train_tokens, stats.val_tokens);
  return kExitOk;
}

int train_command(const RunSpec& spec) {
  RunContext ctx(spec);
  Plan plan = plan_from_pins(spec, ctx.workload().default_seq_len(), /*default_micro_batch=*/8);
  ctx.workload().validate(plan);
  ctx.warm_up();
  ctx.print_settings(plan, "explicit (autotune train)");
  RunSummary summary = ctx.train(plan);
  if (spec.json) std::cout << ctx.summary_json(summary).dump(2) << std::endl;
  return ctx.exit_code(summary);
}

}  // namespace autotune
