#include "run/run_context.h"

#include <csignal>
#include <cstdlib>
#include <cstring>
#include <filesystem>

#include <spdlog/spdlog.h>
#include <unistd.h>

#include "autotune/checkpoint.h"
#include "autotune/errors.h"
#include "autotune/preset.h"
#include "autotune/script_mode.h"
#include "autotune/size.h"
#include "autotune/tuner.h"
#include "autotune/workload_registry.h"
#include "memory/cpu_allocator.h"
#include "models/precision.h"
#include "run/reporter.h"
#include "train/fault_injection.h"
#include "train/step_log.h"

namespace autotune {

namespace {
std::atomic<int> g_stop_signal{0};

void on_signal(int sig) {
  // A second signal means "now": exit without the checkpoint.
  if (g_stop_signal.exchange(sig) != 0) _exit(128 + sig);
  const char msg[] =
      "\nautotune: stopping after this step and writing a checkpoint "
      "(signal again to exit at once)\n";
  ssize_t ignored = write(2, msg, sizeof msg - 1);
  (void)ignored;
}
}  // namespace

void install_signal_handlers() {
  struct sigaction sa {};
  sa.sa_handler = on_signal;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGINT, &sa, nullptr);
  sigaction(SIGTERM, &sa, nullptr);
  // Past a file-size limit (ulimit -f) a write must fail with EFBIG, which the checkpoint and
  // profile writers report, instead of SIGXFSZ killing the run.
  signal(SIGXFSZ, SIG_IGN);
}

const std::atomic<int>& RunContext::stop_signal() {
  return g_stop_signal;
}

RunContext::RunContext(const RunSpec& spec) : spec_(spec), device_(resolve_device(spec.device)) {
  if (const WorldInfo world = world_from_env(); world.size > 1) {
    if (spec_.command != "run" && spec_.command != "probe" && spec_.command != "train")
      throw UsageError("autotune " + spec_.command + " runs as one process; launch autotune run, " +
                       "probe or train as ranks (WORLD_SIZE is " + std::to_string(world.size) +
                       ")");
    follow_launcher();
    // Rank r's lines carry its number; ranks other than 0 say only warnings and errors.
    spdlog::set_pattern("%^[%H:%M:%S %L rank " + std::to_string(world.rank) + "]%$ %v");
    if (world.rank > 0 && !spec_.verbose) spdlog::set_level(spdlog::level::warn);
    if (!device_.is_cpu() && !device_.has_index())
      device_ = torch::Device(device_.type(), static_cast<c10::DeviceIndex>(world.local_rank));
    comm_ =
        std::make_unique<Communicator>(world, std::chrono::seconds(spec_.dist_timeout_s), device_);
  }
  if (!spec_.preset.empty()) {
    Preset preset = load_preset(spec_.preset);
    apply_preset(preset, spec_, spec_.margin_given, spec_.mode_given);
    spdlog::info("preset {}: {}", preset.name, preset.description);
  }
  meter_ = std::make_unique<MemoryMeter>(device_);
  if (!spec_.budget_text.empty()) {
    const uint64_t total = device_memory_info(device_).total_bytes;
    budget_bytes_ = parse_size(spec_.budget_text, total);
    margin_bytes_ = parse_margin(spec_.margin_text, budget_bytes_, spec_.budget_text);
  }
  // The mode: forced by --mode, else chosen from the memory the budget is about (the device's
  // on an accelerator) and the budget; host-side settings follow host RAM and the host budget.
  const MachineFacts host = read_machine_facts();
  if (device_.is_cpu()) {
    if (!spec_.host_budget_text.empty())
      throw UsageError(
          "--host-budget is for accelerator runs; on the CPU --budget is the host "
          "budget");
    mode_ = choose_mode(spec_.mode, budget_bytes_, host);
    policy_ = policy_for(mode_.mode, budget_bytes_);
  } else {
    host_budget_bytes_ = spec_.host_budget_text.empty()
                             ? default_host_budget(host)
                             : parse_size(spec_.host_budget_text, host.total_bytes);
    const DeviceMemoryInfo d = device_memory_info(device_);
    mode_ = choose_device_mode(spec_.mode, budget_bytes_, d.total_bytes, d.free_bytes);
    host_mode_ = choose_mode(spec_.mode, host_budget_bytes_, host);
    policy_ = policy_for(mode_.mode, budget_bytes_, host_mode_.mode, *host_budget_bytes_);
  }
  low_precision_ = low_precision_for(device_);
  if (spec_.preset_start_small) policy_.start_small = true;
  if (spec_.log_every_memory > 0) policy_.monitor_every_steps = spec_.log_every_memory;
  policy_.pin_memory = !device_.is_cpu();
  if (spec_.verbose) policy_.monitor_every_steps = std::max<int64_t>(1, spec_.log_every);
  if (spec_.quiet) policy_.monitor_every_steps = 0;
  // Script mode: the command is the workload; what it honours is asked before the search.
  workload_ = spec_.script.empty() ? make_workload(spec_, policy_)
                                   : std::make_unique<ScriptWorkload>(spec_.script, ScriptInfo{});
  if (spec_.resume) {
    bool complete = false;
    const std::vector<std::string> files = list_checkpoints(spec_.run_dir);
    std::string unreadable;  // the newest unreadable one and why
    for (const auto& file : files) {
      std::string why;
      if (read_checkpoint_meta(file, &why))
        complete = true;
      else
        unreadable = file + " (" + why + ")";
    }
    // Checkpoints that exist but cannot be read are a damaged run, not a first launch: starting
    // fresh would silently lose its progress.
    if (!complete && !files.empty())
      throw UsageError("--resume: no checkpoint in " + checkpoint_dir(spec_.run_dir) +
                       " is readable, the newest: " + unreadable +
                       "; restore them, or move them away to start fresh");
    if (!complete && spec_.resume_auto) {
      // A scheduler relaunching the same command after a preemption: the first launch starts.
      spdlog::info("--resume auto: no complete checkpoint in {} yet; starting fresh",
                   checkpoint_dir(spec_.run_dir));
      spec_.resume = false;
    } else if (!complete) {
      throw no_complete_checkpoint(spec_.run_dir);
    }
  }
  if (!spec_.run_dir.empty()) {
    std::error_code ec;
    std::filesystem::create_directories(spec_.run_dir, ec);
    if (ec)
      throw UsageError("cannot create --run-dir " + spec_.run_dir + ": " + ec.message() +
                       "; choose a writable directory");
  }
  install_signal_handlers();
}

