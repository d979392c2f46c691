// `autotune run` and `autotune probe`: reuse a valid profile or probe, then (run) train with the
// chosen plan and write the full run's peak back into the profile. Read top to bottom in
// tune_command; each step is a function above it.
#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <tuple>

#include <spdlog/spdlog.h>

#include "autotune/errors.h"
#include "autotune/isolated_trials.h"
#include "autotune/machine.h"
#include "autotune/profile.h"
#include "autotune/script_mode.h"
#include "autotune/size.h"
#include "autotune/tuner.h"
#include "commands.h"
#include "run/reporter.h"
#include "run/run_context.h"

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
  fp.world_size = ctx.world_size();
  nlohmann::json pins = pins_json(s);
  pins["allow_shrink"] = {{"seq", s.allow_shrink_seq}, {"width", s.allow_shrink_width}};
  pins["search"] = s.search;
  pins["mode"] = to_string(s.mode);
  fp.pins = pins;
  return fp;
}

// A trial's result in a word: `fits_word`, OOM, Killed (by the kernel), slow (stopped early),
// error or no (above budget).
const char* outcome(const Trial& t, const char* fits_word) {
  if (t.fits) return fits_word;
  if (t.oom) return "OOM";
  if (t.killed) return "Killed";
  if (t.too_slow) return "slow";
  return t.error ? "error" : "no";
}

