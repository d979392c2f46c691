// Trials in fresh processes (include/autotune/isolated_trials.h): the parent side (fork + exec of
// this binary, a memory cgroup per trial where one can be made, the wait and the answer) and the
// child side (`autotune trial`).
#include "autotune/isolated_trials.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

#include <spdlog/spdlog.h>

#include "autotune/errors.h"
#include "autotune/size.h"
#include "run/child_process.h"
#include "run/run_context.h"

extern char** environ;

namespace autotune {

namespace fs = std::filesystem;

namespace {

constexpr const char* kRequestEnv = "AUTOTUNE_TRIAL_REQUEST";
constexpr const char* kAnswerFdEnv = "AUTOTUNE_TRIAL_FD";
constexpr int kAnswerFd = 3;

std::string read_text(const std::string& path) {
  std::ifstream f(path);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

bool write_text(const std::string& path, const std::string& text) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_CLOEXEC);
  if (fd < 0) return false;
  const bool ok = ::write(fd, text.data(), text.size()) == static_cast<ssize_t>(text.size());
  ::close(fd);
  return ok;
}

uint64_t read_u64(const std::string& path) {
  const std::string t = read_text(path);
  return t.empty() || t[0] < '0' || t[0] > '9' ? 0 : std::stoull(t);
}

// The value of `key` in a file of "key value" lines (memory.events, memory.oom_control).
uint64_t keyed_value(const std::string& path, const std::string& key) {
  std::istringstream in(read_text(path));
  std::string k;
  uint64_t v = 0;
  while (in >> k >> v)
    if (k == key) return v;
  return 0;
}

// The launcher's world stays with this process: a trial is one process alone.
bool inherited(const std::string& entry) {
  for (const char* name :
       {"WORLD_SIZE=", "RANK=", "LOCAL_RANK=", "AUTOTUNE_TRIAL_REQUEST=", "AUTOTUNE_TRIAL_FD="})
    if (entry.rfind(name, 0) == 0) return false;
  return true;
}

}  // namespace

// ---- memory cgroups
// ------------------------------------------------------------------------------

std::optional<TrialCgroups> TrialCgroups::open(std::string* why) {
  // Off by the user's choice: where the cgroup parent is shared with other jobs, or to see the
  // figures a machine without cgroups would give.
  if (const char* v = std::getenv("AUTOTUNE_CGROUPS"); v && std::string(v) == "off") {
    *why = "AUTOTUNE_CGROUPS=off";
    return std::nullopt;
  }
  std::ifstream f("/proc/self/cgroup");
  std::string line;
  TrialCgroups cg;
  while (std::getline(f, line)) {
    const auto c1 = line.find(':'), c2 = line.find(':', c1 + 1);
    if (c1 == std::string::npos || c2 == std::string::npos) continue;
    const std::string controllers = "," + line.substr(c1 + 1, c2 - c1 - 1) + ",";
    const std::string rel = line.substr(c2 + 1);
    if (controllers.find(",memory,") != std::string::npos &&
        fs::exists("/sys/fs/cgroup/memory/memory.limit_in_bytes")) {
      cg.parent_ = "/sys/fs/cgroup/memory" + rel;
      cg.v2_ = false;
      break;
    }
    if (line.rfind("0::", 0) == 0)
      for (const char* mount : {"/sys/fs/cgroup", "/sys/fs/cgroup/unified"})
        if (read_text(std::string(mount) + "/cgroup.controllers").find("memory") !=
            std::string::npos) {
          cg.parent_ = mount + rel;
          cg.v2_ = true;
        }
  }
  if (cg.parent_.empty()) {
    *why = "no memory cgroup controller is mounted";
    return std::nullopt;
  }
  // v2 makes a child's memory limit only where the parent delegates the controller.
  if (cg.v2_ &&
      read_text(cg.parent_ + "/cgroup.subtree_control").find("memory") == std::string::npos) {
    *why = cg.parent_ + " does not delegate the memory controller to child cgroups";
    return std::nullopt;
  }
  // Cgroups of probes that were killed before they could remove theirs.
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(cg.parent_, ec)) {
    const std::string name = e.path().filename().string();
    if (name.rfind("autotune-trial-", 0) != 0) continue;
    const std::string pid = name.substr(15, name.find('-', 15) - 15);
    if (!fs::exists("/proc/" + pid)) ::rmdir(e.path().c_str());
  }
  try {
    const std::string dir = cg.make(uint64_t{1} << 40);
    cg.remove(dir);
  } catch (const RuntimeError& e) {
    *why = e.what();
    return std::nullopt;
  }
  return cg;
}

