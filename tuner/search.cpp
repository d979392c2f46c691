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
// Finalists whose single timings are within this fraction of the fastest are timed again.
constexpr double kNoiseFraction = 0.15;

struct Pair {
  Precision precision;
  bool checkpointing;
  int64_t shards = 1;  // Plan::optimizer_shards
};

// A plan with the optimizer states split over the ranks (ZeRO-1) is measured in a trial of rank
// 0 alone, without the broadcast of the updated parameters that every step adds: it has to be
// this much faster than the best plan without the split to be chosen (the broadcast took a few
// percent of a gpt-mini step on loopback Gloo, docs/BENCHMARKS.md; more on slower links).
constexpr double kShardedSpeedMargin = 0.10;

// Runs trials, keeps them, and remembers each measured micro-batch per pair.
class Session {
 public:
  Session(Workload& w, const TunerRequest& r, MemoryMeter& m, const TrialProgress& progress,
          int at_most)
      : w_(w), r_(r), m_(m), progress_(progress), at_most_(at_most) {}

  const Trial& run(const Plan& plan) {
    for (const auto& t : trials_)
      if (t.plan == plan) return t;  // never measure the same plan twice
    // A plan below half the best fitting throughput so far cannot win: stop it early.
    ProbeOptions probe = r_.probe;
    for (const auto& t : trials_)
      if (t.fits)
        probe.stop_below_tokens_per_s =
            std::max(probe.stop_below_tokens_per_s, 0.5 * t.tokens_per_s);
    const int index = static_cast<int>(trials_.size()) + 1;
    if (progress_.started) progress_.started(plan, index, at_most_);
    trials_.push_back(run_trial(w_, plan, probe, m_));
    if (progress_.finished) progress_.finished(trials_.back(), index, at_most_);
    return trials_.back();
  }
  const Trial* find(const Plan& plan) const {
    for (const auto& t : trials_)
      if (t.plan == plan) return &t;
    return nullptr;
  }
  std::vector<Trial>& trials() { return trials_; }
  const std::vector<Trial>& trials() const { return trials_; }

 private:
  Workload& w_;
  const TunerRequest& r_;
  MemoryMeter& m_;
  const TrialProgress& progress_;
  int at_most_;
  std::vector<Trial> trials_;
};

Plan make_plan(const TunerRequest& r, int64_t mb, Pair pair, int64_t seq_len, int64_t d_model) {
  Plan p;
  p.micro_batch = mb;
  p.grad_accum = r.global_batch / mb;
  p.precision = pair.precision;
  p.checkpointing = pair.checkpointing;
  p.optimizer_shards = pair.shards;
  p.seq_len = seq_len;
  p.d_model = d_model;
  p.eval_batch = r.eval_batch;
  return p;
}

// A measured or predicted memory line: peak budget bytes = a + b * micro_batch.
struct Line {
  double a = 0, b = 0;
  double at(int64_t mb) const { return a + b * static_cast<double>(mb); }
};

// The largest of `mbs` whose predicted peak is at most `limit`, or 0.
int64_t largest_fitting(const std::vector<int64_t>& mbs, const Line& line, double limit) {
  int64_t best = 0;
  for (int64_t mb : mbs)
    if (line.at(mb) <= limit) best = mb;
  return best;
}

// Where the first trial of a pair aims when its line comes from the estimator alone: below the
// usable bytes, because the estimator predicts tensor bytes (within 4%) but not the RSS that
// training adds around them (oneDNN scratch, heap): measured +45-70 MiB on gpt-10m. A first
// trial that fits is a finalist and gives a full peak; one that runs out of memory gives only a
// lower bound and leaves heap behind for the trials after it.
constexpr double kFirstGuessFraction = 0.85;

// How far above the usable bytes the predicted peak of the next micro-batch up still gets it
// measured: the estimator's largest miss on the budget figure over the presets (13%,
// docs/BENCHMARKS.md) plus the curvature a two-point line shows when it extrapolates to twice the
// micro-batch (4% on gpt-mini), rounded up. A refused trial costs a fraction of a second.
constexpr double kBoundaryBand = 0.20;

