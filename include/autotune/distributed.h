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
  // Gradients averaged over ranks: flattened into buckets of at most `bucket_bytes` (one dtype
  // and device per bucket), one all-reduce each, written back. Undefined gradients count as zero.
  void average_gradients(const std::vector<torch::Tensor>& params, int64_t bucket_bytes = 25 << 20);
  // ZeRO-1, after each rank updated the parameters it owns (owners[i] is the rank of params[i]):
  // every parameter from its owner to all ranks, in buckets of at most `bucket_bytes` per owner
  // (one flat copy each, one broadcast per bucket).
  void broadcast_shards(const std::vector<torch::Tensor>& params, const std::vector<int>& owners,
                        int64_t bucket_bytes = 25 << 20);
  // The mean over ranks of a small tensor (a loss), returned.
  torch::Tensor average(const torch::Tensor& t);
  // True when `flag` is true on any rank (an all-reduce of one int).
  bool any(bool flag);
  // `text` of `root` on every rank, through the store: waits up to `wait` (a probe on rank 0 can
  // take minutes, longer than a collective's timeout).
  std::string share_text(const std::string& key, const std::string& text, int root,
                         std::chrono::milliseconds wait);
  // Every rank's `text` on `root` (in rank order; empty elsewhere), through the store.
  std::vector<std::string> gather_text(const std::string& key, const std::string& text, int root,
                                       std::chrono::milliseconds wait);
  void barrier();

  // Seconds spent in gradient all-reduces so far, and how many.
  double allreduce_seconds() const { return allreduce_seconds_; }
  int64_t allreduce_calls() const { return allreduce_calls_; }
  // Seconds spent in broadcast_shards so far.
  double broadcast_seconds() const { return broadcast_seconds_; }

 private:
  [[noreturn]] void lost(const std::exception& e) const;
  // Runs `f`, a collective or store exchange; a failure becomes LostRank.
  void guarded(const std::function<void()>& f) const;
  struct Impl;
  WorldInfo world_;
  std::chrono::milliseconds timeout_;
  torch::Device device_;
  std::unique_ptr<Impl> impl_;
  double allreduce_seconds_ = 0;
  int64_t allreduce_calls_ = 0;
  double broadcast_seconds_ = 0;
};

// `--nproc N`: starts N copies of this executable (same arguments, without --nproc) as ranks
// 0..N-1 on a free loopback port, each with its share of the cores, and waits. When a rank fails,
// the others are stopped (SIGTERM, then SIGKILL after `grace`) and one line names the rank.
// Returns the exit code to use: 0, or the first failing rank's.
int launch_local_ranks(int nproc, const std::vector<std::string>& argv,
                       std::chrono::milliseconds grace);

}  // namespace autotune