void print_trials(const std::vector<Trial>& trials, const Plan& chosen) {
  if (trials.empty()) return;
  spdlog::info("    {:>3}  {:<48} {:>5} {:>12} {:>10}  {}", "#", "plan", "fits", "peak", "tokens/s",
               "reason");
  int i = 0;
  for (const auto& t : trials)
    spdlog::info("{:>3} {:>3}  {:<48} {:>5} {:>12} {:>10.0f}  {}", t.plan == chosen ? "==>" : "",
                 ++i, t.plan.describe(), outcome(t, "yes"),
                 t.peak_bytes ? format_bytes(t.peak_bytes) : "-", t.tokens_per_s, t.reason);
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

ProfileStore open_store(const RunSpec& spec) {
  ProfileStore store(spec.profile_dir);
  if (spec.require_profile_save) {
    try {
      store.check_writable();
    } catch (const RuntimeError& e) {
      throw RuntimeError(std::string(e.what()) + " (--require-profile-save)");
    }
  }
  return store;
}

// The stored profile for this setup when it still fits here, verified over two steps in a fresh
// process (step 1 creates the AdamW states in its optimizer phase, so only step 2 reaches
// parameters + gradients + states + activations); nullopt means probe. The verification runs
// beside this process, which then trains: a plan that no longer fits (the machine changed) leaves
// nothing behind here, and the probe that follows is isolated as well.
std::optional<Profile> reusable_profile(RunContext& ctx, const ProfileStore& store,
                                        const std::string& path, const Fingerprint& fp,
                                        const ProbeOptions& probe, TrialRunner& trials,
                                        uint64_t* verified_peak) {
  const RunSpec& spec = ctx.spec();
  if (!spec.profile_file.empty() && !std::filesystem::exists(path))
    throw UsageError("--profile " + path + ": no such file; drop --profile to probe");
  if (spec.reprobe) return std::nullopt;
  std::optional<Profile> profile;
  try {
    profile = store.load(path);
    if (profile && !(profile->fingerprint == fp)) {
      if (spec.profile_file.empty()) {
        spdlog::warn("profile {} has a different fingerprint; re-probing", path);
        return std::nullopt;
      }
      if (profile->plan.global_batch() * fp.world_size != fp.global_batch)
        throw UsageError("--profile " + path + " is for global batch " +
                         std::to_string(profile->plan.global_batch()) + ", not " +
                         std::to_string(fp.global_batch) + "; use --global-batch " +
                         std::to_string(profile->plan.global_batch()) + " or re-probe");
      spdlog::warn("--profile {} was made for another setup; verifying its plan here", path);
    }
  } catch (const UsageError& e) {
    if (!spec.profile_file.empty() && profile) throw;  // a given profile for another batch
    spdlog::warn("{}; re-probing", e.what());
    return std::nullopt;
  }
  if (!profile) return std::nullopt;
  ProbeOptions verify = probe;
  verify.measured_steps = 1;
  verify.min_measure_s = 0;
  const Trial t = trials.run(profile->plan, verify);
  *verified_peak = t.peak_bytes;
  if (!t.fits) {
    spdlog::warn("profile {} no longer fits here ({}: peak {}); probing again", path, t.reason,
                 t.peak_bytes ? format_bytes(t.peak_bytes) : std::string("-"));
    return std::nullopt;
  }
  spdlog::info(
      "reusing profile {}: {} (verified over 2 steps in a fresh process: peak {} of usable {}); "
      "0 probe trials",
      path, profile->plan.describe(), format_bytes(t.peak_bytes), format_bytes(probe.usable_bytes));
  return profile;
}

// One line per trial: on a terminal a live line while it runs, then its outcome.
// "tok/s" for a language model, "samples/s" where the unit is the sample.
std::string rate_unit(const Workload& w) {
  return w.throughput_unit() == "tokens" ? "tok/s" : w.throughput_unit() + "/s";
}

TrialProgress console_progress(const RunContext& ctx) {
  TrialProgress p;
  const std::string rate = rate_unit(ctx.workload());
  const bool quiet = ctx.spec().quiet;
  const uint64_t budget = *ctx.budget_bytes();
  p.started = [quiet](const Plan& plan, int i, int at_most) {
    if (!quiet)
      live_line::draw(fmt::format("trial {}{}  {}  running...", i,
                                  i <= at_most ? " of at most " + std::to_string(at_most) : "",
                                  plan.describe()));
  };
  p.finished = [quiet, budget, rate](const Trial& t, int i, int at_most) {
    live_line::clear();
    if (quiet) return;
    spdlog::info("trial {:>2}{} {:<48} {:>4}  peak {:>11} of {}  {:>8.0f} {}  {:.1f}s", i,
                 i <= at_most ? "/" + std::to_string(at_most) : "", t.plan.describe(),
                 outcome(t, "fits"), t.peak_bytes ? format_bytes(t.peak_bytes) : "-",
                 format_bytes(budget), t.tokens_per_s, rate, t.wall_s);
  };
  return p;
}

struct Probed {
  Profile profile;
  nlohmann::json precision_speed = nlohmann::json::object();  // low precision: matmul x fp32
  uint64_t chosen_peak_bytes = 0;                             // the chosen plan's peak in its trial
};

// The search, its report, and the profile it makes (saved).
Probed probe_and_choose(RunContext& ctx, const ProfileStore& store, const std::string& path,
                        const Fingerprint& fp, const ProbeOptions& probe, TrialRunner& trials) {
  const RunSpec& spec = ctx.spec();
  TunerRequest req;
  req.global_batch = fp.global_batch / fp.world_size;  // one rank's share
  req.budget_bytes = *ctx.budget_bytes();
  req.usable_bytes = *ctx.usable_bytes();
  req.search = spec.search;
  static_cast<Pins&>(req) = spec;
  req.eval_batch = spec.eval_batch.value_or(ctx.policy().eval_batch_cap);
  req.world_size = fp.world_size;
  req.allow_shrink_seq = spec.allow_shrink_seq;
  req.allow_shrink_width = spec.allow_shrink_width;
  req.start_small = ctx.policy().start_small;
  req.max_micro_batch = spec.preset_max_micro_batch;
  req.allowed_precisions = spec.preset_precisions;
  req.low_precision = ctx.low_precision();
  req.probe = probe;
  spdlog::info("probing: budget {} (usable {} after the margin), global batch {}, search {}",
               format_bytes(req.budget_bytes), format_bytes(req.usable_bytes), fp.global_batch,
               spec.search);
  const TunerResult r = tune(ctx.workload(), req, trials, console_progress(ctx));
  Probed out;
  for (const auto& [prec, speed] : r.precision_speed) {
    out.precision_speed[to_string(prec)] = speed;
    const bool skipped = std::find(r.skipped_precisions.begin(), r.skipped_precisions.end(),
                                   prec) != r.skipped_precisions.end();
    spdlog::info("{} matmul runs at {:.3g}x fp32 speed on {}{}", to_string(prec), speed,
                 ctx.device().str(),
                 skipped ? ": its plans were not probed (they cannot be faster); --precision " +
                               to_string(prec) + " probes them"
                         : "");
  }
  if (!r.plan) {
    print_trials(r.trials, Plan{});
    throw RuntimeError(r.infeasible_message);
  }
  Profile& p = out.profile;
  p.fingerprint = fp;
  p.trials = r.trials;
  // Its trial ran in a process that started as this one will train it: nothing to verify again.
  p.plan = *r.plan;
  for (const auto& t : r.trials)
    if (t.plan == p.plan) out.chosen_peak_bytes = t.peak_bytes;
  print_trials(p.trials, p.plan);
  if (r.shrunk_task) spdlog::warn("THE TASK WAS CHANGED TO FIT: {}", r.shrink_note);
  p.search_lines = r.lines;
  p.probe_seconds = r.probe_seconds;
  p.task_changed = r.shrunk_task;
  p.task_change_note = r.shrink_note;
  p.created_at = now_iso8601();
  p.tool_version = AUTOTUNE_VERSION;
  spdlog::info("chosen plan {} after {} trials in {:.1f}s", p.plan.describe(), r.trials.size(),
               r.probe_seconds);
  save_profile(store, p, path, spec.require_profile_save);
  return out;
}

// The full run's peak, allocator events and recoveries go back into the profile; the next run
// starts from the plan that survived.
void record_full_run(RunContext& ctx, const ProfileStore& store, const std::string& path,
                     Profile& profile, const RunSummary& summary) {
  profile.full_run_peak_bytes = ctx.monitor()->peak_budget_bytes();
  profile.full_run_at = now_iso8601();
  profile.full_run_allocator = ctx.monitor()->to_json().at("allocator");
  profile.oom_recoveries += static_cast<int64_t>(summary.recoveries.size());
  for (const auto& rec : summary.recoveries)
    profile.recoveries.push_back({{"step", rec.step + 1},
                                  {"phase", to_string(rec.phase)},
                                  {"before", rec.before},
                                  {"after", rec.after},
                                  {"at", now_iso8601()}});
  if (!summary.recoveries.empty()) profile.plan = summary.plan;
  save_profile(store, profile, path, ctx.spec().require_profile_save);
}

// The end of the summary: why this plan, the peak against the budget, where the profile is, and
// the commands to type next.
void print_what_next(const RunContext& ctx, const Profile& profile, const std::string& path,
                     std::optional<uint64_t> peak, bool reused) {
  const uint64_t budget = *ctx.budget_bytes();
  std::vector<std::pair<std::string, std::string>> rows;
  if (reused) {
    rows.push_back({"why this plan", "reused from the profile (verified to fit here)"});
  } else {
    std::vector<std::string> over, slower;
    for (const auto& t : profile.trials) {
      if (t.plan == profile.plan || t.error) continue;
      const std::string mb = "micro-batch " + std::to_string(t.plan.micro_batch) + " " +
                             to_string(t.plan.precision) + (t.plan.checkpointing ? "+ckpt" : "");
      if (!t.fits)
        over.push_back(mb + (t.peak_bytes ? " (" + format_bytes(t.peak_bytes) + ")" : " (OOM)"));
      else
        slower.push_back(mb +
                         fmt::format(" ({:.0f} {})", t.tokens_per_s, rate_unit(ctx.workload())));
    }
    auto join = [](const std::vector<std::string>& v) {
      std::string s;
      for (const auto& x : v) s += (s.empty() ? "" : ", ") + x;
      return s.empty() ? std::string("-") : s;
    };
    double chosen_tps = 0;
    for (const auto& t : profile.trials)
      if (t.plan == profile.plan) chosen_tps = t.tokens_per_s;
    rows.push_back(
        {"chosen", profile.plan.describe() +
                       (chosen_tps > 0 ? fmt::format(" ({:.0f} {} in its trial)", chosen_tps,
                                                     rate_unit(ctx.workload()))
                                       : std::string(" (set by an OOM recovery in the run)"))});
    rows.push_back({"did not fit", join(over)});
    rows.push_back({"fitted, slower", join(slower)});
  }
  if (peak)
    rows.push_back({"peak / budget",
                    fmt::format("{} of {} ({:.1f}%)", format_bytes(*peak), format_bytes(budget),
                                100.0 * static_cast<double>(*peak) / static_cast<double>(budget))});
  rows.push_back({"profile", path});
  rows.push_back(
      {"next: run again", ctx.spec().command_line + "   (reuses the profile: 0 trials)"});
  if (ctx.spec().script.empty()) {
    rows.push_back({"next: train it", "autotune train --profile " + path + " [--steps N]"});
  } else {
    rows.push_back(
        {"next: run it alone", "AUTOTUNE_PROFILE=" + path + " " + command_line(ctx.spec().script)});
  }
  rows.push_back(
      {"next: draw it",
       "autotune report " + path +
           (ctx.spec().run_dir.empty() ? std::string() : " --run " + ctx.spec().run_dir) +
           " --output report.html"});
  print_table("what next", rows, /*always=*/true);
}

// Data parallel: which rank probes (or reuses its profile) for all. Ranks of one kind of device
// and one budget are alike, and rank 0 stands for them; otherwise the rank with the smallest
// budget (then the smallest device, then the lowest rank), whose plan is the likeliest to fit
// every rank. Every rank verifies it after (share_profile).
int choose_prober(RunContext& ctx) {
  Communicator& comm = *ctx.comm();
  const nlohmann::json mine = {{"budget_bytes", *ctx.budget_bytes()},
                               {"device_total_bytes", device_memory_info(ctx.device()).total_bytes},
                               {"rank", ctx.rank()}};
  int prober = 0;
  if (ctx.rank() == 0) {
    nlohmann::json best;
    for (const auto& t : comm.gather_text("device", mine.dump(), 0, std::chrono::minutes(10))) {
      const nlohmann::json r = nlohmann::json::parse(t);
      auto key = [](const nlohmann::json& x) {
        return std::make_tuple(x.at("budget_bytes").get<uint64_t>(),
                               x.at("device_total_bytes").get<uint64_t>(), x.at("rank").get<int>());
      };
      if (best.is_null() || key(r) < key(best)) best = r;
    }
    prober = best.at("rank").get<int>();
  } else {
    comm.gather_text("device", mine.dump(), 0, std::chrono::minutes(10));
  }
  prober =
      std::stoi(comm.share_text("prober", std::to_string(prober), 0, std::chrono::minutes(10)));
  if (prober != 0 && ctx.rank() == 0)
    spdlog::info("rank {} has the smallest budget or device: it probes for every rank", prober);
  return prober;
}

// Data parallel: the prober's profile (reused or probed) on every rank, verified there over 2
// steps under that rank's own budget; a plan that does not fit some rank stops all of them.
Profile share_profile(RunContext& ctx, std::optional<Profile> profile, const ProbeOptions& probe,
                      uint64_t* verified_peak, int prober) {
  Communicator& comm = *ctx.comm();
  // A probe can take far longer than a collective's timeout; a prober that dies meanwhile
  // closes its connection to the store, which ends the wait.
  const bool mine = ctx.rank() == prober;
  const std::string text = comm.share_text(
      "profile", mine ? profile->to_json().dump() : std::string(), prober, std::chrono::hours(24));
  Profile p = mine ? *profile : Profile::from_json(nlohmann::json::parse(text));
  // Two steps on all ranks together: the all-reduce's buffers are part of every rank's peak.
  ProbeOptions together = probe;
  together.comm = &comm;
  const Trial t = verify_plan(ctx.workload(), p.plan, together, ctx.meter());
  *verified_peak = t.peak_bytes;
  const bool fits = t.fits;
  if (!fits)
    spdlog::error("rank {}: plan {} from rank 0 does not fit here ({}: peak {})", ctx.rank(),
                  p.plan.describe(), t.reason, format_bytes(t.peak_bytes));
  else
    spdlog::info(
        "plan {} verified on every rank over 2 steps with the gradient all-reduce "
        "(this rank: peak {})",
        p.plan.describe(), format_bytes(t.peak_bytes));
  if (comm.any(!fits))
    throw RuntimeError("the plan " + p.plan.describe() +
                       " does not fit on every rank (see the rank's line); give a larger "
                       "--budget");
  return p;
}

// Trials in fresh processes of this binary with this command's flags, on this rank's device,
// each in a memory cgroup with the budget (the host's, on an accelerator) as its limit.
IsolatedTrialsOptions isolated_trials_options(RunContext& ctx) {
  IsolatedTrialsOptions o;
  o.flags = ctx.spec().flags;
  o.device = ctx.device();
  o.budget_bytes =
      ctx.device().is_cpu() ? *ctx.budget_bytes() : ctx.host_budget_bytes().value_or(0);
  o.baseline_bytes = ctx.meter().baseline_bytes();
  o.device_bytes_of_probe = ctx.meter().context_bytes();
  o.stop_signal = &RunContext::stop_signal();
  return o;
}

}  // namespace