// Search state for one (precision, checkpointing) pair: finds the largest micro-batch that fits.
struct PairResult {
  Pair pair;
  std::optional<Trial> best;  // the fitting trial with the largest micro-batch
  Line line;                  // corrected by this pair's measured peaks
  bool measured = false;      // the line went through at least one measured peak
};

class ModelSearch {
 public:
  ModelSearch(Workload& w, const TunerRequest& r, Session& s, uint64_t baseline, int64_t seq_len,
              int64_t d_model)
      : w_(w), r_(r), s_(s), baseline_(baseline), seq_len_(seq_len), d_model_(d_model) {
    mbs_ = candidate_micro_batches(r);
    activations_known_ =
        w.estimate_terms(make_plan(r, mbs_.front(), {Precision::fp32, false}, seq_len, d_model))
            .activations_known;
  }

  double estimate(Pair pair, int64_t mb) const {
    return static_cast<double>(
        estimate_memory(w_, make_plan(r_, mb, pair, seq_len_, d_model_), baseline_).peak_bytes);
  }
  Line estimator_line(Pair pair) const {
    const double e1 = estimate(pair, 1), e2 = estimate(pair, 2);
    return {e1 - (e2 - e1), e2 - e1};
  }

  // Finds the largest micro-batch of `pair` above `above` that fits: predict it from the line,
  // measure it, correct the line with the measured peak (two measured peaks give the slope, one
  // moves the intercept), predict again among the micro-batches still open, until none is left
  // or the line says nothing larger fits. `measured_line`: another pair's measured line moved to
  // this one (transfer), trusted up to the usable bytes; otherwise the estimator's line.
  PairResult search(Pair pair, std::optional<Line> measured_line, int64_t above) {
    PairResult res{pair, std::nullopt, measured_line.value_or(estimator_line(pair)), false};
    std::vector<int64_t> mbs;
    for (int64_t mb : mbs_)
      if (mb > above) mbs.push_back(mb);
    if (mbs.empty()) return res;
    const double usable = static_cast<double>(r_.usable_bytes);
    auto plan_of = [&](int64_t mb) { return make_plan(r_, mb, pair, seq_len_, d_model_); };

    int64_t next =
        largest_fitting(mbs, res.line, measured_line ? usable : kFirstGuessFraction * usable);
    if (r_.start_small || next == 0 || (!activations_known_ && !measured_line)) next = mbs.front();
    int64_t measured_points = 0;
    int64_t lo_fit = 0, hi_fail = 0;  // largest known to fit, smallest known not to (0: none)
    std::optional<std::pair<int64_t, double>> last;  // the last measured (micro-batch, peak)
    while (next > 0) {
      const Trial t = s_.run(plan_of(next));  // a copy: later trials grow the session's vector
      // Too slow here: smaller micro-batches are slower still, so the pair cannot win. An error
      // other than memory (no kernel for this precision) fails at any micro-batch.
      if (t.too_slow || t.error) break;
      if (t.fits) {
        lo_fit = next;
        res.best = t;
      } else {
        hi_fail = next;
      }
      const double peak = static_cast<double>(t.peak_bytes);
      if (!t.oom && t.peak_bytes > 0) {
        if (last && last->first != next && peak > last->second)
          res.line.b = (peak - last->second) / static_cast<double>(next - last->first);
        res.line.a = peak - res.line.b * static_cast<double>(next);
        res.measured = true;
        last = {next, peak};
        ++measured_points;
      } else if (t.oom && peak > res.line.at(next)) {
        res.line.a = peak - res.line.b * static_cast<double>(next);  // a lower bound, at least
      }
      std::vector<int64_t> open;
      for (int64_t mb : mbs)
        if (mb > lo_fit && (hi_fail == 0 || mb < hi_fail)) open.push_back(mb);
      if (open.empty()) break;
      next = largest_fitting(open, res.line, usable);
      // Nothing open is predicted to fit: believe the line above a fitting micro-batch; with
      // none fitting yet, measure the smallest open one, so "infeasible" is measured, not guessed.
      if (next == 0 && lo_fit == 0) next = open.front();
      // The line says the next micro-batch up does not fit, but its prediction is within the
      // line's error of the usable bytes (peaks are not exactly linear in the micro-batch; the
      // slope may be the estimator's): measure it, so the boundary is measured, not guessed.
      if (next == 0 && hi_fail == 0 && activations_known_ &&
          res.line.at(open.front()) <= (1.0 + kBoundaryBand) * usable)
        next = open.front();
      // No slope from the estimator: the second point comes from the next micro-batch up.
      if (!activations_known_ && measured_points < 2 && lo_fit > 0 && !measured_line)
        next = open.front();
    }
    // Tokens/s is not monotonic in the micro-batch (caches: gpt-mini at 8 ran 1.8x faster than
    // at 16 on this CPU), so walk down from the largest that fits while the next smaller one is
    // faster by more than the tie band.
    if (res.best) {
      double fastest = res.best->tokens_per_s;
      for (auto it = std::find(mbs.begin(), mbs.end(), res.best->plan.micro_batch);
           it != mbs.begin();) {
        const Trial t = s_.run(plan_of(*--it));
        if (!t.fits || t.tokens_per_s <= (1.0 + kTieFraction) * fastest) break;
        fastest = t.tokens_per_s;
      }
    }
    return res;
  }

