#include <algorithm>
#include <chrono>
#include <cmath>
#include <map>

#include <spdlog/spdlog.h>

#include "autotune/estimator.h"
#include "autotune/size.h"
#include "autotune/tuner.h"

namespace autotune {

std::vector<int64_t> divisors(int64_t n) {
  std::vector<int64_t> d;
  for (int64_t i = 1; i <= n; ++i)
    if (n % i == 0) d.push_back(i);
  return d;
}

namespace {

// The micro-batches a request allows: divisors of the global batch (the effective batch stays
// exact), within a preset's bound, or the pinned one.
std::vector<int64_t> candidate_micro_batches(const TunerRequest& r) {
  if (r.micro_batch) return {*r.micro_batch};
  std::vector<int64_t> mbs;
  for (int64_t d : divisors(r.global_batch))
    if (r.max_micro_batch <= 0 || d <= r.max_micro_batch) mbs.push_back(d);
  return mbs;
}

// Throughputs within this fraction count as a tie; ties go to the plan closest to the request.
constexpr double kTieFraction = 0.03;

struct Pair {
  Precision precision;
  bool checkpointing;
};

// Runs trials, keeps them, and remembers each measured micro-batch per pair.
class Session {
 public:
  Session(Workload& w, const TunerRequest& r, MemoryMeter& m, const TrialCallback& cb)
      : w_(w), r_(r), m_(m), cb_(cb) {}

  const Trial& run(const Plan& plan) {
    for (const auto& t : trials_)
      if (t.plan == plan) return t;  // never measure the same plan twice
    // A plan below half the best fitting throughput so far cannot win: stop it early.
    ProbeOptions probe = r_.probe;
    for (const auto& t : trials_)
      if (t.fits)
        probe.stop_below_tokens_per_s =
            std::max(probe.stop_below_tokens_per_s, 0.5 * t.tokens_per_s);
    trials_.push_back(run_trial(w_, plan, probe, m_));
    if (cb_) cb_(trials_.back());
    return trials_.back();
  }
  const Trial* find(const Plan& plan) const {
    for (const auto& t : trials_)
      if (t.plan == plan) return &t;
    return nullptr;
  }
  std::vector<Trial>& trials() { return trials_; }

 private:
  Workload& w_;
  const TunerRequest& r_;
  MemoryMeter& m_;
  const TrialCallback& cb_;
  std::vector<Trial> trials_;
};

Plan make_plan(const TunerRequest& r, int64_t mb, Pair pair, int64_t seq_len, int64_t d_model) {
  Plan p;
  p.micro_batch = mb;
  p.grad_accum = r.global_batch / mb;
  p.precision = pair.precision;
  p.checkpointing = pair.checkpointing;
  p.seq_len = seq_len;
  p.d_model = d_model;
  p.eval_batch = r.eval_batch;
  return p;
}

// The largest candidate micro-batch whose predicted peak fits, or 0.
int64_t largest_fitting(const std::vector<int64_t>& mbs, double a, double b, uint64_t usable) {
  int64_t best = 0;
  for (int64_t mb : mbs)
    if (a + b * static_cast<double>(mb) <= static_cast<double>(usable)) best = mb;
  return best;
}

// Search state for one (precision, checkpointing) pair: finds the largest micro-batch that fits.
struct PairResult {
  Pair pair;
  std::optional<Trial> best;  // the fitting trial with the largest micro-batch
  double a = 0, b = 0;        // measured line: peak = a + b * micro_batch
  bool line = false;
};

class ModelSearch {
 public:
  ModelSearch(Workload& w, const TunerRequest& r, Session& s, uint64_t baseline, int64_t seq_len,
              int64_t d_model)
      : w_(w), r_(r), s_(s), baseline_(baseline), seq_len_(seq_len), d_model_(d_model) {
    mbs_ = candidate_micro_batches(r);
  }

  double estimate(Pair pair, int64_t mb) const {
    return static_cast<double>(
        estimate_memory(w_, make_plan(r_, mb, pair, seq_len_, d_model_), baseline_).peak_bytes);
  }