RunContext::~RunContext() {
  cpu_alloc::set_cap(std::nullopt);
  cpu_alloc::set_rss_limit(std::nullopt);
  if (!device_.is_cpu() && budget_bytes_) enforce_device_budget(device_, 0, 0);
}

void RunContext::warm_up(const std::vector<Precision>& precisions) {
  ProbeOptions warm;
  warm.usable_bytes = UINT64_MAX;
  warm.measured_steps = 0;
  warm.device = device_;
  warm.seed = spec_.seed;
  for (const Precision precision : precisions) {
    Plan smallest;
    smallest.micro_batch = 1;
    smallest.precision = precision;
    run_trial(*workload_, smallest, warm, *meter_);
  }
  meter_->release_cache();
  meter_->remeasure_baseline();
}

std::optional<uint64_t> RunContext::usable_bytes() const {
  if (!budget_bytes_) return std::nullopt;
  return *budget_bytes_ - margin_bytes_;
}

void RunContext::enforce_budget(bool for_trial) {
  // The host: the CPU allocator's reserved bytes within budget - baseline (a trial: usable -
  // baseline), and the figure the budget names (RSS) checked whenever it maps more, so what the
  // cap cannot see (heap slack, thread arenas) never carries the process past the budget.
  auto cap_host = [&](uint64_t budget, uint64_t margin, const char* flag) {
    const uint64_t usable = budget - margin, base = meter_->baseline_bytes();
    if (usable <= base)
      throw RuntimeError(std::string(flag) + " " + format_bytes(budget) + " (minus margin " +
                         format_bytes(margin) + ") is below this process's baseline of " +
                         format_bytes(base) + " before any tensor; give a larger " + flag);
    cpu_alloc::set_cap(static_cast<int64_t>((for_trial ? usable : budget) - base));
    cpu_alloc::set_rss_limit(static_cast<int64_t>(budget));
  };
  if (device_.is_cpu()) {
    if (budget_bytes_) cap_host(*budget_bytes_, margin_bytes_, "--budget");
    return;
  }
  // Only CUDA's caching allocator takes a per-process limit here; elsewhere the budget is
  // measured (trials are refused by their figure) but nothing stops an allocation at it.
  if (budget_bytes_ && !enforce_device_budget(device_, *budget_bytes_, meter_->context_bytes()) &&
      device_budget_enforced_) {
    device_budget_enforced_ = false;
    spdlog::warn(
        "--budget on {}: measured, not enforced (this LibTorch has no per-process memory limit "
        "for the device); a plan over it is refused by its trial's figure, but a run that grows "
        "past it is not stopped",
        device_.str());
  }
  if (host_budget_bytes_) {
    // The device budget's margin, as a share, on the host budget too.
    const double share =
        budget_bytes_ ? static_cast<double>(margin_bytes_) / static_cast<double>(*budget_bytes_)
                      : 0.05;
    cap_host(*host_budget_bytes_,
             static_cast<uint64_t>(share * static_cast<double>(*host_budget_bytes_)),
             "--host-budget");
  }
}

