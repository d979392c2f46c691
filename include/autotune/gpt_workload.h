// The GPT language model on a token file as a Workload.
#pragma once
#include <atomic>
#include <memory>

#include "autotune/gpt.h"
#include "autotune/machine.h"
#include "autotune/run_spec.h"
#include "autotune/token_file.h"
#include "autotune/workload.h"

namespace autotune {

class BatchLoader;
class SampleCache;

// How windows reach the model (issue 5, "Data path with bounded memory"). The defaults are the
// plain path: a memory map, no cache, no loader thread. ModePolicy (machine.h) supplies these per
// mode: ultra-low-mem reads with pread, caches nothing and prefetches at most one batch.
struct DataOptions {
  ReadMode read_mode = ReadMode::mmap;
  // Cap of the LRU window cache in bytes (SampleCache::entry_bytes per window); 0: no cache.
  uint64_t cache_bytes = 0;
  // Train batches a background thread builds ahead (CPU tensors, counted by the CPU allocator
  // like any other); 0: no thread, every batch is built on request.
  int64_t prefetch_batches = 0;
  // Batches for an accelerator are built in page-locked memory (LibTorch's pinned host
  // allocator, outside the CPU counting allocator: a few KiB of tokens per batch) and copied
  // with non_blocking, so the copy never waits for the host.
  bool pin_memory = false;
};

// Counters since the workload was made (they survive set_data_options); bytes and entries are
// the current cache's.
struct DataStats {
  ReadMode read_mode = ReadMode::mmap;
  uint64_t cache_hits = 0;
  uint64_t cache_misses = 0;
  uint64_t cache_evictions = 0;
  uint64_t cache_entries = 0;
  uint64_t cache_bytes_in_use = 0;    // <= cache_capacity_bytes
  uint64_t cache_capacity_bytes = 0;  // 0: no cache
  int64_t prefetch_batches = 0;       // the loader's bound; 0: no loader
  uint64_t prefetch_hits = 0;         // train batches the loader thread had built
  uint64_t prefetch_misses = 0;       // train batches built on request (loader on)
  uint64_t prefetch_late = 0;         // of the misses: predicted, but the thread had not started
  uint64_t prefetch_discarded = 0;    // built ahead and dropped (the request pattern changed)
  uint64_t prefetch_ready = 0;        // batches the loader holds right now
  double cache_hit_rate() const {
    const uint64_t n = cache_hits + cache_misses;
    return n == 0 ? 0.0 : static_cast<double>(cache_hits) / static_cast<double>(n);
  }
  double prefetch_hit_rate() const {
    const uint64_t n = prefetch_hits + prefetch_misses;
    return n == 0 ? 0.0 : static_cast<double>(prefetch_hits) / static_cast<double>(n);
  }
  // Requests that matched a prediction (hits and late misses): the pattern was learned.
  double prefetch_predicted_rate() const {
    const uint64_t n = prefetch_hits + prefetch_misses;
    return n == 0 ? 0.0
                  : static_cast<double>(prefetch_hits + prefetch_late) / static_cast<double>(n);
  }
};

class GptWorkload : public Workload {
 public:
  GptWorkload(GptConfig config, std::shared_ptr<TokenFile> data, uint64_t seed);
  ~GptWorkload() override;
  GptWorkload(const GptWorkload&) = delete;
  GptWorkload& operator=(const GptWorkload&) = delete;

  // Switches the data path; batch contents never change with it. Reopens the token file when the
  // read mode differs (a UsageError from TokenFile::open leaves everything as it was), replaces
  // the cache when its cap changes, and stops the loader thread (joining it) before restarting it
  // with the new bound. Not to be called concurrently with train_batch/val_batch.
  void set_data_options(const DataOptions& options);
  const DataOptions& data_options() const { return options_; }
  // Safe to call from another thread (a memory monitor) while batches are being built, but not
  // while set_data_options runs.
  DataStats data_stats() const;
  nlohmann::json data_report() const override;

  std::string kind() const override { return "gpt"; }
  std::string model_name() const override { return config_.name; }
  nlohmann::json config() const override;
  WorkloadKnobs knobs() const override { return {true, true, true}; }
  int64_t default_seq_len() const override { return config_.seq_len; }
  int64_t default_width() const override { return config_.d_model; }
  // 3/4, 1/2, 3/8, 1/4, ... of d_model, each a multiple of n_head (the heads stay; their width
  // shrinks), at least 8.
  std::vector<int64_t> width_options() const override;
  void validate(const Plan& plan) const override;
  int64_t tokens_per_sequence(const Plan& plan) const override { return seq_len(plan); }
  std::string describe_data() const override { return data_->path() + ": " + data_->describe(); }

  std::shared_ptr<TrainableModel> build(const Plan& plan, torch::Device device,
                                        uint64_t seed) override;
  Batch train_batch(int64_t step, int64_t first, int64_t count, const Plan& plan,
                    torch::Device device) override;
  Batch val_batch(int64_t first, int64_t count, const Plan& plan, torch::Device device) override;
  EstimateTerms estimate_terms(const Plan& plan) const override;

  const GptConfig& gpt_config() const { return config_; }
  // The config of the model a plan builds (seq_len and width overridden by the plan).
  GptConfig config_for(const Plan& plan) const;
  int64_t seq_len(const Plan& plan) const { return plan.seq_len ? plan.seq_len : config_.seq_len; }
  // The open token file. set_data_options may replace it (another read mode): do not keep the
  // reference across that call.
  const TokenFile& data() const { return *data_; }

 private:
  // [count, T+1] int64 CPU tokens of samples [first, first+count) of `stream`; undefined if
  // `cancel` turned true on the way (only the loader thread passes one that can).
  torch::Tensor fill(Split split, uint64_t stream, int64_t first, int64_t count, int64_t T,
                     const std::atomic<bool>* cancel) const;
  Batch to_batch(const torch::Tensor& buf, torch::Device device) const;
  void stop_loader();

  GptConfig config_;
  std::shared_ptr<TokenFile> data_;
  uint64_t seed_;
  DataOptions options_;
  std::unique_ptr<SampleCache> cache_;
  // Counters of caches and loaders already replaced, so data_stats() covers the whole life.
  DataStats retired_;
  // Last: destroyed first, so its thread is joined while data_ and cache_ still exist.
  std::unique_ptr<BatchLoader> loader_;
};

// The registry's entry (src/models/workload_registry.cpp): a GPT preset or JSON config on a token
// file; the data path follows the memory mode's policy (read mode, cache cap, prefetch, pinning).
std::unique_ptr<Workload> make_gpt_workload(const RunSpec& spec, const ModePolicy& policy);

}  // namespace autotune