namespace {

// A trial's options: the usable bytes, the run's seed and device.
ProbeOptions probe_options(const RunContext& ctx) {
  ProbeOptions probe;
  probe.usable_bytes = *ctx.usable_bytes();
  probe.seed = ctx.spec().seed;
  probe.device = ctx.device();
  return probe;
}

ScriptOptions script_options(const RunContext& ctx) {
  ScriptOptions o;
  o.command = ctx.spec().script;
  // On an accelerator the budget is the device's; the host budget then bounds the cgroup.
  o.budget_bytes =
      ctx.device().is_cpu() ? *ctx.budget_bytes() : ctx.host_budget_bytes().value_or(0);
  o.device_budget_bytes = ctx.device().is_cpu() ? 0 : *ctx.budget_bytes();
  o.stop_signal = &RunContext::stop_signal();
  o.device = ctx.device();
  o.step_timeout = std::chrono::seconds(ctx.spec().step_timeout_s);
  o.output_to_stderr = ctx.spec().json;
  return o;
}

// `autotune [run|probe] ... -- COMMAND`: the same reuse-or-probe as tune_command, with the
// command's runs as the trials; `run` then runs the command to its end with the plan.
int script_command(RunContext& ctx) {
  const RunSpec& spec = ctx.spec();
  ScriptTrials trials(script_options(ctx));
  spdlog::info("trials: {}", trials.containment());
  if (!trials.device_check().empty()) spdlog::info("trials: {}", trials.device_check());
  const ScriptInfo info = trials.describe();
  auto& workload = dynamic_cast<ScriptWorkload&>(ctx.workload());
  workload.set_info(info);
  std::string declared = info.knobs.empty() ? "" : " " + info.knobs.dump();
  spdlog::info(
      "{} reads its plan (started in {:.1f}s); it applies precision: {}, checkpointing: "
      "{}; other knobs:{}",
      trials.command_line(), info.start_s, info.applies_precision ? "yes" : "no",
      info.applies_checkpointing ? "yes" : "no", declared.empty() ? " none" : declared);
  const int64_t global_batch =
      spec.global_batch.value_or(info.defaults.value("global_batch", kDefaultGlobalBatch));
  if (spec.micro_batch)
    check_divides_batch("micro-batch", *spec.micro_batch, global_batch,
                        "--global-batch " + std::to_string(global_batch));
  const ProfileStore store = open_store(spec);
  const Fingerprint fp = make_fingerprint(ctx, global_batch);
  const std::string path = spec.profile_file.empty() ? store.path_for(fp) : spec.profile_file;
  const ProbeOptions probe = probe_options(ctx);
  uint64_t verified_peak = 0;
  std::optional<Profile> profile =
      reusable_profile(ctx, store, path, fp, probe, trials, &verified_peak);
  const bool reused = profile.has_value();
  if (!profile) {
    Probed probed = probe_and_choose(ctx, store, path, fp, probe, trials);
    profile = std::move(probed.profile);
    verified_peak = probed.chosen_peak_bytes;
  }
  nlohmann::json j = {
      {"plan", profile->plan},
      {"budget_bytes", *ctx.budget_bytes()},
      {"trials", reused ? nlohmann::json::array() : nlohmann::json(profile->trials)},
      {"profile", path},
      {"reused_profile", reused},
      {"verified_peak_bytes", verified_peak},
      {"trial_processes", trials.processes()},
      {"probe_s", reused ? 0.0 : profile->probe_seconds},
      {"script", {{"command", spec.script}, {"start_s", info.start_s}, {"declared", info.knobs}}}};
  if (spec.command == "probe") {
    print_what_next(ctx, *profile, path, std::nullopt, reused);
    if (spec.json) std::cout << j.dump(2) << std::endl;
    return kExitOk;
  }
  spdlog::info("running {} with {}", trials.command_line(), profile->plan.describe());
  const ScriptRun run = trials.train(profile->plan);
  profile->full_run_peak_bytes = run.peak_bytes;
  profile->full_run_at = now_iso8601();
  save_profile(store, *profile, path, spec.require_profile_save);
  if (run.peak_bytes > *ctx.budget_bytes())
    spdlog::warn("full run peak {} is ABOVE THE BUDGET {}", format_bytes(run.peak_bytes),
                 format_bytes(*ctx.budget_bytes()));
  print_what_next(ctx, *profile, path, run.peak_bytes, reused);
  if (spec.json) {
    j["steps"] = run.steps.size();
    j["peak_bytes"] = run.peak_bytes;
    j["within_budget"] = run.peak_bytes <= *ctx.budget_bytes();
    j["samples_per_s"] = run.samples_per_s();
    j["wall_s"] = run.process_s;
    std::cout << j.dump(2) << std::endl;
  }
  return kExitOk;
}

}  // namespace

