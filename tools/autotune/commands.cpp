#include "commands.h"

#include <csignal>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <mutex>

#include <spdlog/spdlog.h>
#include <cxxopts.hpp>

#include "autotune/distributed.h"
#include "autotune/errors.h"
#include "autotune/memory.h"
#include "autotune/profile.h"
#include "autotune/size.h"
#include "autotune/token_file.h"
#include "autotune/trainer.h"
#include "run/reporter.h"
#include "run/run_context.h"
#include "train/memory_monitor.h"

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

namespace {
// `train --profile FILE`: the profile's plan, with each plan flag given beside it overriding its
// one knob (--micro-batch keeps the profile's global batch through grad_accum); the profile's
// model and data unless --model / --data are given. `source` says which knob came from where,
// for the settings table.
// With ranks (`world` > 1) the profile must be one made for as many ranks: its plan is one rank's
// share of the effective batch.
Plan plan_from_profile(RunSpec& spec, int world, std::string* source, nlohmann::json* workload) {
  if (!std::filesystem::exists(spec.profile_file))
    throw UsageError("--profile " + spec.profile_file +
                     ": no such file (`autotune profiles list` shows the stored ones)");
  const auto profile = ProfileStore(spec.profile_dir).load(spec.profile_file);
  if (profile->fingerprint.world_size != world)
    throw UsageError("--profile " + spec.profile_file + " holds a plan for " +
                     std::to_string(profile->fingerprint.world_size) + " rank(s), this run has " +
                     std::to_string(world) + "; train it with autotune train --nproc " +
                     std::to_string(profile->fingerprint.world_size) + " --profile " +
                     spec.profile_file);
  *workload = profile->fingerprint.workload;
  const nlohmann::json& model = profile->fingerprint.workload.at("model");
  if (!spec.model_given)
    spec.model = model.contains("path") ? model.at("path").get<std::string>()
                                        : profile->fingerprint.model_name;
  const nlohmann::json& data = profile->fingerprint.workload.value("data", nlohmann::json());
  if (!spec.data_given && data.is_object() && data.contains("path"))
    spec.data = data.at("path").get<std::string>();
  Plan plan = profile->plan;
  const int64_t global = plan.global_batch();  // one rank's share
  if (spec.global_batch && *spec.global_batch != global * world)
    throw UsageError("--profile " + spec.profile_file + " is a plan for global batch " +
                     std::to_string(global * world) + ", not " +
                     std::to_string(*spec.global_batch) +
                     "; drop --global-batch or probe again with autotune probe");
  std::vector<std::string> overridden;
  const std::string profile_batch =
      "the global batch " + std::to_string(global) + " of --profile " + spec.profile_file;
  if (spec.micro_batch) {
    check_divides_batch("micro-batch", *spec.micro_batch, global, profile_batch);
    plan.micro_batch = *spec.micro_batch;
    plan.grad_accum = global / plan.micro_batch;
    overridden.push_back("micro_batch (--micro-batch)");
  } else if (spec.grad_accum) {
    check_divides_batch("grad-accum", *spec.grad_accum, global, profile_batch);
    plan.grad_accum = *spec.grad_accum;
    plan.micro_batch = global / plan.grad_accum;
    overridden.push_back("grad_accum (--grad-accum)");
  }
  apply_pins(spec, plan, &overridden);
  *source = "profile " + spec.profile_file;
  for (size_t i = 0; i < overridden.size(); ++i)
    *source += (i == 0 ? "; from the command line: " : ", ") + overridden[i];
  return plan;
}

// An explicit plan: one rank's share of the global batch (all of it in one process), split by the
// pins as `run` splits it.
Plan plan_from_pins_per_rank(const RunSpec& spec, int64_t seq_len, int world) {
  RunSpec share = spec;
  share.global_batch = checked_global_batch(spec, seq_len, world) / world;
  share.batch_tokens.reset();
  Plan plan = plan_from_pins(share, seq_len, /*default_micro_batch=*/8);
  if (spec.shard_optimizer.value_or(false)) plan.optimizer_shards = world;
  return plan;
}
}  // namespace

int train_command(const RunSpec& spec_in) {
  RunSpec spec = spec_in;
  const int world = world_from_env().size;
  std::string source = "explicit (autotune train)";
  std::optional<Plan> from_profile;
  nlohmann::json profile_workload;
  if (!spec.profile_file.empty()) {
    from_profile = plan_from_profile(spec, world, &source, &profile_workload);
    spec.global_batch = from_profile->global_batch() * world;
  }
  RunContext ctx(spec);
  if (from_profile && ctx.workload().config() != profile_workload)
    spdlog::warn(
        "--profile {} was made for another model or data than this run's; its plan may "
        "not fit (autotune --budget SIZE probes this setup)",
        spec.profile_file);
  Plan plan = from_profile ? *from_profile
                           : plan_from_pins_per_rank(spec, ctx.workload().default_seq_len(), world);
  ctx.workload().validate(plan);
  ctx.warm_up({plan.precision});
  ctx.print_settings(plan, source);
  RunSummary summary = ctx.train(plan);
  nlohmann::json out = ctx.summary_json(summary);
  out["params_digest"] = summary.params_digest;
  if (ctx.comm()) out["ranks"] = ctx.rank_figures(summary, /*verified_peak=*/0);
  if (spec.json && ctx.rank() == 0) std::cout << out.dump(2) << std::endl;
  return ctx.exit_code(summary);
}

}  // namespace autotune