  // Tries micro-batches of `pair`, starting from a predicted one, and walks down (bisecting
  // among divisors) until one fits or none is left. Returns the largest fitting trial found.
  PairResult search(Pair pair, std::optional<std::pair<double, double>> predicted_line) {
    PairResult res{pair, std::nullopt, 0, 0, false};
    const uint64_t usable = r_.usable_bytes;
    // Estimator line for this pair: slope from two micro-batches.
    const double e1 = estimate(pair, 1), e2 = estimate(pair, 2);
    double a = e1 - (e2 - e1), b = e2 - e1;
    if (predicted_line) std::tie(a, b) = *predicted_line;

    int64_t first = r_.start_small ? mbs_.front() : largest_fitting(mbs_, a, b, usable);
    if (first == 0) first = mbs_.front();

    auto plan_of = [&](int64_t mb) { return make_plan(r_, mb, pair, seq_len_, d_model_); };
    const Trial t1 = s_.run(plan_of(first));  // a copy: later trials grow the session's vector
    // Too slow at this micro-batch: smaller ones are slower still, so the pair cannot win. An
    // error other than memory (an op without a kernel for this precision) fails at any size.
    if (t1.too_slow || t1.error) return res;
    int64_t lo_fit = t1.fits ? first : 0;   // largest micro-batch known to fit
    int64_t hi_fail = t1.fits ? 0 : first;  // smallest known not to fit
    std::optional<Trial> best = t1.fits ? std::optional<Trial>(t1) : std::nullopt;

    // Second point for the line: a smaller micro-batch (half of the first, as a divisor).
    if (mbs_.size() > 1 && !(t1.fits && first == mbs_.back())) {
      int64_t second = 0;
      for (int64_t mb : mbs_)
        if (mb <= first / 2) second = mb;
      if (second > 0) {
        const Trial& t2 = s_.run(plan_of(second));
        if (t2.too_slow || t2.error) {
          res.best = best;
          return res;
        }
        if (t2.fits) {
          lo_fit = std::max(lo_fit, second);
          if (!best || second > best->plan.micro_batch) best = t2;
          if (!t1.oom) {
            // Two measured points: peak = a + b * mb. (An OOM trial has no full peak.)
            b = (static_cast<double>(t1.peak_bytes) - static_cast<double>(t2.peak_bytes)) /
                static_cast<double>(first - second);
            a = static_cast<double>(t2.peak_bytes) - b * static_cast<double>(second);
            res.line = true;
          }
          if (!res.line) {
            // One measured point: keep the estimator's slope, move the intercept to the truth.
            a = static_cast<double>(t2.peak_bytes) - b * static_cast<double>(second);
            res.line = true;
          }
        } else {
          hi_fail = hi_fail ? std::min(hi_fail, second) : second;
        }
      }
    }

    // Predict the largest fitting micro-batch, confirm it, bisect on a miss.
    if (res.line) {
      int64_t predicted = largest_fitting(mbs_, a, b, usable);
      if (predicted > lo_fit && (hi_fail == 0 || predicted < hi_fail)) {
        const Trial& t3 = s_.run(plan_of(predicted));
        if (t3.too_slow || t3.error) {
          res.best = best;
          return res;
        }
        if (t3.fits) {
          lo_fit = predicted;
          best = t3;
        } else {
          hi_fail = predicted;
        }
      }
    }
    // Bisect among the divisors strictly between lo_fit and hi_fail.
    for (;;) {
      std::vector<int64_t> between;
      for (int64_t mb : mbs_)
        if (mb > lo_fit && (hi_fail == 0 || mb < hi_fail)) between.push_back(mb);
      if (between.empty() || (hi_fail == 0 && lo_fit > 0)) break;
      const int64_t mid = between[(between.size() - 1) / 2];
      const Trial& t = s_.run(plan_of(mid));
      if (t.too_slow || t.error) break;
      if (t.fits) {
        lo_fit = mid;
        best = t;
      } else {
        hi_fail = mid;
      }
    }
    res.best = best;
    res.a = a;
    res.b = b;
    return res;
  }

