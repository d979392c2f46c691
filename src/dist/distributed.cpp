// c10d's TCPStore and ProcessGroupGloo, from the torch wheel's libtorch_cpu. The wheel ships the
// c10d headers but not gloo's; ProcessGroupGloo.hpp needs gloo's (Debian's libgloo-dev, headers
// only: the gloo code that runs is the one inside libtorch_cpu). test_distributed runs real
// collectives through them (docs/DECISIONS.md).
#include "autotune/distributed.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <thread>

#include <spdlog/spdlog.h>
// ProcessGroupGloo.hpp declares its class only under this macro (defined here, not on the command
// line, so the precompiled torch header stays valid for this file).
#define USE_C10D_GLOO 1
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include "autotune/errors.h"
#include "util/c_strings.h"

extern char** environ;

namespace autotune {

#ifdef AUTOTUNE_WITH_CUDA
namespace detail {  // src/memory/cuda_memory.cpp
c10::intrusive_ptr<c10d::Backend> make_nccl_backend(const c10::intrusive_ptr<c10d::Store>& store,
                                                    int rank, int size,
                                                    std::chrono::milliseconds timeout);
}
#endif

namespace {

std::optional<long> env_int(const char* name) {
  const char* v = std::getenv(name);
  if (!v || !*v) return std::nullopt;
  char* end = nullptr;
  errno = 0;
  const long x = std::strtol(v, &end, 10);
  if (errno || *end || x < 0)
    throw UsageError(std::string(name) + "=" + v +
                     " is not a non-negative integer; fix the launcher's environment");
  return x;
}

std::vector<uint8_t> bytes(const std::string& s) {
  return {s.begin(), s.end()};
}

std::string hostname() {
  char buf[256] = {};
  gethostname(buf, sizeof buf - 1);
  return buf;
}

// Alive and not a zombie (a killed child its parent has not reaped yet still answers kill 0).
bool process_alive(long pid) {
  if (kill(static_cast<pid_t>(pid), 0) != 0) return errno != ESRCH;
  std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
  std::string line;
  std::getline(stat, line);
  const auto close = line.rfind(')');
  if (close == std::string::npos) return true;
  // After the name: state ppid pgrp session tty_nr tpgid flags. A killed process closes its
  // sockets (which is how its peers notice) before it turns zombie, while PF_EXITING is already
  // set: either means it is gone.
  std::istringstream rest(line.substr(close + 1));
  char state = '?';
  long skip = 0;
  unsigned long flags = 0;
  rest >> state >> skip >> skip >> skip >> skip >> skip >> flags;
  constexpr unsigned long kPfExiting = 0x4;
  return state != 'Z' && state != 'X' && !(flags & kPfExiting);
}

}  // namespace

WorldInfo world_from_env() {
  WorldInfo w;
  const auto size = env_int("WORLD_SIZE");
  if (!size || *size <= 1) return w;
  w.size = static_cast<int>(*size);
  const auto rank = env_int("RANK");
  if (!rank) throw UsageError("WORLD_SIZE is set but RANK is not; set both (or use --nproc N)");
  if (*rank >= w.size)
    throw UsageError("RANK " + std::to_string(*rank) + " is not below WORLD_SIZE " +
                     std::to_string(w.size) + "; fix the launcher's environment");
  w.rank = static_cast<int>(*rank);
  w.local_rank = static_cast<int>(env_int("LOCAL_RANK").value_or(w.rank));
  if (const char* a = std::getenv("MASTER_ADDR"); a && *a) w.master_addr = a;
  if (const auto p = env_int("MASTER_PORT")) {
    if (*p == 0 || *p > 65535)
      throw UsageError("MASTER_PORT=" + std::to_string(*p) + " is not a TCP port (1-65535)");
    w.master_port = static_cast<int>(*p);
  }
  return w;
}

struct Communicator::Impl {
  c10::intrusive_ptr<c10d::TCPStore> store;
  c10::intrusive_ptr<c10d::Backend> pg;  // Gloo on CPU, NCCL on CUDA