TrainOptions RunContext::train_options() const {
  TrainOptions o;
  o.steps = spec_.steps;
  o.lr = spec_.lr;
  o.min_lr = spec_.lr / 10;
  o.eval_every = spec_.eval_every;
  o.eval_sequences = spec_.eval_sequences;
  o.seed = spec_.seed;
  o.device = device_;
  o.run_dir = spec_.run_dir;
  o.checkpoint_every = spec_.checkpoint_every;
  o.resume = spec_.resume;
  o.allow_precision_change = !spec_.precision.has_value();
  o.low_precision = low_precision_;
  o.stop_signal = &g_stop_signal;
  o.release_between_phases = policy_.release_between_phases;
  o.comm = comm_.get();
  return o;
}

void RunContext::print_settings(const Plan& plan, const std::string& plan_source) const {
  const Workload& w = *workload_;
  const int64_t T = plan.seq_len ? plan.seq_len : w.default_seq_len();
  std::vector<std::pair<std::string, std::string>> rows = {
      {"autotune", AUTOTUNE_VERSION},
      {"LibTorch", TORCH_VERSION},
      {"device", device_memory_info(device_).name + " (" +
                     format_bytes(device_memory_info(device_).total_bytes) + ")"},
      {"threads", std::to_string(at::get_num_threads())},
      {"workload", w.kind() + " / " + w.model_name()},
      {"model", w.config().at("model").dump()},
      {"data", w.describe_data().empty() ? "-" : w.describe_data()},
      {"plan source", plan_source},
  };
  // The plan's knobs (kKnobs, plan.h), each with its value; a few say more.
  for (auto [key, text] : plan_rows(plan)) {
    if (key == "seq_len") {
      text = T ? std::to_string(T) +
                     (plan.seq_len && plan.seq_len != w.default_seq_len()
                          ? " (the model's is " + std::to_string(w.default_seq_len()) + ")"
                          : "")
               : "-";
    } else if (key == "d_model") {
      text = w.default_width()
                 ? std::to_string(plan.d_model ? plan.d_model : w.default_width()) +
                       (plan.d_model && plan.d_model != w.default_width()
                            ? " (the model's is " + std::to_string(w.default_width()) + ")"
                            : "")
                 : "-";
    } else if (key == "num_workers") {
      if (plan.num_workers < 0) continue;  // not a script's plan
      key = "DataLoader workers";
    } else if (key == "optimizer_shards") {
      key = "optimizer states";
      text = plan.optimizer_shards > 1
                 ? "split over " + std::to_string(plan.optimizer_shards) +
                       " ranks (ZeRO-1: each updates its share, then broadcasts it)"
                 : "whole on every rank";
    }
    rows.push_back({key, text});
    if (key != "grad_accum") continue;
    const int64_t global_sequences = world_size() * plan.global_batch();
    rows.push_back(
        {"global batch",
         std::to_string(global_sequences) + " sequences" +
             (world_size() > 1
                  ? " (micro_batch x grad_accum x " + std::to_string(world_size()) + " ranks)"
                  : "") +
             (w.tokens_per_sequence(plan) > 1
                  ? " = " + std::to_string(global_sequences * w.tokens_per_sequence(plan)) + " " +
                        w.throughput_unit()
                  : "")});
  }
  rows.insert(
      rows.end(),
      {
          {"steps", std::to_string(spec_.steps)},
          {"lr", fmt::format("{:.1e} (warmup, cosine to {:.1e})", spec_.lr, spec_.lr / 10)},
          {"seed", std::to_string(spec_.seed)},
          {"mode", mode_.reason},
          {"budget", budget_bytes_ ? format_bytes(*budget_bytes_) + " (margin " +
                                         format_bytes(margin_bytes_) + ")" +
                                         (device_budget_enforced_ ? "" : ", measured, not enforced")
                                   : "none"},
          {"host budget", host_budget_bytes_
                              ? format_bytes(*host_budget_bytes_) + " (" + host_mode_.reason + ")"
                              : "the budget (CPU)"},
          {"process baseline", format_bytes(meter_->baseline_bytes())},
      });
  if (comm_)
    rows.push_back({"ranks", std::to_string(comm_->size()) + " (c10d " + comm_->backend() +
                                 "; the budget is per rank; rank " + std::to_string(comm_->rank()) +
                                 " here)"});
  if (!spec_.run_dir.empty()) rows.push_back({"run dir", spec_.run_dir});
  print_table("settings", rows);
}