  // The line of another pair, predicted from a measured one: the measured line corrected by the
  // estimator's difference between the two pairs.
  Line transfer(const PairResult& from, Pair to) const {
    const Line ef = estimator_line(from.pair), et = estimator_line(to);
    // Without an estimated activation slope (an opaque model) the measured one carries over.
    const double b = ef.b > 0 ? from.line.b * et.b / ef.b : from.line.b;
    return {from.line.a + (et.a - ef.a), b};
  }

 private:
  Workload& w_;
  const TunerRequest& r_;
  Session& s_;
  uint64_t baseline_;
  int64_t seq_len_, d_model_;
  std::vector<int64_t> mbs_;
  // False for an opaque model: the estimator's line has no activation slope, so the search starts
  // at the smallest micro-batch, measures the next for the slope, then predicts and confirms.
  bool activations_known_ = true;
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

// Preference order among ties: fp32 before bf16 before fp16, no checkpointing before it, whole
// optimizer states before split ones (no broadcast).
int preference(const Plan& p) {
  return static_cast<int>(p.precision) * 2 + (p.checkpointing ? 1 : 0) +
         (p.optimizer_shards > 1 ? 6 : 0);
}

// The speed a finalist is ranked by: a split plan's trial did not pay for its broadcast.
double ranking_speed(const Trial& t) {
  return t.plan.optimizer_shards > 1 ? t.tokens_per_s / (1.0 + kShardedSpeedMargin)
                                     : t.tokens_per_s;
}

// One search, in the steps tune() reads top to bottom.
class Tuner {
 public:
  Tuner(Workload& w, const TunerRequest& r, MemoryMeter& m, const TrialProgress& progress)
      : w_(w),
        r_(r),
        m_(m),
        knobs_(w.knobs()),
        // Every candidate plan of the task as asked, once: the most trials it can need.
        session_(w, r, m, progress,
                 static_cast<int>(candidate_micro_batches(r).size()) * 2 *
                     (knobs_.checkpointing && !r.checkpointing ? 2 : 1) *
                     (r.world_size > 1 && !r.shard_optimizer ? 2 : 1)),
        baseline_(m.baseline_bytes()) {}

