// `autotune run` and `autotune probe`: reuse a valid profile or probe, then (run) train with the
// chosen plan and write the full run's peak back into the profile.
#include <algorithm>
#include <filesystem>
#include <iostream>

#include <spdlog/spdlog.h>

#include "autotune/commands.h"
#include "autotune/errors.h"
#include "autotune/machine.h"
#include "autotune/profile.h"
#include "autotune/reporter.h"
#include "autotune/run_context.h"
#include "autotune/size.h"
#include "autotune/tuner.h"

namespace autotune {

namespace {

Fingerprint make_fingerprint(RunContext& ctx, int64_t global_batch) {
  const RunSpec& s = ctx.spec();
  Fingerprint fp;
  fp.workload = ctx.workload().config();
  fp.model_name = ctx.workload().model_name();
  fp.device_kind = c10::DeviceTypeName(ctx.device().type(), /*lower_case=*/true);
  const DeviceMemoryInfo info = device_memory_info(ctx.device());
  fp.device_name = info.name;
  fp.device_total_bytes = info.total_bytes;
  fp.libtorch_version = TORCH_VERSION;
  fp.tool_version = AUTOTUNE_VERSION;
  fp.budget_bytes = *ctx.budget_bytes();
  fp.margin_bytes = ctx.margin_bytes();
  fp.global_batch = global_batch;
  nlohmann::json pins = nlohmann::json::object();
  if (s.micro_batch) pins["micro_batch"] = *s.micro_batch;
  if (s.precision) pins["precision"] = to_string(*s.precision);
  if (s.checkpointing) pins["checkpointing"] = *s.checkpointing;
  if (s.seq_len) pins["seq_len"] = *s.seq_len;
  if (s.eval_batch) pins["eval_batch"] = *s.eval_batch;
  pins["allow_shrink"] = {{"seq", s.allow_shrink_seq}, {"width", s.allow_shrink_width}};
  pins["search"] = s.search;
  pins["mode"] = to_string(s.mode);
  fp.pins = pins;
  return fp;
}

// A trial's result in a word: `fits_word`, OOM, slow (stopped early), error or no (above budget).
const char* outcome(const Trial& t, const char* fits_word) {
  if (t.fits) return fits_word;
  if (t.oom) return "OOM";
  if (t.too_slow) return "slow";
  return t.error ? "error" : "no";
}

void print_trials(const std::vector<Trial>& trials) {
  if (trials.empty()) return;
  spdlog::info("{:>3}  {:<48} {:>5} {:>12} {:>10}  {}", "#", "plan", "fits", "peak", "tokens/s",
               "reason");
  int i = 0;
  for (const auto& t : trials)
    spdlog::info("{:>3}  {:<48} {:>5} {:>12} {:>10.0f}  {}", ++i, t.plan.describe(),
                 outcome(t, "yes"), t.peak_bytes ? format_bytes(t.peak_bytes) : "-", t.tokens_per_s,
                 t.reason);
}

// Saves unless the store is unwritable; then warns (or fails with --require-profile-save).
bool save_profile(const ProfileStore& store, const Profile& p, const std::string& path,
                  bool required) {
  try {
    store.save(p, path);
    return true;
  } catch (const RuntimeError& e) {
    if (required) throw RuntimeError(std::string(e.what()) + " (--require-profile-save)");
    spdlog::warn("{}; going on without saving the profile", e.what());
    return false;
  }
}

}  // namespace

int tune_command(const RunSpec& spec_in) {
  RunContext ctx(spec_in);
  const RunSpec& spec = ctx.spec();
  Workload& w = ctx.workload();
  const int64_t global_batch =
      resolve_global_batch(spec, spec.seq_len.value_or(w.default_seq_len()));
  if (spec.micro_batch && global_batch % *spec.micro_batch != 0)
    throw UsageError("--global-batch " + std::to_string(global_batch) +
                     " is not reachable with --micro-batch " + std::to_string(*spec.micro_batch) +
                     ": the micro-batch must divide the global batch; pick a divisor");

  const ModeChoice& mode = ctx.mode();
  const ModePolicy& policy = ctx.policy();

  ProfileStore store(spec.profile_dir);
  if (spec.require_profile_save) {
    try {
      store.check_writable();
    } catch (const RuntimeError& e) {
      throw RuntimeError(std::string(e.what()) + " (--require-profile-save)");
    }
  }
  spdlog::info("mode {}", mode.reason);
  const Fingerprint fp = make_fingerprint(ctx, global_batch);
  const std::string path = spec.profile_file.empty() ? store.path_for(fp) : spec.profile_file;

  ProbeOptions probe;
  probe.usable_bytes = *ctx.usable_bytes();
  probe.seed = spec.seed;
  probe.device = ctx.device();
  if (ctx.device().is_cpu()) {
    // LibTorch's one-time start-up (kernel registries, thread pools, oneDNN scratch) grows the
    // process on its first step. Paid here, uncapped, before the baseline is measured, it stays
    // out of every trial's figures and the cap (usable - baseline) becomes exact.
    Plan smallest;
    smallest.micro_batch = 1;
    ProbeOptions warm = probe;
    warm.usable_bytes = UINT64_MAX;
    warm.measured_steps = 0;
    run_trial(w, smallest, warm, ctx.meter());
    ctx.meter().remeasure_baseline();
  }
  ctx.enforce_budget();

  // ---- reuse a profile that matches and still fits ----
  std::optional<Profile> profile;
  bool reused = false;
  if (!spec.profile_file.empty() && !std::filesystem::exists(path))
    throw UsageError("--profile " + path + ": no such file; drop --profile to probe");
  if (!spec.reprobe) {
    try {
      profile = store.load(path);
      if (profile && !(profile->fingerprint == fp)) {
        if (spec.profile_file.empty()) {
          spdlog::warn("profile {} has a different fingerprint; re-probing", path);
          profile.reset();
        } else if (profile->plan.global_batch() != global_batch) {
          throw UsageError("--profile " + path + " is for global batch " +
                           std::to_string(profile->plan.global_batch()) + ", not " +
                           std::to_string(global_batch) + "; use --global-batch " +
                           std::to_string(profile->plan.global_batch()) + " or re-probe");
        } else {
          spdlog::warn("--profile {} was made for another setup; verifying its plan here", path);
        }
      }
    } catch (const UsageError& e) {
      if (!spec.profile_file.empty() && profile) throw;  // a given profile for another batch
      spdlog::warn("{}; re-probing", e.what());
      profile.reset();
    }
    if (profile) {
      // One verification step: the stored plan must still fit here and now.
      ProbeOptions verify = probe;
      verify.measured_steps = 0;
      Trial t = run_trial(w, profile->plan, verify, ctx.meter());
      if (t.fits) {
        reused = true;
        spdlog::info("reusing profile {}: {} (verified: peak {} of usable {}); 0 probe trials",
                     path, profile->plan.describe(), format_bytes(t.peak_bytes),
                     format_bytes(probe.usable_bytes));
      } else {
        spdlog::warn("profile {} no longer fits ({}: peak {}); re-probing", path, t.reason,
                     format_bytes(t.peak_bytes));
        profile.reset();
      }
    }
  }

  // ---- probe ----
  std::vector<Trial> trials;
  nlohmann::json precision_speed = nlohmann::json::object();  // low precision: matmul x fp32
  if (!profile) {
    TunerRequest req;
    req.global_batch = global_batch;
    req.budget_bytes = *ctx.budget_bytes();
    req.usable_bytes = *ctx.usable_bytes();
    req.search = spec.search;
    req.micro_batch = spec.micro_batch;
    req.seq_len = spec.seq_len;
    req.precision = spec.precision;
    req.checkpointing = spec.checkpointing;
    req.allow_shrink_seq = spec.allow_shrink_seq;
    req.allow_shrink_width = spec.allow_shrink_width;
    req.start_small = policy.start_small;
    req.max_micro_batch = spec.preset_max_micro_batch;
    req.allowed_precisions = spec.preset_precisions;
    req.eval_batch = spec.eval_batch.value_or(policy.eval_batch_cap);
    req.probe = probe;
    spdlog::info("probing: budget {} (usable {} after the margin), global batch {}, search {}",
                 format_bytes(req.budget_bytes), format_bytes(req.usable_bytes), global_batch,
                 spec.search);
    TunerResult r = tune(w, req, ctx.meter(), [](const Trial& t) {
      spdlog::info("trial {:<48} {:>4} peak {:>11} {:>8.0f} tok/s  {:.1f}s", t.plan.describe(),
                   outcome(t, "fits"), t.peak_bytes ? format_bytes(t.peak_bytes) : "-",
                   t.tokens_per_s, t.wall_s);
    });
    trials = r.trials;
    for (const auto& [prec, speed] : r.precision_speed)
      spdlog::info("{} matmul runs at {:.3g}x fp32 speed on {}{}", to_string(prec), speed,
                   ctx.device().str(),
                   std::find(r.skipped_precisions.begin(), r.skipped_precisions.end(), prec) !=
                           r.skipped_precisions.end()
                       ? ": its plans were not probed (they cannot be faster); --precision " +
                             to_string(prec) + " probes them"
                       : "");
    for (const auto& [prec, speed] : r.precision_speed) precision_speed[to_string(prec)] = speed;
    print_trials(trials);
    if (!r.plan) throw RuntimeError(r.infeasible_message);
    if (r.shrunk_task) spdlog::warn("THE TASK WAS CHANGED TO FIT: {}", r.shrink_note);
    profile = Profile{};
    profile->fingerprint = fp;
    profile->plan = *r.plan;
    profile->trials = r.trials;
    profile->probe_seconds = r.probe_seconds;
    profile->task_changed = r.shrunk_task;
    profile->task_change_note = r.shrink_note;
    profile->created_at = now_iso8601();
    profile->tool_version = AUTOTUNE_VERSION;
    spdlog::info("chosen plan {} after {} trials in {:.1f}s", r.plan->describe(), r.trials.size(),
                 r.probe_seconds);
    save_profile(store, *profile, path, spec.require_profile_save);
  }

  const nlohmann::json trials_json = trials;  // to_json(Trial): every field of each trial

  if (spec.command == "probe") {
    if (spec.json) {
      nlohmann::json plan = profile->plan;
      std::cout << nlohmann::json{{"plan", plan},
                                  {"budget_bytes", *ctx.budget_bytes()},
                                  {"trials", trials_json},
                                  {"profile", path},
                                  {"reused_profile", reused},
                                  {"mode", to_string(mode.mode)},
                                  {"precision_speed", precision_speed},
                                  {"task_changed", profile->task_changed}}
                       .dump(2)
                << std::endl;
    }
    return kExitOk;
  }

  // ---- train with the plan; the full run's peak goes back into the profile ----
  ctx.print_settings(profile->plan, reused
                                        ? "profile " + path
                                        : "probed (" + std::to_string(trials.size()) + " trials)");
  RunSummary summary = ctx.train(profile->plan);
  const uint64_t peak = ctx.monitor()->peak_budget_bytes();
  spdlog::info("full run peak {} of budget {} ({:.1f}%){}", format_bytes(peak),
               format_bytes(*ctx.budget_bytes()),
               100.0 * static_cast<double>(peak) / static_cast<double>(*ctx.budget_bytes()),
               peak <= *ctx.budget_bytes() ? "" : " ABOVE THE BUDGET");
  profile->full_run_peak_bytes = peak;
  profile->full_run_at = now_iso8601();
  profile->oom_recoveries += static_cast<int64_t>(summary.recoveries.size());
  for (const auto& rec : summary.recoveries)
    profile->recoveries.push_back({{"step", rec.step + 1},
                                   {"phase", to_string(rec.phase)},
                                   {"before", rec.before},
                                   {"after", rec.after},
                                   {"at", now_iso8601()}});
  // The next run starts from the plan that survived (eval-only changes included).
  if (!summary.recoveries.empty()) profile->plan = summary.plan;
  save_profile(store, *profile, path, spec.require_profile_save);

  if (spec.json) {
    nlohmann::json j = ctx.summary_json(summary);
    j["trials"] = trials_json;
    j["profile"] = path;
    j["reused_profile"] = reused;
    j["mode"] = to_string(mode.mode);
    j["task_changed"] = profile->task_changed;
    j["precision_speed"] = precision_speed;
    j["within_budget"] = peak <= *ctx.budget_bytes();
    std::cout << j.dump(2) << std::endl;
  }
  return ctx.exit_code(summary);
}

}  // namespace autotune