RunSummary RunContext::train(const Plan& plan) {
  enforce_budget();
  MemoryMonitorOptions mo;
  mo.budget_bytes = budget_bytes_;
  mo.every_steps = policy_.monitor_every_steps;
  // One memory timeline per rank (each has its own budget); the step log is rank 0's.
  if (!spec_.run_dir.empty())
    mo.timeline_path =
        spec_.run_dir + (rank() == 0 ? std::string("/memory.jsonl")
                                     : "/memory.rank" + std::to_string(rank()) + ".jsonl");
  auto data_report = [this] { return workload_->data_report(); };
  mo.data_report = data_report;
  monitor_ = std::make_unique<MemoryMonitor>(*meter_, mo);
  ConsoleOptions co;
  co.log_every = spec_.log_every;
  co.quiet = spec_.quiet;
  co.unit = workload_->throughput_unit();
  co.budget_bytes = budget_bytes_;
  co.memory_now = [this] { return meter_->budget_figure_now(meter_->sample()); };
  co.data_report = data_report;
  ConsoleReporter console(co);
  // Ranks train in lockstep: rank 0 speaks for all of them.
  std::vector<TrainObserver*> observers = {monitor_.get()};
  if (rank() == 0) observers.push_back(&console);
  std::unique_ptr<StepLog> step_log;
  if (!spec_.run_dir.empty() && rank() == 0) {
    step_log = std::make_unique<StepLog>(spec_.run_dir + "/steps.jsonl", spec_.log_every);
    observers.push_back(step_log.get());
  }
  std::unique_ptr<OomInjector> injector;
  // AUTOTUNE_INJECT_OOM_RANK=r: only rank r (data parallel) meets the injected OOMs.
  const char* inject_rank = std::getenv("AUTOTUNE_INJECT_OOM_RANK");
  if (const char* inject = std::getenv("AUTOTUNE_INJECT_OOM");
      inject && *inject && (!inject_rank || std::to_string(rank()) == inject_rank)) {
    injector = std::make_unique<OomInjector>(inject);
    observers.push_back(injector.get());
  }
  std::unique_ptr<AllocationOomInjector> alloc_injector;
  if (const char* inject = std::getenv("AUTOTUNE_INJECT_OOM_ALLOC");
      inject && *inject && (!inject_rank || std::to_string(rank()) == inject_rank)) {
    alloc_injector = std::make_unique<AllocationOomInjector>(inject);
    observers.push_back(alloc_injector.get());
  }
  RunSummary s = autotune::train(*workload_, plan, train_options(), observers);
  if (s.stop_signal)
    spdlog::warn("stopped by signal {} at step {}; continue with the same command plus --resume{}",
                 s.stop_signal, s.steps_done, spec_.resume ? "" : " --run-dir " + spec_.run_dir);
  return s;
}