  // Candidate pairs in order of cost to the user: fp32, then the device's low precision (bf16 on
  // CPUs and GPUs from compute capability 8.0, fp16 with loss scaling before). A low precision
  // slower than fp32 on this device (its matmul measured) is kept apart, probed only when no fp32
  // plan fits; where fp32 is not a candidate, the user (or a preset) asked for it.
  void choose_candidates() {
    precisions_ = {Precision::fp32, r_.low_precision};
    if (!r_.allowed_precisions.empty()) precisions_ = r_.allowed_precisions;
    if (r_.precision) precisions_ = {*r_.precision};
    ckpts_ = {false};
    if (knobs_.checkpointing) ckpts_.push_back(true);
    if (r_.checkpointing) ckpts_ = {*r_.checkpointing};
    // ZeRO-1 needs ranks to split over; unpinned, it is searched only where memory refused a
    // plan without it (search_shape).
    shards_ = {1};
    if (r_.world_size > 1 && r_.shard_optimizer.value_or(true))
      shards_ = r_.shard_optimizer ? std::vector<int64_t>{r_.world_size}
                                   : std::vector<int64_t>{1, r_.world_size};
    fast_ = precisions_;
    const bool fp32_candidate =
        std::find(precisions_.begin(), precisions_.end(), Precision::fp32) != precisions_.end();
    if (!fp32_candidate || r_.min_precision_speed <= 0 || r_.search != "model") return;
    fast_.clear();
    for (Precision p : precisions_) {
      if (p != Precision::fp32) {
        const auto known = r_.precision_speed.find(p);
        result_.precision_speed[p] = known != r_.precision_speed.end()
                                         ? known->second
                                         : matmul_speed_vs_fp32(r_.probe.device, p);
        if (result_.precision_speed[p] < r_.min_precision_speed) {
          slow_.push_back(p);
          continue;
        }
      }
      fast_.push_back(p);
    }
  }

  // The fitting plans of one task shape (sequence length, width; 0: the workload's).
  std::vector<Trial> search_shape(int64_t seq_len, int64_t d_model) {
    seq_len_ = seq_len;
    d_model_ = d_model;
    if (r_.search != "model") {
      std::vector<Trial> finalists;
      Pair pair{precisions_.front(), ckpts_.front(), shards_.back()};
      if (auto t = classic_search(r_.search, r_, session_, pair, seq_len, d_model))
        finalists.push_back(*t);
      return finalists;
    }
    std::vector<Trial> finalists;
    std::optional<PairResult> anchor;  // the first measured line of this shape, for the next pass
    for (int64_t shards : shards_) {
      // Split optimizer states cost a broadcast per step: tried only where they can let a plan
      // fit that memory refused (or nothing fitted), never just in case.
      if (shards > 1 && shards_.size() > 1 && !finalists.empty() && !memory_refused(1)) break;
      std::vector<Trial> found = search_pairs(fast_, shards, &anchor);
      if (found.empty() && !slow_.empty()) found = search_pairs(slow_, shards, &anchor);
      finalists.insert(finalists.end(), found.begin(), found.end());
    }
    return finalists;
  }

  // Whether a trial of the current shape with `shards` was refused for memory (out of memory,
  // or a peak over the usable bytes).
  bool memory_refused(int64_t shards) const {
    for (const auto& t : session_.trials())
      if (t.plan.seq_len == seq_len_ && t.plan.d_model == d_model_ &&
          t.plan.optimizer_shards == shards && !t.fits && !t.error && !t.too_slow)
        return true;
    return false;
  }

  // Nothing fits: change the task only where the user allowed it, and as little as that takes.
  // The candidates (shorter sequences, narrower models, both) are tried in order of the share of
  // the task they remove, -log2(T'/T * P'/P) for sequence length T and parameters P
  // (docs/DECISIONS.md); the first that fits wins.
  std::vector<Trial> shrink_until_one_fits() {
    const int64_t base_seq = w_.default_seq_len();
    std::vector<int64_t> seqs = {seq_len_ ? seq_len_ : base_seq}, widths = {d_model_};
    if (r_.allow_shrink_seq && knobs_.seq_len && !r_.seq_len)
      for (int64_t t = base_seq / 2; t >= 8; t /= 2) seqs.push_back(t);
    if (r_.allow_shrink_width && knobs_.width && !r_.d_model)
      for (int64_t w : w_.width_options()) widths.push_back(w);
    auto params_at = [&](int64_t width) {
      Plan p = make_plan(r_, 1, {Precision::fp32, false}, 0, width);
      return static_cast<double>(w_.estimate_terms(p).n_params);
    };
    const double base_params = params_at(widths.front());
    struct Change {
      int64_t seq, width;
      double cost;
    };
    std::vector<Change> ladder;
    for (int64_t t : seqs)
      for (int64_t width : widths) {
        if (t == seqs.front() && width == widths.front()) continue;  // the task as asked: tried
        const double kept = static_cast<double>(t) / static_cast<double>(seqs.front()) *
                            params_at(width) / base_params;
        ladder.push_back({t, width, -std::log2(kept)});
      }
    // Cheapest first; at equal cost the one that keeps the model (a shorter sequence).
    std::stable_sort(ladder.begin(), ladder.end(), [&](const Change& a, const Change& b) {
      if (std::abs(a.cost - b.cost) > 1e-9) return a.cost < b.cost;
      return a.width == widths.front() && b.width != widths.front();
    });
    for (const Change& c : ladder) {
      std::vector<Trial> finalists = search_shape(c.seq == base_seq ? 0 : c.seq, c.width);
      if (!finalists.empty()) return finalists;
    }
    return {};
  }