std::string TrialCgroups::make(uint64_t limit_bytes) {
  const std::string dir =
      parent_ + "/autotune-trial-" + std::to_string(::getpid()) + "-" + std::to_string(++made_);
  std::error_code ec;
  fs::remove(dir, ec);  // an earlier process's leftover of the same pid
  if (::mkdir(dir.c_str(), 0755) != 0)
    throw RuntimeError("cannot make the memory cgroup " + dir + ": " + std::strerror(errno));
  if (limit_bytes > 0) {
    const std::string limit = std::to_string(limit_bytes);
    const bool ok = v2_ ? write_text(dir + "/memory.max", limit)
                        : write_text(dir + "/memory.limit_in_bytes", limit);
    if (v2_) write_text(dir + "/memory.swap.max", "0");  // a trial's peak is RAM, not swap
    if (!ok) {
      const std::string err = std::strerror(errno);
      remove(dir);
      throw RuntimeError("cannot set the memory limit of " + dir + ": " + err);
    }
  }
  return dir;
}

std::string TrialCgroups::procs_file(const std::string& dir) const {
  return dir + "/cgroup.procs";
}

uint64_t TrialCgroups::peak_bytes(const std::string& dir) const {
  return read_u64(dir + (v2_ ? "/memory.peak" : "/memory.max_usage_in_bytes"));
}

uint64_t TrialCgroups::oom_kills(const std::string& dir) const {
  return keyed_value(dir + (v2_ ? "/memory.events" : "/memory.oom_control"), "oom_kill");
}

