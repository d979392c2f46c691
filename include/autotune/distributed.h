// Data-parallel ranks on LibTorch's own distributed engine (c10d): a TCPStore rendezvous and a
// Gloo process group on CPU. One rank is one process; `--nproc N` starts N local ones, and a rank
// started by torchrun or a cluster launcher joins through RANK / WORLD_SIZE / MASTER_ADDR /
// MASTER_PORT.
#pragma once
#include <chrono>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "autotune/errors.h"

namespace autotune {

// A collective failed: a rank died or hung past the timeout. Thrown between optimizer steps'
// updates (parameters and optimizer state are those of the last completed step), so the
// surviving checkpoint writer can save them before the run stops.
struct LostRank : RuntimeError {
  LostRank(const std::string& what, bool rank0_lost) : RuntimeError(what), rank0_lost(rank0_lost) {}
  bool rank0_lost;
};

struct WorldInfo {
  int rank = 0, size = 1, local_rank = 0;
  std::string master_addr = "127.0.0.1";
  int master_port = 29500;
};

// From the launcher's environment; a world of 1 when WORLD_SIZE is unset. Throws UsageError on a
// malformed value (naming the variable).
WorldInfo world_from_env();

// The communicator of one rank: Gloo for CPU tensors, NCCL for CUDA ones (`device`). Every call is
// a collective: all ranks make the same calls in the same order. A collective that cannot finish
// within the timeout (a rank died or hangs) throws LostRank naming the lost rank where it can tell.
class Communicator {
 public:
  Communicator(const WorldInfo& world, std::chrono::milliseconds timeout,
               torch::Device device = torch::kCPU);
  ~Communicator();
  int rank() const { return world_.rank; }
  int size() const { return world_.size; }
  std::string backend() const;  // "gloo" or "nccl"

  // In place, from `root` to every rank.
  void broadcast(std::vector<torch::Tensor> tensors, int root = 0);
  // ZeRO-1, after each rank updated the parameters it owns (owners[i] is the rank of params[i]):
  // every parameter from its owner to all ranks, in buckets of at most `bucket_bytes` per owner
  // (one flat copy each, one broadcast per bucket).
  void broadcast_shards(const std::vector<torch::Tensor>& params, const std::vector<int>& owners,
                        int64_t bucket_bytes = 25 << 20);
  // The mean over ranks of a small tensor (a loss), returned.
  torch::Tensor average(const torch::Tensor& t);
  // In place: `t` becomes its sum over the ranks; allocates nothing from LibTorch's allocator
  // (the trainer calls it after the ranks agreed on a step, where an OOM could not be recovered).
  void sum_in_place(torch::Tensor& t);
  // True when `flag` is true on any rank (an all-reduce of one int, in a buffer made once, so
  // neither the stop nor the OOM agreement needs memory).
  bool any(bool flag);
  // `text` of `root` on every rank, through the store: waits up to `wait` (a probe on rank 0 can
  // take minutes, longer than a collective's timeout).
  std::string share_text(const std::string& key, const std::string& text, int root,
                         std::chrono::milliseconds wait);
  // Every rank's `text` on `root` (in rank order; empty elsewhere), through the store.
  std::vector<std::string> gather_text(const std::string& key, const std::string& text, int root,
                                       std::chrono::milliseconds wait);
  void barrier();

  // Host seconds the gradient averaging (GradientReducer) took outside backward so far: the
  // all-reduce time that overlapping did not hide. And how many steps it averaged.
  double allreduce_seconds() const { return allreduce_seconds_; }
  int64_t allreduce_calls() const { return allreduce_calls_; }
  // Seconds spent in broadcast_shards so far.
  double broadcast_seconds() const { return broadcast_seconds_; }

