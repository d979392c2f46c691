// One background thread that builds the next few train batches while the caller trains on the
// current one (issue 5, "Data path with bounded memory"). The trainer asks for micro-batches in
// order: (step, 0), (step, mb), ... (step, G - mb), then (step + 1, 0), where G is the global
// batch. The loader predicts that sequence from the requests it sees, keeps at most
// `max_batches` predicted batches built or being built, and hands one out when it is asked for;
// anything else is built on the caller's thread, exactly as it would be without the loader.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

#include <torch/torch.h>

namespace autotune {

// One train micro-batch: samples [first, first + count) of the global batch of optimizer step
// `step`, each seq_len + 1 tokens long.
struct BatchKey {
  int64_t step = 0;
  int64_t first = 0;
  int64_t count = 0;
  // Part of the key because a plan change (--allow-shrink seq) changes the window length of the
  // very same samples: a batch built for another length must never be handed out.
  int64_t seq_len = 0;
  bool operator==(const BatchKey& o) const {
    return step == o.step && first == o.first && count == o.count && seq_len == o.seq_len;
  }
  bool operator!=(const BatchKey& o) const { return !(*this == o); }
};

struct PrefetchStats {
  uint64_t hits = 0;    // requests served by a batch the thread built (or was building)
  uint64_t misses = 0;  // requests built on the caller's thread, `late` ones included
  // Predicted, but the thread had not started on it yet (it was busy, or not scheduled): built
  // on the caller's thread, which is faster than waiting for the thread to get to it.
  uint64_t late = 0;
  uint64_t discarded = 0;  // predicted batches dropped after being built (the pattern changed)
  uint64_t ready = 0;      // batches built and held right now (<= max_batches)
  uint64_t in_flight = 0;  // batches being built right now (0 or 1)
  double hit_rate() const {
    const uint64_t n = hits + misses;
    return n == 0 ? 0.0 : static_cast<double>(hits) / static_cast<double>(n);
  }
  // Requests that matched a prediction, whether or not the thread was in time: how well the
  // request pattern is learned, independent of scheduling.
  double predicted_rate() const {
    const uint64_t n = hits + misses;
    return n == 0 ? 0.0 : static_cast<double>(hits + late) / static_cast<double>(n);
  }
};

class BatchLoader {
 public:
  // Builds the CPU tensor of one batch. It must be a pure function of the key: a prefetched
  // result is handed out as if it had been built on request. `cancel` becomes true when the
  // result is no longer wanted (pattern change, shutdown); the producer may then stop early and
  // return an undefined tensor. Called from the loader thread and from the caller's thread, at
  // most once at a time on each.
  using Producer = std::function<torch::Tensor(const BatchKey&, const std::atomic<bool>& cancel)>;

  // Starts the thread. max_batches >= 1 (std::invalid_argument otherwise).
  BatchLoader(Producer producer, int64_t max_batches);
  // Stops and joins the thread; batches built ahead are dropped. Waits for the batch being built
  // (a producer that honours `cancel` returns at its next check).
  ~BatchLoader();
  BatchLoader(const BatchLoader&) = delete;
  BatchLoader& operator=(const BatchLoader&) = delete;

  // The batch of `key`: the prefetched one if it was predicted (waiting for it if it is being
  // built), else built now on this thread. An exception the producer threw on the loader thread
  // for this key is re-thrown here, and only here. Then schedules the next predicted batches.
  // Calls are serialised; results are bit-identical to producer(key).
  torch::Tensor get(const BatchKey& key);

  PrefetchStats stats() const;
  // Blocks until every predicted batch is built: a stand-in for the time a training step takes,
  // for tests and benchmarks that need the thread to have been in time.
  void wait_idle();
  int64_t max_batches() const { return max_batches_; }
  // The global batch learned from the requests (samples per step); 0 while unknown.
  int64_t global_batch() const;

  // The `n` requests expected after `key` when each step asks for samples [origin, global)
  // (global 0: unknown). With an unknown global batch the next micro-batch of the same step comes
  // first, then the start of the next step. A micro-batch never extends past the global batch.
  static std::vector<BatchKey> predict(const BatchKey& key, int64_t global, int64_t n,
                                       int64_t origin = 0);

 private:
  enum class State { pending, running, ready };
  struct Slot {
    BatchKey key;
    uint64_t id = 0;  // stable identity while the slot is moved between vectors
    State state = State::pending;
    torch::Tensor value;
    std::exception_ptr error;
  };

  void run();
  void learn_locked(const BatchKey& key);
  void replan_locked(const BatchKey& key);
  Slot* find_id_locked(uint64_t id);

  const Producer producer_;
  const int64_t max_batches_;

  std::mutex request_mu_;            // serialises get(): one consumer at a time
  mutable std::mutex mu_;            // guards everything below
  std::condition_variable work_cv_;  // loader thread: a slot became pending, or stop
  std::condition_variable done_cv_;  // consumer: a slot finished building
  std::vector<Slot> slots_;          // predictions in request order, size <= max_batches_
  uint64_t next_id_ = 1;
  uint64_t running_id_ = 0;  // id of the slot being built (it may have been dropped); 0: none
  bool stop_ = false;
  std::atomic<bool> cancel_{false};  // the running slot was dropped, or shutdown
  std::optional<BatchKey> last_;     // previous request, to learn the global batch
  int64_t global_ = 0;
  int64_t origin_ = 0;  // where a step's requests start (a rank's share of the global batch)
  uint64_t hits_ = 0, misses_ = 0, late_ = 0, discarded_ = 0;

  std::thread thread_;  // last: started after every member above exists
};

}  // namespace autotune