  // Finalists within kNoiseFraction of the fastest are timed twice more, in turns, and ranked by
  // the median of their three timings: one 1-s timing moves by +-15% between runs on a shared
  // 2-core VM (docs/BENCHMARKS.md), enough to rank micro-batch 16 over 8 in one run and 8 over 16
  // in the next. Memory is not measured again.
  void retime_close_finalists(std::vector<Trial>& finalists) {
    std::sort(finalists.begin(), finalists.end(),
              [](const Trial& x, const Trial& y) { return x.tokens_per_s > y.tokens_per_s; });
    std::vector<Trial*> close;
    for (auto& f : finalists)
      if (close.size() < 3 && f.tokens_per_s >= (1.0 - kNoiseFraction) * finalists[0].tokens_per_s)
        close.push_back(&f);
    if (close.size() < 2) return;
    std::vector<std::vector<double>> timings;
    for (Trial* f : close) timings.push_back({f->tokens_per_s});
    for (int round = 0; round < 2; ++round)
      for (size_t i = 0; i < close.size(); ++i) {
        const double t = time_plan(w_, close[i]->plan, r_.probe, m_, close[i]->tokens_per_s);
        if (t > 0) timings[i].push_back(t);
      }
    for (size_t i = 0; i < close.size(); ++i) {
      std::sort(timings[i].begin(), timings[i].end());
      close[i]->tokens_per_s = timings[i][timings[i].size() / 2];
      close[i]->timings = static_cast<int>(timings[i].size());
      for (auto& t : session_.trials())
        if (t.plan == close[i]->plan) {
          t.tokens_per_s = close[i]->tokens_per_s;
          t.timings = close[i]->timings;
        }
    }
  }

