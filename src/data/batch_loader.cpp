#include "data/batch_loader.h"

#include <algorithm>
#include <stdexcept>
#include <string>
#include <utility>

namespace autotune {

BatchLoader::BatchLoader(Producer producer, int64_t max_batches)
    : producer_(std::move(producer)), max_batches_(max_batches) {
  if (!producer_) throw std::invalid_argument("BatchLoader: no producer");
  if (max_batches_ < 1)
    throw std::invalid_argument("BatchLoader: max_batches must be >= 1, got " +
                                std::to_string(max_batches_));
  thread_ = std::thread([this] { run(); });
}

BatchLoader::~BatchLoader() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stop_ = true;
    cancel_.store(true);
  }
  work_cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

std::vector<BatchKey> BatchLoader::predict(const BatchKey& key, int64_t global, int64_t n,
                                           int64_t origin) {
  std::vector<BatchKey> out;
  // A zero-sample request would predict itself forever: nothing to prefetch.
  if (n <= 0 || key.count <= 0) return out;
  out.reserve(static_cast<size_t>(n));
  // A request that does not fit the learned global batch means the pattern changed.
  if (global > 0 && (key.first + key.count > global || key.first < origin)) global = 0;
  int64_t step = key.step;
  int64_t pos = key.first + key.count;
  if (global == 0) {
    // Either the step goes on or the next one starts: guess both, the continuation first
    // (with grad accumulation most requests are continuations).
    out.push_back({step, pos, key.count, key.seq_len});
    ++step;
    pos = origin;
    while (static_cast<int64_t>(out.size()) < n) {
      out.push_back({step, pos, key.count, key.seq_len});
      pos += key.count;
    }
    return out;
  }
  while (static_cast<int64_t>(out.size()) < n) {
    if (pos >= global) {
      ++step;
      pos = origin;
    }
    const int64_t count = std::min(key.count, global - pos);
    out.push_back({step, pos, count, key.seq_len});
    pos += count;
  }
  return out;
}

void BatchLoader::learn_locked(const BatchKey& key) {
  // The trainer moves to step s+1 only after the last micro-batch of step s, so that one ends
  // where this process's share of the global batch ends, and the first of s+1 is where it starts
  // (0 in one process, rank x share in data parallel). A restart at step 0 (a new trial) or an
  // OOM re-run of the same step teaches nothing.
  if (last_ && key.step == last_->step + 1 && key.first <= last_->first) {
    origin_ = key.first;
    global_ = last_->first + last_->count;
  } else if (global_ > 0 && (key.first + key.count > global_ || key.first < origin_)) {
    global_ = 0;
  }
  last_ = key;
}

BatchLoader::Slot* BatchLoader::find_id_locked(uint64_t id) {
  for (auto& s : slots_)
    if (s.id == id) return &s;
  return nullptr;
}

void BatchLoader::replan_locked(const BatchKey& key) {
  const std::vector<BatchKey> want = predict(key, global_, max_batches_, origin_);
  std::vector<Slot> next;
  next.reserve(want.size());
  for (const BatchKey& k : want) {
    auto it = std::find_if(slots_.begin(), slots_.end(), [&](const Slot& s) { return s.key == k; });
    if (it != slots_.end()) {
      next.push_back(std::move(*it));
      slots_.erase(it);
    } else {
      Slot s;
      s.key = k;
      s.id = next_id_++;
      next.push_back(std::move(s));
    }
  }
  // What is left was predicted and is no longer expected. Pending slots cost nothing yet; a
  // running one is told to stop so its buffer is not held longer than needed.
  for (const Slot& s : slots_) {
    if (s.state != State::pending) ++discarded_;
    if (s.id == running_id_) cancel_.store(true);
  }
  slots_ = std::move(next);
}

torch::Tensor BatchLoader::get(const BatchKey& key) {
  std::lock_guard<std::mutex> serial(request_mu_);
  std::unique_lock<std::mutex> lk(mu_);
  learn_locked(key);

  std::optional<Slot> taken;
  auto it = std::find_if(slots_.begin(), slots_.end(), [&](const Slot& s) { return s.key == key; });
  if (it != slots_.end()) {
    const uint64_t id = it->id;
    if (it->state == State::running) {
      // Half built already: finishing it is cheaper than starting over here. Only this thread
      // removes slots, so the slot is still there when the loader thread is done with it.
      done_cv_.wait(lk, [&] { return find_id_locked(id)->state != State::running; });
    }
    Slot* s = find_id_locked(id);
    if (s->state == State::ready) {
      taken = std::move(*s);
    } else {
      // Pending: the thread has not started it (busy, or not scheduled yet). Building it here
      // now beats waiting for the thread to get to it.
      ++late_;
    }
    slots_.erase(slots_.begin() + (s - slots_.data()));
  }
  if (taken) {
    ++hits_;
  } else {
    ++misses_;
  }
  // Schedule the next batches before building this one, so they are built side by side.
  replan_locked(key);
  lk.unlock();
  work_cv_.notify_one();

  if (taken) {
    if (taken->error) std::rethrow_exception(taken->error);
    // Undefined only if the thread was told to stop while building it; build it here then.
    if (taken->value.defined()) return std::move(taken->value);
  }
  const std::atomic<bool> never{false};
  return producer_(key, never);
}

void BatchLoader::run() {
  std::unique_lock<std::mutex> lk(mu_);
  auto first_pending = [&] {
    return std::find_if(slots_.begin(), slots_.end(),
                        [](const Slot& s) { return s.state == State::pending; });
  };
  for (;;) {
    work_cv_.wait(lk, [&] { return stop_ || first_pending() != slots_.end(); });
    if (stop_) return;
    auto it = first_pending();
    it->state = State::running;
    const BatchKey key = it->key;
    const uint64_t id = it->id;
    running_id_ = id;
    cancel_.store(false);
    lk.unlock();

    torch::Tensor value;
    std::exception_ptr error;
    try {
      value = producer_(key, cancel_);
      if (!value.defined() && !cancel_.load())
        throw std::logic_error("BatchLoader: the producer returned no tensor for step " +
                               std::to_string(key.step) + " samples [" + std::to_string(key.first) +
                               ", +" + std::to_string(key.count) + ") without being cancelled");
    } catch (...) {
      // Kept for the request this batch belongs to; never thrown on this thread.
      error = std::current_exception();
    }

    lk.lock();
    running_id_ = 0;
    if (Slot* s = find_id_locked(id)) {
      s->state = State::ready;
      s->value = std::move(value);
      s->error = error;
    } else {
      // Dropped while being built: free the buffer outside the lock.
      lk.unlock();
      value = torch::Tensor();
      error = nullptr;
      lk.lock();
    }
    done_cv_.notify_all();
  }
}

PrefetchStats BatchLoader::stats() const {
  std::lock_guard<std::mutex> lk(mu_);
  PrefetchStats s;
  s.hits = hits_;
  s.misses = misses_;
  s.late = late_;
  s.discarded = discarded_;
  for (const Slot& slot : slots_)
    if (slot.state == State::ready) ++s.ready;
  s.in_flight = running_id_ != 0 ? 1 : 0;
  return s;
}

void BatchLoader::wait_idle() {
  std::unique_lock<std::mutex> lk(mu_);
  done_cv_.wait(lk, [&] {
    return stop_ || std::all_of(slots_.begin(), slots_.end(),
                                [](const Slot& s) { return s.state == State::ready; });
  });
}

int64_t BatchLoader::global_batch() const {
  std::lock_guard<std::mutex> lk(mu_);
  return global_;
}

}  // namespace autotune