void TrialCgroups::remove(const std::string& dir) const {
  // The last process may still be leaving the cgroup right after it was reaped.
  for (int i = 0; i < 100 && ::rmdir(dir.c_str()) != 0 && errno == EBUSY; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
}

// ---- the parent
// ----------------------------------------------------------------------------------

IsolatedTrials::IsolatedTrials(IsolatedTrialsOptions options)
    : opt_(std::move(options)), baseline_bytes_(opt_.baseline_bytes) {
  std::string why;
  if (opt_.budget_bytes > 0) cgroups_ = TrialCgroups::open(&why);
  if (cgroups_) {
    containment_ = "each trial in a fresh process and its own memory cgroup under " +
                   cgroups_->parent() + " (limit: the budget)";
  } else {
    containment_ =
        "each trial in a fresh process; no memory cgroup per trial (" +
        (opt_.budget_bytes ? why : std::string("no budget")) +
        "): a trial the kernel kills is still refused, its figure the largest resident size " +
        "seen every 20 ms";
  }
}

namespace {

// The trial's child between fork and exec: a child of a threaded process may only make
// async-signal-safe calls here. Never returns.
[[noreturn]] void exec_trial(pid_t parent, int answer_fd, int log_fd, const char* procs_path,
                             char* const* argv, char* const* envp) {
  ::prctl(PR_SET_PDEATHSIG, SIGKILL);  // never outlive the probe
  if (::getppid() != parent) ::_exit(126);
  child_oom_first();  // the kernel's OOM killer takes a trial before the probe that started it
  ::dup2(log_fd, 1);
  ::dup2(log_fd, 2);
  // Into the trial's cgroup before exec, so everything the process maps is charged there.
  child_join_cgroup(procs_path, "autotune trial: cannot join its memory cgroup\n");
  child_keep_fd(answer_fd, kAnswerFd);
  child_unblock_signals();
  ::execve("/proc/self/exe", argv, envp);
  const char msg[] = "autotune trial: exec of /proc/self/exe failed\n";
  if (::write(2, msg, sizeof msg - 1) < 0) {
  }
  ::_exit(127);
}

// How a trial process ended, and what the wait saw.
struct Reaped {
  int status = 0;            // waitpid's
  uint64_t largest_rss = 0;  // a killed trial's figure where no cgroup keeps its peak
  int stop = 0;              // the user's stop signal, if one came (the trial was killed)
  bool timed_out = false;    // killed after `timeout`
};

// Waits for `pid`, polling every 20 ms for its resident size, the user's stop and the timeout.
Reaped reap(pid_t pid, std::chrono::steady_clock::time_point t0,
            const std::atomic<int>* stop_signal, std::chrono::seconds timeout) {
  Reaped r;
  for (;;) {
    const pid_t w = ::waitpid(pid, &r.status, WNOHANG);
    if (w == pid) break;
    if (w < 0 && errno != EINTR) break;
    r.largest_rss = std::max(r.largest_rss, rss_of(pid));
    if (stop_signal && stop_signal->load() != 0) r.stop = stop_signal->load();
    r.timed_out = std::chrono::steady_clock::now() - t0 > timeout;
    if (r.stop || r.timed_out) {
      ::kill(pid, SIGKILL);
      while (::waitpid(pid, &r.status, 0) < 0 && errno == EINTR) {
      }
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return r;
}

}  // namespace

IsolatedTrials::Outcome IsolatedTrials::spawn(const nlohmann::json& request, bool limit) {
  // Everything the child needs is made before fork: between fork and exec a child of a threaded
  // process may only make async-signal-safe calls.
  std::vector<std::string> args = {"autotune", "trial"};
  args.insert(args.end(), opt_.flags.begin(), opt_.flags.end());
  std::vector<std::string> env;
  for (char** e = environ; *e; ++e)
    if (inherited(*e)) env.emplace_back(*e);
  env.push_back(std::string(kRequestEnv) + "=" + request.dump());
  env.push_back(std::string(kAnswerFdEnv) + "=" + std::to_string(kAnswerFd));
  std::vector<char*> argv, envp;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  for (auto& e : env) envp.push_back(e.data());
  envp.push_back(nullptr);

  const int answer_fd = make_memfd("autotune-trial-answer"),
            log_fd = make_memfd("autotune-trial-log");
  std::string cgroup;
  if (limit && cgroups_) cgroup = cgroups_->make(opt_.budget_bytes);
  const std::string procs = cgroup.empty() ? std::string() : cgroups_->procs_file(cgroup);
  const char* procs_path = procs.empty() ? nullptr : procs.c_str();
  const pid_t parent = ::getpid();
  const auto t0 = std::chrono::steady_clock::now();
  const pid_t pid = ::fork();
  if (pid == 0) exec_trial(parent, answer_fd, log_fd, procs_path, argv.data(), envp.data());
  if (pid < 0) {
    const std::string err = std::strerror(errno);
    ::close(answer_fd);
    ::close(log_fd);
    if (!cgroup.empty()) cgroups_->remove(cgroup);
    throw RuntimeError("cannot start a trial process: " + err);
  }
  ++processes_;

  Outcome o;
  const Reaped r = reap(pid, t0, opt_.stop_signal, opt_.timeout);
  const std::string answer = drain_memfd(answer_fd), log = drain_memfd(log_fd);
  ::close(answer_fd);
  ::close(log_fd);
  if (!cgroup.empty()) {
    o.killed_at_bytes = cgroups_->peak_bytes(cgroup);
    cgroups_->remove(cgroup);
  }
  if (o.killed_at_bytes == 0) o.killed_at_bytes = r.largest_rss;
  if (r.stop)
    throw StoppedBySignal(r.stop, "stopped by signal " + std::to_string(r.stop) +
                                      " during the probe: no plan was chosen, nothing trained");
  if (r.timed_out)
    throw RuntimeError("a trial process ran longer than " + std::to_string(opt_.timeout.count()) +
                       " s and was stopped; its last line: " + last_line(log));
  o.exit_code = WIFEXITED(r.status) ? WEXITSTATUS(r.status) : 128 + WTERMSIG(r.status);
  o.killed = WIFSIGNALED(r.status) && WTERMSIG(r.status) == SIGKILL;
  o.last_line = last_line(log);
  const std::string line = last_line(answer);
  if (!line.empty()) {
    try {
      o.result = nlohmann::json::parse(line);
    } catch (const nlohmann::json::exception&) {
      // A torn answer (killed while writing it) is no answer.
    }
  }
  if (o.result)
    (*o.result)["process_s"] =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return o;
}

nlohmann::json IsolatedTrials::answer(const Outcome& o, const char* what) const {
  if (o.result && o.exit_code == 0) return *o.result;
  throw RuntimeError(std::string("a trial process (") + what + ") " +
                     (o.exit_code > 128
                          ? "was killed by signal " + std::to_string(o.exit_code - 128)
                          : "exited with code " + std::to_string(o.exit_code)) +
                     (o.last_line.empty() ? std::string(" without a word") : ": " + o.last_line));
}

nlohmann::json IsolatedTrials::plan_request(const char* kind, const Plan& plan,
                                            const ProbeOptions& probe) const {
  return {{"kind", kind},
          {"plan", plan},
          {"probe", probe},
          {"device", opt_.device.str()},
          {"device_bytes_of_probe", opt_.device_bytes_of_probe}};
}

Trial IsolatedTrials::run(const Plan& plan, const ProbeOptions& probe) {
  const nlohmann::json request = plan_request("trial", plan, probe);
  const Outcome o = spawn(request, /*limit=*/true);
  if (o.killed && !o.result) {
    Trial t;
    t.plan = plan;
    t.killed = true;
    t.peak_bytes = o.killed_at_bytes;
    t.reason = "Killed at " + format_bytes(o.killed_at_bytes) + " by the kernel" +
               (cgroups_ ? " (its memory cgroup's limit, or the machine's)" : "");
    return t;
  }
  const nlohmann::json a = answer(o, "trial");
  Trial t = a.at("trial").get<Trial>();
  t.process_s = a.at("process_s").get<double>();
  baseline_bytes_ = a.at("baseline_bytes").get<uint64_t>();
  return t;
}

std::vector<std::vector<double>> IsolatedTrials::retime(const std::vector<Trial>& finalists,
                                                        int rounds, const ProbeOptions& probe) {
  nlohmann::json plans = nlohmann::json::array(), rates = nlohmann::json::array();
  for (const auto& f : finalists) {
    plans.push_back(f.plan);
    rates.push_back(f.tokens_per_s);
  }
  const nlohmann::json request = {{"kind", "retime"},      {"plans", plans},
                                  {"tokens_per_s", rates}, {"rounds", rounds},
                                  {"probe", probe},        {"device", opt_.device.str()}};
  const Outcome o = spawn(request, /*limit=*/false);
  if (o.killed && !o.result) return std::vector<std::vector<double>>(finalists.size());
  return answer(o, "timing").at("timings").get<std::vector<std::vector<double>>>();
}

double IsolatedTrials::precision_speed(Precision precision) {
  if (precision == Precision::fp32) return 1.0;
  auto it = speeds_.find(precision);
  if (it != speeds_.end()) return it->second;
  const nlohmann::json request = {
      {"kind", "speed"}, {"precision", to_string(precision)}, {"device", opt_.device.str()}};
  const double speed = answer(spawn(request, /*limit=*/false), "matmul speed").at("speed");
  speeds_[precision] = speed;
  return speed;
}

std::optional<uint64_t> IsolatedTrials::need_bytes(const Plan& plan, const ProbeOptions& probe) {
  const nlohmann::json request = plan_request("need", plan, probe);
  const Outcome o = spawn(request, /*limit=*/false);
  if (o.killed && !o.result) return std::nullopt;
  const Trial t = answer(o, "need").at("trial").get<Trial>();
  if (!t.fits) return std::nullopt;
  return t.peak_bytes;
}

// ---- the child
// -----------------------------------------------------------------------------------

namespace {

void write_answer(int fd, const nlohmann::json& a) {
  const std::string line = a.dump() + "\n";
  size_t done = 0;
  while (done < line.size()) {
    const ssize_t n = ::write(fd, line.data() + done, line.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0)
      throw RuntimeError("cannot write the trial's answer: " + std::string(std::strerror(errno)));
    done += static_cast<size_t>(n);
  }
}

// One trial as a training run of its plan does it: one warm-up step in the plan's precision (the
// one-time growth, outside the figures), the budget's caps, then the trial. `capped` false: the
// plan's need, with no cap.
nlohmann::json one_trial(RunContext& ctx, const nlohmann::json& request, bool capped) {
  const Plan plan = request.at("plan").get<Plan>();
  ProbeOptions probe = request.at("probe").get<ProbeOptions>();
  probe.device = ctx.device();
  ctx.workload().validate(plan);
  ctx.warm_up({plan.precision});
  Trial t;
  if (capped) {
    try {
      ctx.enforce_budget(/*for_trial=*/true);
    } catch (const RuntimeError& e) {
      // The budget is below what this process holds before any tensor: a refusal for memory.
      t.plan = plan;
      t.oom = true;
      t.peak_bytes = ctx.meter().baseline_bytes();
      t.reason = e.what();
      return {{"trial", t}, {"baseline_bytes", ctx.meter().baseline_bytes()}};
    }
  } else {
    probe.usable_bytes = UINT64_MAX;
    probe.min_measure_s = 0;
    probe.stop_below_tokens_per_s = 0;
  }
  t = run_trial(ctx.workload(), plan, probe, ctx.meter());
  return {{"trial", t}, {"baseline_bytes", ctx.meter().baseline_bytes()}};
}

// Finalists timed in turns; memory is not measured, so no cap, and every precision among them
// warmed up first.
nlohmann::json retime(RunContext& ctx, const nlohmann::json& request) {
  const auto plans = request.at("plans").get<std::vector<Plan>>();
  const auto rates = request.at("tokens_per_s").get<std::vector<double>>();
  const int rounds = request.at("rounds").get<int>();
  ProbeOptions probe = request.at("probe").get<ProbeOptions>();
  probe.device = ctx.device();
  probe.usable_bytes = UINT64_MAX;
  std::vector<Precision> precisions;
  for (const auto& p : plans)
    if (std::find(precisions.begin(), precisions.end(), p.precision) == precisions.end())
      precisions.push_back(p.precision);
  ctx.warm_up(precisions);
  std::vector<std::vector<double>> timings(plans.size());
  for (int round = 0; round < rounds; ++round)
    for (size_t i = 0; i < plans.size(); ++i)
      timings[i].push_back(time_plan(ctx.workload(), plans[i], probe, ctx.meter(), rates.at(i)));
  return {{"timings", timings}};
}

}  // namespace

int trial_command(const RunSpec& spec_in) {
  const char* request_text = std::getenv(kRequestEnv);
  const char* fd_text = std::getenv(kAnswerFdEnv);
  if (!request_text || !fd_text)
    throw UsageError("autotune trial runs one trial for autotune run or probe; run those instead");
  const nlohmann::json request = nlohmann::json::parse(request_text);
  const int fd = std::atoi(fd_text);
  // A trial is the training process of its plan, minus what only a run does with its results.
  RunSpec spec = spec_in;
  spec.device = request.at("device").get<std::string>();
  spec.resume = spec.resume_auto = false;
  spec.run_dir.clear();
  spec.json = false;
  if (!spec.verbose) spdlog::set_level(spdlog::level::warn);
  RunContext ctx(spec);
  ctx.meter().exclude_device_bytes(request.value("device_bytes_of_probe", uint64_t{0}));
  const std::string kind = request.at("kind").get<std::string>();
  nlohmann::json a;
  if (kind == "trial" || kind == "need") {
    a = one_trial(ctx, request, kind == "trial");
  } else if (kind == "retime") {
    a = retime(ctx, request);
  } else if (kind == "speed") {
    a = {{"speed", matmul_speed_vs_fp32(
                       ctx.device(), parse_precision(request.at("precision").get<std::string>()))}};
  } else {
    throw UsageError("autotune trial: unknown request kind '" + kind + "'");
  }
  write_answer(fd, a);
  return kExitOk;
}

}  // namespace autotune