  // The line of another pair, predicted from a measured one: the measured line corrected by the
  // estimator's difference between the two pairs.
  std::pair<double, double> transfer(const PairResult& from, Pair to) const {
    const double ef1 = estimate(from.pair, 1), ef2 = estimate(from.pair, 2);
    const double et1 = estimate(to, 1), et2 = estimate(to, 2);
    const double bf = ef2 - ef1, bt = et2 - et1;
    const double b = bf > 0 ? from.b * bt / bf : bt;
    const double a = from.a + ((et1 - bt) - (ef1 - bf));
    return {a, b};
  }

 private:
  Workload& w_;
  const TunerRequest& r_;
  Session& s_;
  uint64_t baseline_;
  int64_t seq_len_, d_model_;
  std::vector<int64_t> mbs_;
};

// Lightning's BatchSizeFinder ("power"): double from 2 until a trial fails, then bisect.
// Accelerate's find_executable_batch_size ("halve"): start at the largest, halve until one fits.
std::optional<Trial> classic_search(const std::string& kind, const TunerRequest& r, Session& s,
                                    Pair pair, int64_t seq_len, int64_t d_model) {
  std::vector<int64_t> mbs = candidate_micro_batches(r);
  auto plan_of = [&](int64_t mb) { return make_plan(r, mb, pair, seq_len, d_model); };
  auto divisor_at_most = [&](int64_t x) {
    int64_t d = mbs.front();
    for (int64_t mb : mbs)
      if (mb <= x) d = mb;
    return d;
  };
  if (kind == "halve") {
    int64_t mb = mbs.back();
    for (;;) {
      const Trial& t = s.run(plan_of(mb));
      if (t.fits) return t;
      if (mb == mbs.front()) return std::nullopt;
      mb = divisor_at_most(mb / 2);
    }
  }
  // power
  int64_t mb = divisor_at_most(2), lo = 0, hi = 0;
  std::optional<Trial> best;
  for (;;) {
    const Trial& t = s.run(plan_of(mb));
    if (!t.fits) {
      hi = mb;
      break;
    }
    lo = mb;
    best = t;
    if (mb == mbs.back()) return best;
    int64_t next = divisor_at_most(mb * 2);
    if (next == mb) next = *std::upper_bound(mbs.begin(), mbs.end(), mb);
    mb = next;
  }
  for (;;) {  // bisect among divisors in (lo, hi)
    std::vector<int64_t> between;
    for (int64_t d : mbs)
      if (d > lo && d < hi) between.push_back(d);
    if (between.empty()) return best;
    int64_t mid = between[(between.size() - 1) / 2];
    const Trial& t = s.run(plan_of(mid));
    if (t.fits) {
      lo = mid;
      best = t;
    } else {
      hi = mid;
    }
  }
}

// Preference order among ties: fp32 before bf16 before fp16, no checkpointing before it.
int preference(const Plan& p) {
  return static_cast<int>(p.precision) * 2 + (p.checkpointing ? 1 : 0);
}

}  // namespace

TunerResult tune(Workload& workload, const TunerRequest& request, MemoryMeter& meter,
                 const TrialCallback& on_trial) {
  const auto t0 = std::chrono::steady_clock::now();
  TunerResult result;
  Session session(workload, request, meter, on_trial);
  const WorkloadKnobs knobs = workload.knobs();
  const uint64_t baseline = meter.baseline_bytes();

  // Candidate pairs in order of cost to the user. fp16 only where bf16 is not supported (an
  // accelerator without bf16); on CPU and current GPUs bf16 is the low precision.
  std::vector<Precision> precisions = {Precision::fp32, Precision::bf16};
  if (!request.allowed_precisions.empty()) precisions = request.allowed_precisions;
  if (request.precision) precisions = {*request.precision};
  std::vector<bool> ckpts = {false};
  if (knobs.checkpointing) ckpts.push_back(true);
  if (request.checkpointing) ckpts = {*request.checkpointing};

  int64_t seq_len = request.seq_len.value_or(0);
  int64_t d_model = 0;
  auto search_all = [&]() -> std::vector<Trial> {
    std::vector<Trial> finalists;
    if (request.search != "model") {
      Pair pair{precisions.front(), ckpts.front()};
      if (auto t = classic_search(request.search, request, session, pair, seq_len, d_model))
        finalists.push_back(*t);
      return finalists;
    }
    ModelSearch ms(workload, request, session, baseline, seq_len, d_model);
    std::optional<PairResult> anchor;  // the first pair with a measured line
    for (bool ckpt : ckpts) {
      for (Precision prec : precisions) {
        Pair pair{prec, ckpt};
        // Checkpointing costs ~1/3 more compute: worth it only when, without it, the
        // micro-batch stays small (or nothing fits).
        if (ckpt && !finalists.empty()) {
          int64_t best_mb = 0;
          for (const auto& f : finalists) best_mb = std::max(best_mb, f.plan.micro_batch);
          if (best_mb >= std::min<int64_t>(4, request.global_batch)) continue;
        }
        std::optional<std::pair<double, double>> predicted;
        if (anchor) predicted = ms.transfer(*anchor, pair);
        PairResult pr = ms.search(pair, predicted);
        if (pr.line && !anchor) anchor = pr;
        if (pr.best) finalists.push_back(*pr.best);
      }
    }
    return finalists;
  };

  std::vector<Trial> finalists = search_all();
  // Nothing fits: shrink the task only where the user allowed it, sequence first, then width.
  const int64_t base_seq = workload.default_seq_len(), base_width = workload.default_width();
  while (finalists.empty() && request.allow_shrink_seq && knobs.seq_len &&
         (seq_len ? seq_len : base_seq) / 2 >= 8 && !request.seq_len) {
    seq_len = (seq_len ? seq_len : base_seq) / 2;
    finalists = search_all();
  }
  while (finalists.empty() && request.allow_shrink_width && knobs.width &&
         (d_model ? d_model : base_width) / 2 >= 8) {
    d_model = (d_model ? d_model : base_width) / 2;
    finalists = search_all();
  }
  if (seq_len && seq_len != base_seq && !request.seq_len) {
    result.shrunk_task = true;
    result.shrink_note += "sequence length shrunk from " + std::to_string(base_seq) + " to " +
                          std::to_string(seq_len) + " (the task changed). ";
  }
  if (d_model && d_model != base_width) {
    result.shrunk_task = true;
    result.shrink_note += "model width shrunk from " + std::to_string(base_width) + " to " +
                          std::to_string(d_model) + " (the model changed). ";
  }

  result.trials = session.trials();
  result.probe_seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (finalists.empty()) {
    uint64_t smallest = 0;
    for (const auto& t : result.trials)
      if (t.peak_bytes && (!smallest || t.peak_bytes < smallest)) smallest = t.peak_bytes;
    std::string hint = "a larger --budget";
    if (!request.precision)
      hint += ", --precision bf16";
    else
      hint += ", bf16";
    if (knobs.checkpointing && !(request.checkpointing && !*request.checkpointing))
      hint += ", --checkpointing on";
    if (!request.allow_shrink_seq && knobs.seq_len) hint += ", --allow-shrink seq";
    if (!request.allow_shrink_width && knobs.width) hint += ", --allow-shrink width";
    result.infeasible_message =
        "no plan fits the budget " + format_bytes(request.budget_bytes) + " (usable " +
        format_bytes(request.usable_bytes) +
        " after the margin): " + std::to_string(result.trials.size()) +
        " trials, smallest measured peak " +
        (smallest ? format_bytes(smallest) : std::string("none (all out of memory)")) + "; try " +
        hint;
    return result;
  }
  // Fastest wins; within kTieFraction the plan closest to the request wins.
  std::sort(finalists.begin(), finalists.end(),
            [](const Trial& x, const Trial& y) { return x.tokens_per_s > y.tokens_per_s; });
  const Trial* chosen = &finalists.front();
  for (const auto& f : finalists)
    if (f.tokens_per_s >= (1.0 - kTieFraction) * finalists.front().tokens_per_s &&
        preference(f.plan) < preference(chosen->plan))
      chosen = &f;
  result.plan = chosen->plan;
  for (auto& t : result.trials)
    if (t.fits && !(t.plan == chosen->plan))
      t.reason = "fits, slower than the chosen plan";
    else if (t.plan == chosen->plan)
      t.reason = "chosen";
  return result;
}

}  // namespace autotune
