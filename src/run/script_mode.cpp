// Script mode (include/autotune/script_mode.h): the user's command as the trials' child process,
// measured from outside, and as the workload the tuner searches.
#include "autotune/script_mode.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <thread>

#include <spdlog/spdlog.h>

#include "autotune/errors.h"
#include "autotune/memory.h"
#include "autotune/size.h"
#include "memory/nvml.h"
#include "run/child_process.h"
#include "util/hash.h"

extern char** environ;

namespace autotune {

namespace {

constexpr int kReportFd = 3;  // the child's end of the report pipe

#ifndef AUTOTUNE_PYTHON_CLIENT_DIR
#define AUTOTUNE_PYTHON_CLIENT_DIR ""
#endif

// Where the Python client lives: AUTOTUNE_PYTHON_CLIENT_DIR in the environment (an installed
// autotune), else the source tree's python/ this binary was built from.
std::string client_dir() {
  if (const char* d = std::getenv("AUTOTUNE_PYTHON_CLIENT_DIR"); d && *d) return d;
  return AUTOTUNE_PYTHON_CLIENT_DIR;
}

// An environment entry autotune sets for the child itself (a parent's AUTOTUNE_PROFILE too: under
// autotune the plan comes from AUTOTUNE_PLAN).
bool set_by_autotune(const std::string& entry) {
  for (const char* name :
       {kScriptPlanEnv, kScriptRoleEnv, kScriptStepsEnv, kScriptReportFdEnv, kScriptDeviceEnv,
        kScriptDeviceBudgetEnv, kScriptDeviceOutsideEnv, "AUTOTUNE_PROFILE"})
    if (entry.rfind(std::string(name) + "=", 0) == 0) return true;
  return false;
}

// The child's environment: this process's, less what autotune sets for it, plus the role, the
// plan, the report pipe, the client on PYTHONPATH and `extra` (the accelerator's entries).
std::vector<std::string> child_environment(const char* role, const Plan* plan, int64_t steps,
                                           const std::vector<std::string>& extra) {
  std::vector<std::string> env;
  std::string pythonpath = client_dir();
  for (char** e = environ; *e; ++e) {
    const std::string entry = *e;
    if (set_by_autotune(entry)) continue;
    if (entry.rfind("PYTHONPATH=", 0) == 0) {
      pythonpath += ":" + entry.substr(11);
      continue;
    }
    env.push_back(entry);
  }
  env.push_back("PYTHONPATH=" + pythonpath);
  env.push_back(std::string(kScriptRoleEnv) + "=" + role);
  env.push_back(std::string(kScriptReportFdEnv) + "=" + std::to_string(kReportFd));
  if (plan) {
    nlohmann::json p = {
        {"micro_batch", plan->micro_batch},        {"grad_accum", plan->grad_accum},
        {"precision", to_string(plan->precision)}, {"checkpointing", plan->checkpointing},
        {"global_batch", plan->global_batch()},    {"knobs", nlohmann::json::object()}};
    if (plan->num_workers >= 0) p["knobs"]["num_workers"] = plan->num_workers;
    env.push_back(std::string(kScriptPlanEnv) + "=" + p.dump());
  }
  if (steps > 0) env.push_back(std::string(kScriptStepsEnv) + "=" + std::to_string(steps));
  env.insert(env.end(), extra.begin(), extra.end());
  return env;
}

// The child between fork and exec: async-signal-safe calls only. Never returns.
[[noreturn]] void exec_command(bool trial, int log_fd, bool stdout_to_stderr, int report_fd,
                               const char* procs_path, char* const* argv, char* const* envp) {
  ::setpgid(0, 0);  // its own group: the DataLoader workers it forks are stopped with it
  ::prctl(PR_SET_PDEATHSIG, trial ? SIGKILL : SIGTERM);
  if (trial) child_oom_first();  // the kernel's OOM killer takes a trial before the probe
  child_join_cgroup(procs_path, "autotune: the command cannot join its memory cgroup\n");
  if (log_fd >= 0) {
    ::dup2(log_fd, 1);
    ::dup2(log_fd, 2);
  } else if (stdout_to_stderr) {
    ::dup2(2, 1);
  }
  child_keep_fd(report_fd, kReportFd);
  child_unblock_signals();
  ::execvpe(argv[0], argv, envp);
  const char msg[] = "autotune: cannot run the command (exec failed)\n";
  if (::write(2, msg, sizeof msg - 1) < 0) {
  }
  ::_exit(127);
}

// Complete JSON lines read from the report pipe so far (non-blocking); a partial line waits in
// `pending` for the rest.
void read_reports(int fd, std::string& pending, ScriptRun& r) {
  char buf[65536];
  for (;;) {
    const ssize_t n = ::read(fd, buf, sizeof buf);
    if (n > 0) {
      pending.append(buf, static_cast<size_t>(n));
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    break;  // EAGAIN (nothing yet) or end of file
  }
  size_t nl;
  while ((nl = pending.find('\n')) != std::string::npos) {
    const std::string line = pending.substr(0, nl);
    pending.erase(0, nl + 1);
    const nlohmann::json j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (!j.is_object()) continue;
    const std::string event = j.value("event", "");
    if (event == "plan") {
      r.plan_event = j;
    } else if (event == "step") {
      r.steps.push_back(j);
    }
  }
}

// Whether a command's last words say it ran out of memory (Python's MemoryError, PyTorch's
// OutOfMemoryError and "CUDA out of memory", the allocator's "DefaultCPUAllocator: can't
// allocate memory").
bool says_out_of_memory(const std::string& text) {
  std::string lower = text;
  std::transform(lower.begin(), lower.end(), lower.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  for (const char* sign : {"out of memory", "memoryerror", "outofmemoryerror",
                           "can't allocate memory", "cannot allocate memory"})
    if (lower.find(sign) != std::string::npos) return true;
  return false;
}

// The largest figure a key names over a run's step reports (0: none reported it).
uint64_t max_over_steps(const std::vector<nlohmann::json>& steps, const char* key,
                        const char* plus = nullptr) {
  uint64_t m = 0;
  for (const auto& s : steps)
    m = std::max(m, s.value(key, uint64_t{0}) + (plus ? s.value(plus, uint64_t{0}) : 0));
  return m;
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

ScriptTrials::ScriptTrials(ScriptOptions options) : opt_(std::move(options)) {
  if (opt_.command.empty()) throw UsageError("script mode needs a command after --");
  std::string why;
  if (opt_.budget_bytes > 0) cgroups_ = TrialCgroups::open(&why);
  containment_ =
      cgroups_
          ? "each run of the command in its own memory cgroup under " + cgroups_->parent() +
                " (limit: the budget); the figure is the cgroup's peak, its whole process "
                "tree"
          : "no memory cgroup per run (" + (opt_.budget_bytes ? why : std::string("no budget")) +
                "): the figure is the process group's proportional set size, polled every "
                "50 ms (a spike between two polls is missed), and nothing contains a run "
                "that grows past the budget but the kernel";
  if (!opt_.device.is_cpu()) {
    std::string why;
    nvml_ = Nvml::open(&why);
    device_check_ =
        "on " + opt_.device.str() +
        " the figure is the client's peak reserved + context (the caching allocator capped at "
        "the budget), " +
        (nvml_ ? "cross-checked with the driver's per-process figure (NVML): the larger counts"
               : "not cross-checked: " + why);
    // The speed test loads the device's matmul libraries into this process, which holds them
    // while the commands run: done before the first command starts, they are part of what is
    // in use outside every command (device_environment), never charged to one.
    for (const Precision p : {Precision::bf16, Precision::fp16}) precision_speed(p);
  }
}

ScriptTrials::~ScriptTrials() = default;

std::string command_line(const std::vector<std::string>& command) {
  std::string s;
  for (const auto& a : command)
    s += (s.empty() ? "" : " ") +
         (a.find_first_of(" \t'\"") == std::string::npos ? a : "'" + a + "'");
  return s;
}

std::vector<std::string> ScriptTrials::device_environment(bool limit) {
  if (opt_.device.is_cpu()) return {};
  // What is in use on the device before the command starts is not the command's. The least
  // seen so far: memory a killed trial held may not be back yet when the next one starts, and
  // counting too little outside charges the command more, never less.
  const DeviceMemoryInfo d = device_memory_info(opt_.device);
  device_outside_bytes_ = std::min(device_outside_bytes_,
                                   d.total_bytes > d.free_bytes ? d.total_bytes - d.free_bytes : 0);
  return {std::string(kScriptDeviceEnv) + "=" + opt_.device.str(),
          std::string(kScriptDeviceBudgetEnv) + "=" +
              std::to_string(limit ? opt_.device_budget_bytes : 0),
          std::string(kScriptDeviceOutsideEnv) + "=" + std::to_string(device_outside_bytes_)};
}

ScriptRun ScriptTrials::spawn(Role role, const Plan* plan, int64_t steps, bool limit) {
  const char* role_name = role == Role::describe ? "describe"
                          : role == Role::trial  ? "trial"
                                                 : "run";
  const bool captured = role != Role::run;  // a run's output is the user's to see
  std::vector<std::string> args = opt_.command;
  std::vector<std::string> env =
      child_environment(role_name, plan, steps, device_environment(limit));
  std::vector<char*> argv = c_strings(args), envp = c_strings(env);
  int report[2];
  if (::pipe2(report, O_CLOEXEC) != 0)
    throw RuntimeError(std::string("cannot make the report pipe: ") + std::strerror(errno));
  const int log_fd = captured ? make_memfd("autotune-script-log") : -1;
  std::string cgroup;
  if (limit && cgroups_) cgroup = cgroups_->make(opt_.budget_bytes);
  const std::string procs = cgroup.empty() ? std::string() : cgroups_->procs_file(cgroup);
  std::fflush(stdout);
  std::fflush(stderr);
  const auto t0 = std::chrono::steady_clock::now();
  const pid_t pid = ::fork();
  if (pid == 0)
    exec_command(role != Role::run, log_fd, opt_.output_to_stderr, report[1],
                 procs.empty() ? nullptr : procs.c_str(), argv.data(), envp.data());
  ::close(report[1]);
  if (pid < 0) {
    const std::string err = std::strerror(errno);
    ::close(report[0]);
    if (log_fd >= 0) ::close(log_fd);
    if (!cgroup.empty()) cgroups_->remove(cgroup);
    throw RuntimeError("cannot start " + command_line() + ": " + err);
  }
  ++processes_;
  ::fcntl(report[0], F_SETFL, O_NONBLOCK);

  // Wait: the reports as they come, the polled figure, the user's stop, the step timeout.
  ScriptRun r;
  std::string pending;
  int status = 0, stop = 0;
  bool timed_out = false;
  auto last_progress = t0;
  uint64_t polled_peak = 0;
  for (int tick = 0;; ++tick) {
    const size_t before = r.steps.size();
    const bool planned_before = r.planned();
    read_reports(report[0], pending, r);
    if (r.steps.size() != before || r.planned() != planned_before)
      last_progress = std::chrono::steady_clock::now();
    const pid_t w = ::waitpid(pid, &status, WNOHANG);
    if (w == pid || (w < 0 && errno != EINTR)) break;
    if (tick % 3 == 0 && (cgroup.empty() || nvml_)) {  // the group listed once for both figures
      const std::vector<pid_t> pids = group_pids(pid);
      if (cgroup.empty()) polled_peak = std::max(polled_peak, pss_bytes(pids));
      if (nvml_)
        if (const auto used = nvml_->used_bytes(pids))
          r.driver_peak_bytes = std::max(r.driver_peak_bytes, *used);
    }
    if (opt_.stop_signal && opt_.stop_signal->load() != 0 && !stop) {
      stop = opt_.stop_signal->load();
      // The full run is the user's training: it gets the signal, to save what it has, and is
      // waited for. A trial is only killed.
      if (role == Role::run) ::kill(-pid, stop);
    }
    // A describe run ends at plan(); a trial or a run must report a step within the timeout.
    timed_out = std::chrono::steady_clock::now() - last_progress > opt_.step_timeout;
    if ((stop && role != Role::run) || timed_out) {
      ::kill(-pid, SIGKILL);
      while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
      }
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(16));
  }
  ::kill(-pid, SIGKILL);  // workers left behind by a trial that ended itself
  read_reports(report[0], pending, r);
  ::close(report[0]);
  r.process_s = seconds_since(t0);
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  r.killed = WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL && !stop && !timed_out;
  std::string log;
  if (log_fd >= 0) {
    log = drain_memfd(log_fd);
    ::close(log_fd);
    r.last_line = last_line(log);
  }
  settle_figures(r, cgroup, polled_peak);
  r.oom = !r.killed && r.exit_code != 0 && says_out_of_memory(log);
  if (stop)
    throw StoppedBySignal(
        stop, "stopped by signal " + std::to_string(stop) + " while " + command_line() + " ran: " +
                  (role == Role::run ? "the run stopped" : "no plan was chosen, nothing trained"));
  if (timed_out)
    throw RuntimeError(
        command_line() + " ran " + std::to_string(opt_.step_timeout.count()) +
        " s without calling autotune." + (r.planned() ? "step()" : "plan()") +
        (r.last_line.empty() ? std::string() : " (its last line: " + r.last_line + ")") +
        "; call autotune.step(samples) after each optimizer step");
  return r;
}

void ScriptTrials::settle_figures(ScriptRun& r, const std::string& cgroup,
                                  uint64_t polled_peak_bytes) {
  if (!cgroup.empty()) {
    r.host_peak_bytes = cgroups_->peak_bytes(cgroup);
    if (cgroups_->oom_kills(cgroup) > 0) r.killed = true;  // a worker, or the command itself
    cgroups_->remove(cgroup);
  } else {
    r.host_peak_bytes = polled_peak_bytes;
  }
  if (opt_.device.is_cpu()) {
    r.peak_bytes = r.host_peak_bytes;
    return;
  }
  r.device_peak_bytes =
      max_over_steps(r.steps, "device_peak_reserved_bytes", "device_context_bytes");
  r.peak_bytes = std::max(r.device_peak_bytes, r.driver_peak_bytes);
  // The driver charges the process more than the client counts: something outside the caching
  // allocator (a second library's allocator, NCCL buffers). The larger figure is the one used.
  const uint64_t slack = std::max<uint64_t>(64ull << 20, r.device_peak_bytes / 20);
  if (r.driver_peak_bytes > r.device_peak_bytes + slack && !driver_above_said_) {
    driver_above_said_ = true;
    spdlog::warn(
        "the driver charges {} to {} on {}, the client's figure (peak reserved + context) is "
        "{}: memory outside PyTorch's caching allocator; the driver's figure is the one used",
        format_bytes(r.driver_peak_bytes), command_line(), opt_.device.str(),
        format_bytes(r.device_peak_bytes));
  }
}

double ScriptRun::samples_per_s(double* wall_s) const {
  if (steps.size() < 2) return 0;
  double samples = 0;
  for (size_t i = 1; i < steps.size(); ++i) samples += steps[i].value("samples", 0.0);
  const double s = steps.back().value("time", 0.0) - steps.front().value("time", 0.0);
  if (wall_s) *wall_s = s;
  return s > 0 ? samples / s : 0;
}

ScriptInfo ScriptTrials::describe() {
  const ScriptRun r = spawn(Role::describe, nullptr, 0, /*limit=*/false);
  if (!r.planned()) {
    if (r.exit_code != 0)
      throw RuntimeError(command_line() + " exited with code " + std::to_string(r.exit_code) +
                         " before calling autotune.plan()" +
                         (r.last_line.empty() ? std::string() : ": " + r.last_line));
    throw RuntimeError(command_line() +
                       " ended without calling autotune.plan(); script mode reads the plan "
                       "through it (README, \"Your own training script\")");
  }
  ScriptInfo& info = info_;
  const nlohmann::json& e = r.plan_event;
  info.applies_precision = e.value("applies", nlohmann::json::object()).value("precision", false);
  info.applies_checkpointing =
      e.value("applies", nlohmann::json::object()).value("checkpointing", false);
  info.knobs = e.value("declared", nlohmann::json::object());
  info.defaults = e.value("script_defaults", nlohmann::json::object());
  info.start_s = r.process_s;
  return info;
}

void ScriptTrials::check_follows(const ScriptRun& r, const Plan& plan) const {
  if (!r.planned() && !r.steps.empty())
    throw RuntimeError(command_line() +
                       " calls autotune.step() but never autotune.plan(): it does not read its "
                       "plan; take micro_batch and grad_accum from plan = autotune.plan(...)");
  for (const auto& s : r.steps) {
    const int64_t samples = s.value("samples", int64_t{-1});
    if (samples != plan.global_batch())
      throw RuntimeError(
          command_line() + " trained " + std::to_string(samples) + " samples in optimizer step " +
          std::to_string(s.value("step", 0)) +
          " but its plan is micro_batch x grad_accum = " + std::to_string(plan.micro_batch) +
          " x " + std::to_string(plan.grad_accum) + " = " + std::to_string(plan.global_batch()) +
          ": it ignores the plan; size its batches and accumulation from autotune.plan()");
  }
}

ScriptRun ScriptTrials::checked_trial(const Plan& plan, int64_t steps, bool limit) {
  ScriptRun r = spawn(Role::trial, &plan, steps, limit);
  check_follows(r, plan);
  const bool memory = r.killed || r.oom;
  if (!memory && r.exit_code != 0 && r.steps.empty())
    throw RuntimeError(command_line() + " exited with code " + std::to_string(r.exit_code) +
                       " before its first autotune.step()" +
                       (r.last_line.empty() ? std::string() : ": " + r.last_line));
  if (!memory && r.exit_code == 0 && static_cast<int64_t>(r.steps.size()) < steps)
    throw RuntimeError(command_line() + " ended after " + std::to_string(r.steps.size()) +
                       " optimizer step(s); a trial runs " + std::to_string(steps) +
                       ": give it data (or epochs) for at least that many");
  // On an accelerator a command that trains elsewhere would be measured at its context alone.
  if (!opt_.device.is_cpu() && r.exit_code == 0 &&
      max_over_steps(r.steps, "device_peak_reserved_bytes") == 0)
    throw RuntimeError(command_line() + " allocated nothing on " + opt_.device.str() +
                       " in its trial: it trains elsewhere; give --device cpu (the budget is then "
                       "host memory) or put its model and batches on " +
                       opt_.device.str());
  return r;
}

Trial ScriptTrials::run(const Plan& plan, const ProbeOptions& probe) {
  // DataLoader workers change no math: where memory refuses a plan, fewer are tried (halving)
  // before the search moves to a smaller or slower plan. A larger plan starts from the fewest
  // that an earlier one needed (memory grows with the micro-batch).
  Plan tried = plan;
  if (tried.num_workers < 0 && workers_cap_ >= 0) tried.num_workers = workers_cap_;
  Trial t = trial_of(tried, probe);
  const nlohmann::json declared = info_.knobs.value("num_workers", nlohmann::json());
  int64_t workers = tried.num_workers >= 0         ? tried.num_workers
                    : declared.is_number_integer() ? declared.get<int64_t>()
                                                   : 0;
  std::string lowered;  // what the trials with more workers met, for the profile's trial list
  while (workers > 0 && (t.killed || t.oom || (!t.fits && !t.error))) {
    spdlog::info("trial    {} with {} DataLoader worker(s): {}; again with {}", plan.describe(),
                 workers, t.reason, workers / 2);
    lowered += "; with " + std::to_string(workers) + " worker(s): " + t.reason;
    workers /= 2;
    tried.num_workers = workers;
    t = trial_of(tried, probe);
    if (t.fits) workers_cap_ = workers;
  }
  t.reason += lowered;
  return t;
}

Trial ScriptTrials::trial_of(const Plan& plan, const ProbeOptions& probe) {
  const int64_t steps = 1 + std::max<int64_t>(2, probe.measured_steps);
  const ScriptRun r = checked_trial(plan, steps, /*limit=*/true);
  Trial t;
  t.plan = plan;
  t.peak_bytes = r.peak_bytes;
  if (!opt_.device.is_cpu())
    t.phase_peaks = {{"host_tree", r.host_peak_bytes},
                     {"device_client", r.device_peak_bytes},
                     {"device_driver", r.driver_peak_bytes}};
  t.process_s = r.process_s;
  t.steps_run = static_cast<int64_t>(r.steps.size());
  t.tokens_per_s = r.samples_per_s(&t.wall_s);
  if (r.killed) {
    t.killed = true;
    t.reason = "Killed at " + format_bytes(r.host_peak_bytes) + " by the kernel" +
               (cgroups_ ? " (its memory cgroup's limit, or the machine's)" : "");
  } else if (r.oom) {
    t.oom = true;
    t.reason = "out of memory after " + std::to_string(t.steps_run) + " step(s): " + r.last_line;
  } else if (r.exit_code != 0) {
    t.error = true;
    t.reason = "error: exited with code " + std::to_string(r.exit_code) + " after " +
               std::to_string(t.steps_run) + " step(s): " + r.last_line;
  } else {
    t.fits = r.peak_bytes <= probe.usable_bytes;
    t.reason = t.fits ? "fits" : "peak above budget - margin";
  }
  if (t.fits && (baseline_bytes_ == 0 || r.peak_bytes < baseline_bytes_))
    baseline_bytes_ = r.peak_bytes;  // the smallest whole peak seen: an upper bound of its floor
  return t;
}

std::vector<std::vector<double>> ScriptTrials::retime(const std::vector<Trial>& finalists,
                                                      int rounds, const ProbeOptions& probe) {
  const int64_t steps = 1 + std::max<int64_t>(2, probe.measured_steps);
  std::vector<std::vector<double>> out(finalists.size());
  for (int round = 0; round < rounds; ++round)
    for (size_t i = 0; i < finalists.size(); ++i) {
      const ScriptRun r = checked_trial(finalists[i].plan, steps, /*limit=*/false);
      out[i].push_back(r.exit_code == 0 ? r.samples_per_s() : 0.0);
    }
  return out;
}

double ScriptTrials::precision_speed(Precision precision) {
  if (precision == Precision::fp32) return 1.0;
  const auto known = speeds_.find(precision);
  if (known != speeds_.end()) return known->second;
  return speeds_[precision] = matmul_speed_vs_fp32(opt_.device, precision);
}

std::optional<uint64_t> ScriptTrials::need_bytes(const Plan& plan, const ProbeOptions& probe) {
  const int64_t steps = 1 + std::max<int64_t>(2, probe.measured_steps);
  // The smallest plan's need: with no DataLoader workers where the script has some.
  Plan smallest = plan;
  if (smallest.num_workers < 0 && info_.knobs.contains("num_workers")) smallest.num_workers = 0;
  const ScriptRun r = checked_trial(smallest, steps, /*limit=*/false);
  if (r.killed || r.oom || r.exit_code != 0) return std::nullopt;
  return r.peak_bytes;
}

ScriptRun ScriptTrials::train(const Plan& plan) {
  ScriptRun r = spawn(Role::run, &plan, 0, /*limit=*/true);
  check_follows(r, plan);
  if (r.killed)
    throw RuntimeError(command_line() + " was killed by the kernel at " +
                       format_bytes(r.host_peak_bytes) + " in the full run (its trials fitted): " +
                       "give --margin more room, or probe again with --reprobe");
  if (r.exit_code != 0)
    throw RuntimeError(command_line() + " exited with code " + std::to_string(r.exit_code) +
                       " in the full run (its output is above)");
  if (r.steps.empty())
    throw RuntimeError(command_line() + " ran to its end without calling autotune.step()");
  return r;
}

// ---- the workload ----------------------------------------------------------------------------

namespace {
// The script a command runs: its first argument ending in .py, else the program itself.
std::string script_path(const std::vector<std::string>& command) {
  for (const auto& a : command)
    if (a.size() > 3 && a.compare(a.size() - 3, 3, ".py") == 0) return a;
  return command.front();
}
}  // namespace

ScriptWorkload::ScriptWorkload(std::vector<std::string> command, ScriptInfo info)
    : command_(std::move(command)), info_(std::move(info)) {
  const std::string script = script_path(command_);
  name_ = std::filesystem::path(script).stem().string();
  std::ifstream f(script, std::ios::binary);
  if (f) {
    const std::string bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    script_digest_ = hex16(fnv1a64(bytes.data(), bytes.size(), kFnvOffset));
  }
}

nlohmann::json ScriptWorkload::config() const {
  // The fingerprint: the command and the script's bytes (an edited script is probed again).
  return {{"model", {{"kind", "script"}, {"command", command_}, {"script_digest", script_digest_}}},
          {"data", nullptr}};
}

WorkloadKnobs ScriptWorkload::knobs() const {
  WorkloadKnobs k;
  k.checkpointing = info_.applies_checkpointing;
  k.precision = info_.applies_precision;
  return k;
}

void ScriptWorkload::validate(const Plan& plan) const {
  if (plan.seq_len || plan.d_model)
    throw UsageError(
        "script mode changes no sequence length or width; drop --seq-len, --d-model "
        "and --allow-shrink");
}

std::shared_ptr<TrainableModel> ScriptWorkload::build(const Plan&, torch::Device, uint64_t) {
  throw std::logic_error("script mode: the command builds and trains its own model");
}
Batch ScriptWorkload::train_batch(int64_t, int64_t, int64_t, const Plan&, torch::Device) {
  throw std::logic_error("script mode: the command reads its own data");
}
Batch ScriptWorkload::val_batch(int64_t, int64_t, const Plan&, torch::Device) {
  throw std::logic_error("script mode: the command reads its own data");
}

EstimateTerms ScriptWorkload::estimate_terms(const Plan&) const {
  EstimateTerms e;
  e.activations_known = false;  // nothing is known ahead: every line comes from measured peaks
  e.reserve_fraction = 0;
  return e;
}

}  // namespace autotune