  // In place: the elementwise `op` over ranks.
  void all_reduce(at::Tensor& t, c10d::ReduceOp op = c10d::ReduceOp::SUM) {
    std::vector<at::Tensor> one{t};
    c10d::AllreduceOptions o;
    o.reduceOp = op;
    pg->allreduce(one, o)->wait();
  }
  void set(const std::string& key, const std::string& text) { store->set(key, bytes(text)); }
  std::string get(const std::string& key) {
    const auto v = store->get(key);
    return {v.begin(), v.end()};
  }
  std::string wait_and_get(const std::string& key, std::chrono::milliseconds wait) {
    store->wait({key}, wait);
    return get(key);
  }
};

Communicator::Communicator(const WorldInfo& world, std::chrono::milliseconds timeout,
                           torch::Device device)
    : world_(world), timeout_(timeout), device_(device), impl_(std::make_unique<Impl>()) {
  try {
    c10d::TCPStoreOptions so;
    so.port = static_cast<uint16_t>(world.master_port);
    // Under torchrun the agent already serves the store at MASTER_PORT: every rank is a client.
    const char* agent_store = std::getenv("TORCHELASTIC_USE_AGENT_STORE");
    so.isServer = world.rank == 0 && !(agent_store && std::string(agent_store) == "True");
    so.numWorkers = world.size;
    so.timeout = timeout;
    impl_->store = c10::make_intrusive<c10d::TCPStore>(world.master_addr, so);
    if (device.is_cuda()) {
#ifdef AUTOTUNE_WITH_CUDA
      impl_->pg = detail::make_nccl_backend(impl_->store, world.rank, world.size, timeout);
#else
      throw UsageError(
          "this autotune was built without CUDA; ranks on a CUDA device need a CUDA "
          "LibTorch build");
#endif
    } else {
      auto opts = c10d::ProcessGroupGloo::Options::create();
      // Loopback for a local world; the host's name (resolved by gloo) when ranks span hosts.
      const bool local = world.master_addr == "127.0.0.1" || world.master_addr == "localhost";
      opts->devices.push_back(local ? c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1")
                                    : c10d::ProcessGroupGloo::createDefaultDevice());
      opts->timeout = timeout;
      impl_->pg =
          c10::make_intrusive<c10d::ProcessGroupGloo>(impl_->store, world.rank, world.size, opts);
    }
    const std::string r = std::to_string(world.rank);
    impl_->set("pid/" + r, std::to_string(getpid()));
    impl_->set("host/" + r, hostname());
    barrier();
  } catch (const std::exception& e) {
    throw RuntimeError("rank " + std::to_string(world.rank) + " of " + std::to_string(world.size) +
                       " could not join the others at " + world.master_addr + ":" +
                       std::to_string(world.master_port) + " within " +
                       std::to_string(timeout.count() / 1000) + " s (" + e.what() +
                       "); start every rank, or check MASTER_ADDR / MASTER_PORT");
  }
  flag_ = torch::zeros({1}, torch::dtype(torch::kInt32).device(device_));
}

Communicator::~Communicator() = default;

std::string Communicator::backend() const {
  return impl_->pg->getBackendName();
}

void Communicator::lost(const std::exception& e) const {
  // Which rank is gone: a local peer whose process no longer exists. Rank 0 holds the store, so
  // when it is gone the store does not answer either.
  std::string who;
  try {
    const std::string here = hostname();
    for (int r = 0; r < world_.size; ++r) {
      if (r == world_.rank) continue;
      if (impl_->get("host/" + std::to_string(r)) != here) continue;
      if (!process_alive(std::stol(impl_->get("pid/" + std::to_string(r)))))
        who += (who.empty() ? "" : ", ") + std::to_string(r);
    }
  } catch (const std::exception&) {
    if (world_.rank != 0) who = "0";
  }
  std::string what = e.what();
  if (auto nl = what.find('\n'); nl != std::string::npos) what.resize(nl);
  const bool rank0_lost = who == "0" || who.rfind("0, ", 0) == 0;
  throw LostRank("rank " + std::to_string(world_.rank) + ": lost " +
                     (who.empty() ? std::string("a peer rank") : "rank " + who) +
                     " (a collective failed or waited over " +
                     std::to_string(timeout_.count() / 1000) + " s: " + what +
                     "); the run stops here, resume it with --resume auto",
                 rank0_lost);
}

void Communicator::guarded(const std::function<void()>& f) const {
  try {
    f();
  } catch (const std::exception& e) {
    lost(e);
  }
}

void Communicator::broadcast(std::vector<torch::Tensor> tensors, int root) {
  guarded([&] {
    c10d::BroadcastOptions o;
    o.rootRank = root;
    for (auto& t : tensors) {
      std::vector<at::Tensor> one{t};
      impl_->pg->broadcast(one, o)->wait();
    }
  });
}

void Communicator::broadcast_shards(const std::vector<torch::Tensor>& params,
                                    const std::vector<int>& owners, int64_t bucket_bytes) {
  const auto t0 = std::chrono::steady_clock::now();
  torch::NoGradGuard no_grad;
  auto flush = [&](std::vector<torch::Tensor>& bucket, int root) {
    if (bucket.empty()) return;
    std::vector<torch::Tensor> pieces;
    for (auto& p : bucket) pieces.push_back(p.detach().reshape(-1));
    // [sum of numel]: the owner's updated values; the others' copy is overwritten.
    at::Tensor flat = torch::cat(pieces);
    guarded([&] {
      std::vector<at::Tensor> one{flat};
      c10d::BroadcastOptions o;
      o.rootRank = root;
      impl_->pg->broadcast(one, o)->wait();
    });
    if (world_.rank != root) {
      int64_t at = 0;
      for (auto& p : bucket) {
        p.detach().copy_(flat.narrow(0, at, p.numel()).view_as(p));
        at += p.numel();
      }
    }
    bucket.clear();
  };
  for (int root = 0; root < world_.size; ++root) {
    std::vector<torch::Tensor> bucket;
    int64_t bytes = 0;
    for (size_t i = 0; i < params.size(); ++i) {
      if (owners[i] != root) continue;
      const auto& p = params[i];
      const int64_t b = p.numel() * static_cast<int64_t>(p.element_size());
      if (!bucket.empty() &&
          (bytes + b > bucket_bytes || p.scalar_type() != bucket[0].scalar_type() ||
           p.device() != bucket[0].device())) {
        flush(bucket, root);
        bytes = 0;
      }
      bucket.push_back(p);
      bytes += b;
    }
    flush(bucket, root);
  }
  broadcast_seconds_ +=
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

torch::Tensor Communicator::average(const torch::Tensor& t) {
  at::Tensor sum = t.detach().clone();
  guarded([&] { impl_->all_reduce(sum); });
  return sum.div_(static_cast<double>(world_.size));
}

void Communicator::sum_in_place(torch::Tensor& t) {
  guarded([&] { impl_->all_reduce(t); });
}

bool Communicator::any(bool flag) {
  // On the device: NCCL reduces device tensors only.
  flag_.fill_(flag ? 1 : 0);
  guarded([&] { impl_->all_reduce(flag_, c10d::ReduceOp::MAX); });
  return flag_.item<int32_t>() != 0;
}

std::string Communicator::share_text(const std::string& key, const std::string& text, int root,
                                     std::chrono::milliseconds wait) {
  std::string out = text;
  guarded([&] {
    if (world_.rank == root)
      impl_->set(key, text);
    else
      out = impl_->wait_and_get(key, wait);
  });
  return out;
}

std::vector<std::string> Communicator::gather_text(const std::string& key, const std::string& text,
                                                   int root, std::chrono::milliseconds wait) {
  std::vector<std::string> all;
  guarded([&] {
    impl_->set(key + "/" + std::to_string(world_.rank), text);
    if (world_.rank != root) return;
    for (int r = 0; r < world_.size; ++r)
      all.push_back(impl_->wait_and_get(key + "/" + std::to_string(r), wait));
  });
  return all;
}

void Communicator::barrier() {
  guarded([&] { impl_->pg->barrier()->wait(); });
}

struct GradientReducer::Bucket {
  std::vector<size_t> params;  // indices into params_, in bucket order
  size_t pending = 0;          // gradients not accumulated yet in the armed backward
  at::Tensor flat;             // [sum of numel]: the gradients, summed over ranks in place
  c10::intrusive_ptr<c10d::Work> work;
  bool started = false, done = false;
};

namespace {
// Runs after AccumulateGrad wrote a parameter's .grad (once per backward, also for a parameter
// used twice, such as tied embeddings: autograd sums its inputs first).
struct ReducerHook : torch::autograd::PostAccumulateGradHook {
  ReducerHook(std::function<void()> f) : f(std::move(f)) {}
  void operator()(const torch::autograd::Variable&) override { f(); }
  std::function<void()> f;
};
constexpr int64_t kFirstBucketBytes = 1 << 20;  // DDP's first bucket: the first all-reduce soon
}  // namespace

bool overlap_allreduce(torch::Device device) {
  if (const char* v = std::getenv("AUTOTUNE_OVERLAP_ALLREDUCE"); v && *v)
    return std::string(v) != "0";
  return !device.is_cpu();
}

GradientReducer::GradientReducer(Communicator& comm, const std::vector<torch::Tensor>& params,
                                 bool overlap, int64_t bucket_bytes)
    : comm_(comm), overlap_(overlap) {
  for (const auto& p : params)
    if (p.requires_grad()) params_.push_back(p);
  bucket_of_.assign(params_.size(), 0);
  int64_t bytes = 0;
  for (size_t k = params_.size(); k-- > 0;) {
    const auto& p = params_[k];
    const int64_t b = p.numel() * static_cast<int64_t>(p.element_size());
    const int64_t cap = buckets_.size() == 1 ? kFirstBucketBytes : bucket_bytes;
    if (buckets_.empty() || (bytes > 0 && bytes + b > cap) ||
        p.scalar_type() != params_[buckets_.back().params.front()].scalar_type() ||
        p.device() != params_[buckets_.back().params.front()].device()) {
      buckets_.emplace_back();
      bytes = 0;
    }
    buckets_.back().params.push_back(k);
    bucket_of_[k] = buckets_.size() - 1;
    bytes += b;
  }
  if (!overlap_) return;  // finish() starts them all
  for (size_t k = 0; k < params_.size(); ++k)
    torch::autograd::impl::set_post_acc_grad_hooks(
        params_[k], std::make_unique<ReducerHook>([this, k] { on_gradient(k); }));
}

GradientReducer::~GradientReducer() {
  if (!overlap_) return;
  for (const auto& p : params_) torch::autograd::impl::set_post_acc_grad_hooks(p, nullptr);
}

void GradientReducer::begin_step() {
  armed_ = began_ = finished_ = false;
}

void GradientReducer::arm() {
  began_ = true;
  for (auto& b : buckets_) {
    b.pending = b.params.size();
    b.flat = at::Tensor();
    b.work.reset();
    b.started = b.done = false;
  }
  next_ = 0;
  armed_ = true;
}

void GradientReducer::on_gradient(size_t param) {
  if (!armed_) return;  // an earlier micro-batch: its gradients are not final yet
  Bucket& b = buckets_[bucket_of_[param]];
  if (b.pending > 0) --b.pending;
  start_ready();
}

void GradientReducer::start_ready() {
  // next_ moves past a bucket only once its all-reduce started: an OOM in start() leaves it for
  // abandon(), so this rank still runs every all-reduce the others run.
  while (next_ < buckets_.size() && buckets_[next_].pending == 0) {
    start(buckets_[next_], false);
    ++next_;
  }
  // Buckets whose all-reduce is over hand their averages back now: their flat copy is freed
  // while backward goes on, so at most the buckets in flight are alive beside the gradients.
  for (size_t i = 0; i < next_; ++i)
    if (!buckets_[i].done && buckets_[i].work && buckets_[i].work->isCompleted())
      complete(buckets_[i], true);
}

void GradientReducer::start(Bucket& b, bool zeros) {
  torch::NoGradGuard no_grad;
  std::vector<torch::Tensor> pieces;
  for (size_t k : b.params) {
    const auto& p = params_[k];
    pieces.push_back(zeros || !p.grad().defined() ? torch::zeros({p.numel()}, p.options())
                                                  : p.grad().reshape(-1));
  }
  b.flat = torch::cat(pieces);  // an OOM here leaves the bucket not started
  comm_.guarded([&] {
    std::vector<at::Tensor> one{b.flat};
    b.work = comm_.impl_->pg->allreduce(one);
  });
  b.started = true;
}

void GradientReducer::complete(Bucket& b, bool write_back) {
  comm_.guarded([&] { b.work->wait(); });
  b.done = true;
  if (write_back) {
    torch::NoGradGuard no_grad;
    b.flat.div_(static_cast<double>(comm_.size()));
    int64_t at = 0;
    for (size_t k : b.params) {
      auto& p = params_[k];
      // A parameter without a gradient (unused this step) gets the average of the others'.
      if (!p.grad().defined()) p.mutable_grad() = torch::zeros_like(p);
      p.mutable_grad().copy_(b.flat.narrow(0, at, p.numel()).view_as(p));
      at += p.numel();
    }
  }
  b.flat = at::Tensor();
  b.work.reset();
}

void GradientReducer::finish() {
  const auto t0 = std::chrono::steady_clock::now();
  armed_ = false;
  for (; next_ < buckets_.size(); ++next_) start(buckets_[next_], false);
  for (auto& b : buckets_)
    if (!b.done) complete(b, true);
  finished_ = true;
  comm_.allreduce_seconds_ +=
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  ++comm_.allreduce_calls_;
}

void GradientReducer::abandon() {
  if (finished_) return;  // the OOM came after finish(): every rank ran every all-reduce
  if (!began_) arm();     // the OOM came before the last backward: none of the step's has started
  armed_ = false;
  for (; next_ < buckets_.size(); ++next_) start(buckets_[next_], true);
  for (auto& b : buckets_)
    if (b.started && !b.done) complete(b, false);
  finished_ = true;
}

int free_loopback_port() {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof a;
  if (fd < 0 || bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 ||
      getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) != 0) {
    if (fd >= 0) close(fd);
    throw RuntimeError(std::string("no free loopback port for the ranks: ") + std::strerror(errno));
  }
  const int port = ntohs(a.sin_port);
  close(fd);
  return port;
}

namespace {

// The launcher's signal handler only counts; the wait loop forwards (a handler that walks the
// children would race the loop that writes them).
volatile sig_atomic_t g_signals_received = 0;
volatile sig_atomic_t g_last_signal = 0;
void note_signal(int sig) {
  g_last_signal = sig;
  g_signals_received = g_signals_received + 1;
}

std::string describe_status(int status) {
  if (WIFSIGNALED(status))
    return std::string("killed by signal ") + std::to_string(WTERMSIG(status)) + " (" +
           strsignal(WTERMSIG(status)) + ")";
  return "exited with code " + std::to_string(WEXITSTATUS(status));
}

// Rank r's environment, made before any process starts (nothing is allocated between fork and
// exec): this process's, with the launcher's variables replaced; the user's OMP_NUM_THREADS wins.
std::vector<std::string> rank_environment(int rank, int nproc, int port,
                                          const std::string& threads) {
  const std::vector<std::string> ours = {"RANK",        "LOCAL_RANK",  "WORLD_SIZE",
                                         "MASTER_ADDR", "MASTER_PORT", "AUTOTUNE_LAUNCHER_PID"};
  std::vector<std::string> env;
  bool user_threads = false;
  for (char** e = environ; *e; ++e) {
    const std::string var = *e;
    const std::string name = var.substr(0, var.find('='));
    if (std::find(ours.begin(), ours.end(), name) != ours.end()) continue;
    user_threads = user_threads || name == "OMP_NUM_THREADS";
    env.push_back(var);
  }
  env.push_back("RANK=" + std::to_string(rank));
  env.push_back("LOCAL_RANK=" + std::to_string(rank));
  env.push_back("WORLD_SIZE=" + std::to_string(nproc));
  env.push_back("MASTER_ADDR=127.0.0.1");
  env.push_back("MASTER_PORT=" + std::to_string(port));
  env.push_back("AUTOTUNE_LAUNCHER_PID=" + std::to_string(getpid()));
  if (!user_threads) env.push_back("OMP_NUM_THREADS=" + threads);
  return env;
}

// The ranks still running, by rank; 0 once reaped.
struct Ranks {
  std::vector<pid_t> pids;
  void signal_all(int sig) const {
    for (pid_t p : pids)
      if (p > 0) kill(p, sig);
  }
  // Kills and waits for every rank still running: no path leaves a child behind.
  void kill_and_reap() {
    signal_all(SIGKILL);
    for (pid_t& p : pids)
      if (p > 0) {
        while (waitpid(p, nullptr, 0) < 0 && errno == EINTR) {
        }
        p = 0;
      }
  }
  int rank_of(pid_t pid) {
    for (size_t r = 0; r < pids.size(); ++r)
      if (pids[r] == pid) {
        pids[r] = 0;
        return static_cast<int>(r);
      }
    return -1;
  }
};

// While the launcher waits, SIGINT and SIGTERM are noted (note_signal) to be forwarded to the
// ranks; the handlers before come back when it is done.
struct NotedSignals {
  struct sigaction old_int {
  }, old_term{};
  NotedSignals() {
    g_signals_received = 0;
    struct sigaction sa {};
    sa.sa_handler = note_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, &old_int);
    sigaction(SIGTERM, &sa, &old_term);
  }
  ~NotedSignals() {
    sigaction(SIGINT, &old_int, nullptr);
    sigaction(SIGTERM, &old_term, nullptr);
  }
};

// A rank starts with no signal blocked, SIGINT and SIGTERM at their defaults, in its own process
// group (see follow_launcher).
struct RankSpawnAttributes {
  posix_spawnattr_t attr;
  RankSpawnAttributes() {
    posix_spawnattr_init(&attr);
    sigset_t none, defaults;
    sigemptyset(&none);
    sigemptyset(&defaults);
    sigaddset(&defaults, SIGINT);
    sigaddset(&defaults, SIGTERM);
    posix_spawnattr_setsigmask(&attr, &none);
    posix_spawnattr_setsigdefault(&attr, &defaults);
    posix_spawnattr_setpgroup(&attr, 0);
    posix_spawnattr_setflags(
        &attr, POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETPGROUP);
  }
  ~RankSpawnAttributes() { posix_spawnattr_destroy(&attr); }
  RankSpawnAttributes(const RankSpawnAttributes&) = delete;
  RankSpawnAttributes& operator=(const RankSpawnAttributes&) = delete;
};

}  // namespace