  // The fastest finalist (within kTieFraction the one closest to the request), or the one line
  // that says what would fit.
  TunerResult finish(std::vector<Trial> finalists, double seconds) {
    TunerResult& result = result_;
    say_what_changed();
    for (Precision p : slow_) {
      bool probed = false;
      for (const auto& t : session_.trials()) probed = probed || t.plan.precision == p;
      if (!probed) result.skipped_precisions.push_back(p);
    }
    result.trials = session_.trials();
    result.probe_seconds = seconds;
    if (finalists.empty()) {
      result.infeasible_message = infeasible_message();
      return result;
    }
    std::sort(finalists.begin(), finalists.end(),
              [](const Trial& x, const Trial& y) { return ranking_speed(x) > ranking_speed(y); });
    const Trial* chosen = &finalists.front();
    for (const auto& f : finalists)
      if (ranking_speed(f) >= (1.0 - kTieFraction) * ranking_speed(finalists.front()) &&
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

 private:
  // Every (precision, checkpointing) pair of `precs` with `shards` for the current shape, each
  // pair's line moved from the first measured one (`anchor`, kept for the next call); the
  // fitting plans measured are the finalists (the largest of each pair and those its walk down
  // measured).
  std::vector<Trial> search_pairs(const std::vector<Precision>& precs, int64_t shards,
                                  std::optional<PairResult>* anchor_io) {
    ModelSearch ms(w_, r_, session_, baseline_, seq_len_, d_model_);
    std::optional<PairResult>& anchor = *anchor_io;  // the first pair with a measured line
    std::map<Precision, int64_t> best_mb;  // the largest fitting micro-batch without checkpointing
    for (bool ckpt : ckpts_) {
      for (Precision prec : precs) {
        Pair pair{prec, ckpt, shards};
        // Checkpointing costs ~1/3 more compute: it can win only at a micro-batch larger than
        // the one that fits without it, and only when that one is small.
        int64_t above = 0;
        if (ckpt && best_mb.count(prec)) {
          if (best_mb[prec] >= std::min<int64_t>(4, r_.global_batch)) continue;
          above = best_mb[prec];
        }
        std::optional<Line> predicted;
        if (anchor) predicted = ms.transfer(*anchor, pair);
        PairResult pr = ms.search(pair, predicted, above);
        result_.lines.push_back(
            {prec, ckpt, shards, seq_len_, d_model_, pr.line.a, pr.line.b, pr.measured});
        if (pr.measured && !anchor) anchor = pr;
        if (pr.best && !ckpt) best_mb[prec] = pr.best->plan.micro_batch;
      }
    }
    std::vector<Trial> finalists;
    for (const auto& t : session_.trials())
      if (t.fits && t.plan.seq_len == seq_len_ && t.plan.d_model == d_model_ &&
          t.plan.optimizer_shards == shards &&
          std::find(precs.begin(), precs.end(), t.plan.precision) != precs.end())
        finalists.push_back(t);
    return finalists;
  }

  void say_what_changed() {
    const int64_t base_seq = w_.default_seq_len(), base_width = w_.default_width();
    if (seq_len_ && seq_len_ != base_seq && !r_.seq_len) {
      result_.shrunk_task = true;
      result_.shrink_note += "sequence length shrunk from " + std::to_string(base_seq) + " to " +
                             std::to_string(seq_len_) + " (the task changed). ";
    }
    if (d_model_ && d_model_ != base_width && !r_.d_model) {
      result_.shrunk_task = true;
      result_.shrink_note += "model width shrunk from " + std::to_string(base_width) + " to " +
                             std::to_string(d_model_) + " (the model changed). ";
    }
  }

  std::string infeasible_message() const {
    uint64_t smallest = 0;
    for (const auto& t : session_.trials())
      if (t.peak_bytes && (!smallest || t.peak_bytes < smallest)) smallest = t.peak_bytes;
    std::string hint = "a larger --budget";
    if (!r_.precision || *r_.precision != r_.low_precision)
      hint += ", --precision " + to_string(r_.low_precision);
    if (knobs_.checkpointing && !(r_.checkpointing && !*r_.checkpointing))
      hint += ", --checkpointing on";
    if (!r_.allow_shrink_seq && knobs_.seq_len) hint += ", --allow-shrink seq";
    if (!r_.allow_shrink_width && knobs_.width) hint += ", --allow-shrink width";
    return "no plan fits the budget " + format_bytes(r_.budget_bytes) + " (usable " +
           format_bytes(r_.usable_bytes) +
           " after the margin): " + std::to_string(session_.trials().size()) +
           " trials, smallest measured peak " +
           (smallest ? format_bytes(smallest) : std::string("none (all out of memory)")) +
           "; try " + hint;
  }

  Workload& w_;
  const TunerRequest& r_;
  MemoryMeter& m_;
  const WorkloadKnobs knobs_;
  Session session_;
  const uint64_t baseline_;
  std::vector<Precision> precisions_, fast_, slow_;
  std::vector<bool> ckpts_;
  std::vector<int64_t> shards_;        // Plan::optimizer_shards candidates, 1 first
  int64_t seq_len_ = 0, d_model_ = 0;  // the shape searched last
  TunerResult result_;
};

}  // namespace

TunerResult tune(Workload& workload, const TunerRequest& request, MemoryMeter& meter,
                 const TrialProgress& progress) {
  const auto t0 = std::chrono::steady_clock::now();
  Tuner tuner(workload, request, meter, progress);
  tuner.choose_candidates();
  std::vector<Trial> finalists =
      tuner.search_shape(request.seq_len.value_or(0), request.d_model.value_or(0));
  if (finalists.empty()) finalists = tuner.shrink_until_one_fits();  // only with --allow-shrink
  if (!finalists.empty()) tuner.retime_close_finalists(finalists);
  return tuner.finish(std::move(finalists),
                      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
}

}  // namespace autotune