 private:
  friend class GradientReducer;
  [[noreturn]] void lost(const std::exception& e) const;
  // Runs `f`, a collective or store exchange; a failure becomes LostRank.
  void guarded(const std::function<void()>& f) const;
  struct Impl;
  WorldInfo world_;
  std::chrono::milliseconds timeout_;
  torch::Device device_;
  std::unique_ptr<Impl> impl_;
  torch::Tensor flag_;  // any()'s int32 [1] on the device
  double allreduce_seconds_ = 0;
  int64_t allreduce_calls_ = 0;
  double broadcast_seconds_ = 0;
};

// Gradients averaged over the ranks once per optimizer step, overlapped with the backward that
// produces them (as DDP's reducer): the parameters in reverse order (about the order backward
// finishes their gradients) in buckets, the first of at most 1 MiB so the first all-reduce starts
// early, the others of at most `bucket_bytes` (one dtype and device each). With `overlap`, while
// armed (the step's last backward) a bucket's all-reduce starts when the gradients of all its
// parameters are accumulated and every bucket before it has started, so all ranks start them in
// one order; without, all start at finish(), in the same order, and run together.
class GradientReducer {
 public:
  GradientReducer(Communicator& comm, const std::vector<torch::Tensor>& params, bool overlap,
                  int64_t bucket_bytes = 25 << 20);
  ~GradientReducer();  // removes the hooks
  GradientReducer(const GradientReducer&) = delete;
  GradientReducer& operator=(const GradientReducer&) = delete;

  // Each attempt at a step begins here (again after an OOM).
  void begin_step();
  // The next backward is the last of the step: its gradients are final when accumulated.
  void arm();
  // After that backward: starts the buckets not started (a parameter without a gradient joins
  // as zeros), waits for all, and writes the averages into the gradients.
  void finish();
  // This rank ran out of memory in the step: runs the rest of the step's all-reduces (the other
  // ranks run them all) with zeros, so every rank's next collective is the same one; none when
  // finish() already ran them. The caller drops the gradients.
  void abandon();

 private:
  struct Bucket;
  void on_gradient(size_t param);  // a parameter's gradient was accumulated
  void start_ready();              // starts the ready buckets in order
  void start(Bucket& b, bool zeros);
  void complete(Bucket& b, bool write_back);
  Communicator& comm_;
  std::vector<torch::Tensor> params_;
  std::vector<Bucket> buckets_;
  std::vector<size_t> bucket_of_;  // per parameter
  size_t next_ = 0;                // the first bucket not started
  bool overlap_ = false;
  bool armed_ = false;     // the hooks start buckets
  bool began_ = false;     // arm() ran in this attempt: the buckets are this step's
  bool finished_ = false;  // every all-reduce of this attempt ran
};

// Whether the all-reduces overlap backward on `device`: on an accelerator (NCCL runs on its own
// stream), not on the CPU, where Gloo's threads take the cores backward runs on and the buckets
// in flight hold memory beside the activations (docs/BENCHMARKS.md). AUTOTUNE_OVERLAP_ALLREDUCE=1
// or 0 decides instead (tests, benchmarks).
bool overlap_allreduce(torch::Device device);

// A TCP port on 127.0.0.1 that was free a moment ago (bound to port 0, read back, closed): where
// rank 0's store listens. Throws RuntimeError when no socket can be bound.
int free_loopback_port();

// `--nproc N`: starts N copies of `executable` (this one by default; same arguments, without
// --nproc) as ranks 0..N-1 on a free loopback port, each with its share of the cores, with
// posix_spawn, and waits. When a rank fails, the others are stopped (SIGTERM, then SIGKILL after
// `grace`) and one line names the rank. SIGINT / SIGTERM to the launcher are forwarded to the
// ranks, which save their last step. Returns the exit code to use: 0, the first failing rank's,
// or 128 + the signal after a forwarded stop. Throws RuntimeError when a rank cannot be started
// (naming the error) or waiting fails; no rank is left running on any path.
int launch_local_ranks(int nproc, const std::vector<std::string>& argv,
                       std::chrono::milliseconds grace,
                       const std::string& executable = "/proc/self/exe");

// In a rank that launch_local_ranks started: SIGTERM when the launcher dies (the ranks run in
// their own process group, so nothing else would stop them). Elsewhere: nothing.
void follow_launcher();

}  // namespace autotune