int tune_command(const RunSpec& spec_in) {
  RunContext ctx(spec_in);
  if (!ctx.spec().script.empty()) return script_command(ctx);
  const RunSpec& spec = ctx.spec();
  const int64_t global_batch = checked_global_batch(
      spec, spec.seq_len.value_or(ctx.workload().default_seq_len()), ctx.world_size());
  const ProfileStore store = open_store(spec);
  spdlog::info("mode {}", ctx.mode().reason);
  const Fingerprint fp = make_fingerprint(ctx, global_batch);
  const std::string path = spec.profile_file.empty() ? store.path_for(fp) : spec.profile_file;

  // Every measurement runs in a trial process; this one stays as a training run starts until it
  // knows its plan (no warm-up, no speed test, no trial state).
  const ProbeOptions probe = probe_options(ctx);
  IsolatedTrials trial_runner(isolated_trials_options(ctx));

  // ---- a profile that still fits, or a probe (on one rank; the others verify its plan) ----
  const bool rank0 = ctx.rank() == 0;
  const int prober = ctx.comm() ? choose_prober(ctx) : 0;
  const bool probes = ctx.rank() == prober;
  uint64_t verified_peak = 0;
  std::optional<Profile> profile;
  if (probes) {
    spdlog::info("trials: {}", trial_runner.containment());
    profile = reusable_profile(ctx, store, path, fp, probe, trial_runner, &verified_peak);
  }
  bool reused = profile.has_value();
  nlohmann::json precision_speed = nlohmann::json::object();
  if (probes && !profile) {
    Probed probed = probe_and_choose(ctx, store, path, fp, probe, trial_runner);
    profile = std::move(probed.profile);
    precision_speed = std::move(probed.precision_speed);
    verified_peak = probed.chosen_peak_bytes;
  }
  // This process now starts as a training run of the plan does: one warm-up step in the plan's
  // precision, then the caps (ranks verify the plan together before they train).
  if (ctx.comm()) {
    const std::string precision = ctx.comm()->share_text(
        "precision", probes ? to_string(profile->plan.precision) : std::string(), prober,
        std::chrono::hours(24));
    ctx.warm_up({parse_precision(precision)});
  } else if (spec.command != "probe") {
    ctx.warm_up({profile->plan.precision});
  }
  if (ctx.comm() || spec.command != "probe") ctx.enforce_budget();
  if (ctx.comm()) {
    profile = share_profile(ctx, std::move(profile), probe, &verified_peak, prober);
    reused = ctx.comm()->share_text("reused", reused ? "1" : "0", prober,
                                    std::chrono::minutes(10)) == "1";
  }
  // The prober's profile file (its fingerprint names its device), for what rank 0 prints.
  const std::string profile_path =
      ctx.comm() ? ctx.comm()->share_text("profile_path", path, prober, std::chrono::minutes(10))
                 : path;
  const nlohmann::json trials = reused ? nlohmann::json::array() : nlohmann::json(profile->trials);
  nlohmann::json j = {{"plan", profile->plan},
                      {"budget_bytes", *ctx.budget_bytes()},
                      {"trials", trials},
                      {"profile", profile_path},
                      {"reused_profile", reused},
                      {"verified_peak_bytes", verified_peak},
                      {"mode", to_string(ctx.mode().mode)},
                      {"precision_speed", precision_speed},
                      {"task_changed", profile->task_changed},
                      {"trial_processes", trial_runner.processes()}};
  if (ctx.comm()) j["prober_rank"] = prober;
  if (spec.command == "probe") {
    if (rank0) print_what_next(ctx, *profile, profile_path, std::nullopt, reused);
    if (spec.json && rank0) std::cout << j.dump(2) << std::endl;
    return kExitOk;
  }

  // ---- train with the plan; the full run's peak goes back into the profile ----
  ctx.print_settings(profile->plan,
                     (reused ? "profile " + profile_path
                             : "probed (" + std::to_string(trials.size()) + " trials)") +
                         (prober != 0 ? " by rank " + std::to_string(prober) : std::string()));
  const RunSummary summary = ctx.train(profile->plan);
  const uint64_t peak = ctx.monitor()->peak_budget_bytes();
  if (peak > *ctx.budget_bytes())
    spdlog::warn("full run peak {} is ABOVE THE BUDGET {}", format_bytes(peak),
                 format_bytes(*ctx.budget_bytes()));
  const nlohmann::json ranks =
      ctx.comm() ? ctx.rank_figures(summary, verified_peak) : nlohmann::json::array();
  // The prober keeps the profile (its fingerprint is the prober's device); rank 0 tells the user.
  if (probes) record_full_run(ctx, store, path, *profile, summary);
  if (rank0) print_what_next(ctx, *profile, profile_path, peak, reused);
  if (spec.json && rank0) {
    nlohmann::json out = ctx.summary_json(summary);
    for (auto it = j.begin(); it != j.end(); ++it)
      if (it.key() != "plan" && it.key() != "budget_bytes") out[it.key()] = it.value();
    out["within_budget"] = peak <= *ctx.budget_bytes();
    out["params_digest"] = summary.params_digest;
    if (ctx.comm()) out["ranks"] = ranks;
    std::cout << out.dump(2) << std::endl;
  }
  return ctx.exit_code(summary);
}

}  // namespace autotune