void follow_launcher() {
  const char* launcher = std::getenv("AUTOTUNE_LAUNCHER_PID");
  if (!launcher || !*launcher) return;
  // The ranks run in their own process group (a Ctrl-C reaches the launcher alone, which
  // forwards it once); a launcher that dies without forwarding still stops them (SIGTERM: they
  // save their last step).
  prctl(PR_SET_PDEATHSIG, SIGTERM);
  if (std::to_string(getppid()) != launcher) raise(SIGTERM);  // it died before the prctl
}

int launch_local_ranks(int nproc, const std::vector<std::string>& argv,
                       std::chrono::milliseconds grace, const std::string& executable) {
  const int port = free_loopback_port();
  const unsigned cores = std::max(1u, std::thread::hardware_concurrency());
  const std::string threads = std::to_string(std::max(1u, cores / static_cast<unsigned>(nproc)));
  spdlog::info("starting {} ranks on 127.0.0.1:{} ({} thread(s) each)", nproc, port, threads);
  spdlog::default_logger()->flush();

  std::vector<std::string> args = argv;
  std::vector<char*> c_args = c_strings(args);
  std::vector<std::vector<std::string>> envs;
  std::vector<std::vector<char*>> c_envs;
  for (int r = 0; r < nproc; ++r) envs.push_back(rank_environment(r, nproc, port, threads));
  for (auto& e : envs) c_envs.push_back(c_strings(e));

  const NotedSignals signals;
  const RankSpawnAttributes spawn;
  Ranks ranks{std::vector<pid_t>(static_cast<size_t>(nproc), 0)};
  for (int r = 0; r < nproc; ++r) {
    pid_t pid = 0;
    // glibc's posix_spawn reports a failed exec as its return value.
    const int err = posix_spawn(&pid, executable.c_str(), nullptr, &spawn.attr, c_args.data(),
                                c_envs[static_cast<size_t>(r)].data());
    if (err != 0) {
      ranks.kill_and_reap();
      throw RuntimeError("cannot start rank " + std::to_string(r) + " (" + executable +
                         "): " + std::strerror(err));
    }
    ranks.pids[static_cast<size_t>(r)] = pid;
  }

  // Wait for the ranks. A rank that fails stops the others (SIGTERM, SIGKILL after `grace`); a
  // signal to the launcher is forwarded and the run is a stop (128 + signal), not a failure.
  int exit_code = kExitOk, running = nproc, forwarded = 0, stop_signal = 0;
  bool failing = false;
  auto deadline = std::chrono::steady_clock::time_point::max();
  while (running > 0) {
    if (g_signals_received != forwarded) {
      forwarded = g_signals_received;
      stop_signal = g_last_signal;
      spdlog::info("{} received: stopping the ranks after their current step",
                   strsignal(stop_signal));
      ranks.signal_all(stop_signal);
    }
    if (std::chrono::steady_clock::now() > deadline) {
      ranks.signal_all(SIGKILL);
      deadline = std::chrono::steady_clock::time_point::max();
    }
    int status = 0;
    const pid_t pid = waitpid(-1, &status, WNOHANG);
    if (pid == 0 || (pid < 0 && errno == EINTR)) {
      std::this_thread::sleep_for(std::chrono::milliseconds(50));  // a signal cuts it short
      continue;
    }
    if (pid < 0) {
      const int err = errno;
      ranks.kill_and_reap();
      throw RuntimeError(std::string("waiting for the ranks failed: ") + std::strerror(err) +
                         "; the ranks were stopped");
    }
    const int rank = ranks.rank_of(pid);
    if (rank < 0) continue;
    --running;
    const bool failed = !(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    if (!failed || failing) continue;
    if (stop_signal) {
      spdlog::debug("rank {} {} after the stop", rank, describe_status(status));
      continue;
    }
    exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : kExitRuntime;
    spdlog::error("rank {} {}; stopping the other ranks", rank, describe_status(status));
    failing = true;
    ranks.signal_all(SIGTERM);
    deadline = std::chrono::steady_clock::now() + grace;
  }
  if (stop_signal && !failing) return 128 + stop_signal;
  return exit_code;
}

}  // namespace autotune