nlohmann::json RunContext::summary_json(const RunSummary& s) const {
  // The plan as it ran: the workload's sequence length and width where the plan says 0.
  Plan ran = s.plan;
  if (!ran.seq_len) ran.seq_len = workload_->default_seq_len();
  if (!ran.d_model) ran.d_model = workload_->default_width();
  const nlohmann::json plan = ran;
  nlohmann::json recoveries = nlohmann::json::array();
  for (const auto& r : s.recoveries)
    recoveries.push_back({{"step", r.step + 1},
                          {"phase", to_string(r.phase)},
                          {"before", r.before},
                          {"after", r.after},
                          {"eval_only", r.eval_only}});
  return {
      {"plan", plan},
      {"budget_bytes", budget_bytes_ ? nlohmann::json(*budget_bytes_) : nlohmann::json()},
      {"host_budget_bytes",
       host_budget_bytes_ ? nlohmann::json(*host_budget_bytes_) : nlohmann::json()},
      {"memory", monitor_ ? monitor_->to_json() : nlohmann::json::object()},
      {"data", workload_->data_report()},
      {"tokens_per_s", s.tokens_per_s},
      {"steps", s.steps_done},
      {"first_step", s.first_step},
      {"final_loss", std::isnan(s.final_loss) ? nlohmann::json() : nlohmann::json(s.final_loss)},
      {"val_loss", std::isnan(s.val_loss) ? nlohmann::json() : nlohmann::json(s.val_loss)},
      {"wall_s", s.wall_s},
      {"trials", nlohmann::json::array()},
      {"profile", nullptr},
      {"reused_profile", false},
      {"oom_recoveries", s.recoveries.size()},
      {"recoveries", recoveries},
      {"checkpoint", s.last_checkpoint},
      {"world_size", world_size()},
      {"rank", rank()},
      {"effective_batch", world_size() * s.plan.global_batch()},
      {"allreduce_s", s.allreduce_s},
      {"allreduce_calls", s.allreduce_calls},
      {"optimizer_shards", s.plan.optimizer_shards},
      {"optimizer_state_bytes", s.optimizer_state_bytes},
      {"broadcast_s", s.broadcast_s},
      {"process", {{"autocast_regions", autocast_regions_entered()}}}};
}

int RunContext::exit_code(const RunSummary& s) const {
  if (s.stop_signal == SIGINT) return kExitSigint;
  if (s.stop_signal == SIGTERM) return kExitSigterm;
  return kExitOk;
}

nlohmann::json RunContext::rank_figures(const RunSummary& s, uint64_t verified_peak) {
  // The tensors' own peak: the counting allocator's on CPU, the caching allocator's allocated
  // bytes on an accelerator (what sharding the optimizer states lowers, without the process).
  const nlohmann::json mem = monitor()->to_json();
  const uint64_t peak_tensor_bytes =
      device().is_cpu() ? mem.at("host").value("peak_tensor_bytes", uint64_t{0})
                        : mem.at("device").value("peak_allocated_bytes", uint64_t{0});
  nlohmann::json mine = {
      {"rank", rank()},
      {"budget_bytes", budget_bytes_ ? nlohmann::json(*budget_bytes_) : nlohmann::json()},
      {"peak_budget_bytes", monitor()->peak_budget_bytes()},
      {"peak_tensor_bytes", peak_tensor_bytes},
      {"verified_peak_bytes", verified_peak},
      {"tokens_per_s", s.tokens_per_s},
      {"plan", s.plan},
      {"params_digest", s.params_digest},
      {"allreduce_s", s.allreduce_s},
      {"allreduce_calls", s.allreduce_calls},
      {"optimizer_state_bytes", s.optimizer_state_bytes},
      {"broadcast_s", s.broadcast_s},
      {"oom_recoveries", s.recoveries.size()}};
  nlohmann::json all = nlohmann::json::array();
  for (const auto& t : comm()->gather_text("summary", mine.dump(), 0, std::chrono::minutes(10)))
    all.push_back(nlohmann::json::parse(t));
  return all;
}

}  // namespace autotune
