#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>
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
// Finalists whose single timings are within this fraction of the fastest are timed again: on a
// shared machine a single 1-s timing now and then falls far below its plan's median
// (docs/BENCHMARKS.md, "Trial timing").
constexpr double kNoiseFraction = 0.35;

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
  Session(TrialRunner& trials, const TunerRequest& r, const TrialProgress& progress, int at_most)
      : trials_runner_(trials), r_(r), progress_(progress), at_most_(at_most) {}

  Trial& run(const Plan& plan) {
    for (auto& t : trials_)
      if (t.plan == plan) return t;  // never measure the same plan twice
    // A plan below half the best fitting throughput so far cannot win: stop it early.
    ProbeOptions probe = r_.probe;
    for (const auto& t : trials_)
      if (t.fits)
        probe.stop_below_tokens_per_s =
            std::max(probe.stop_below_tokens_per_s, 0.5 * t.tokens_per_s);
    const int index = static_cast<int>(trials_.size()) + 1;
    if (progress_.started) progress_.started(plan, index, at_most_);
    trials_.push_back(trials_runner_.run(plan, probe));
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
  // The smallest peak at which the kernel killed a trial (infinity: none was killed).
  double killed_below() const {
    double lowest = std::numeric_limits<double>::infinity();
    for (const auto& t : trials_)
      if (t.killed && t.peak_bytes > 0)
        lowest = std::min(lowest, static_cast<double>(t.peak_bytes));
    return lowest;
  }
  TrialRunner& runner() { return trials_runner_; }

 private:
  TrialRunner& trials_runner_;
  const TunerRequest& r_;
  const TrialProgress& progress_;
  int at_most_;
  std::vector<Trial> trials_;
};

Plan make_plan(const TunerRequest& r, int64_t mb, Pair pair, int64_t seq_len, int64_t d_model) {
  Plan p;
  apply_pins(r, p);  // the knobs the search does not choose, as pinned
  p.micro_batch = mb;
  p.grad_accum = r.global_batch / mb;
  p.precision = pair.precision;
  p.checkpointing = pair.checkpointing;
  p.optimizer_shards = pair.shards;
  p.seq_len = seq_len;
  p.d_model = d_model;
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

// Where the first trial of a pair aims when its line comes from the estimator alone: just below
// the usable bytes, by the estimator's miss on the budget figure (within 5% over the presets,
// docs/ESTIMATOR.md). A first trial that fits is a finalist and gives a full peak; one that runs
// out of memory gives only a lower bound (in its own process, it leaves nothing behind).
constexpr double kFirstGuessFraction = 0.95;

// How far above the usable bytes the predicted peak of a micro-batch still gets it measured (the
// next one up above a fit, or the smallest when none fits yet). With the estimator's slope: its
// miss on the budget figure plus the curvature a line shows when it extrapolates to twice the
// micro-batch, rounded up. With a slope through measured peaks (two of this pair's, or another
// pair's moved by the estimator's difference): the curvature alone, which a two-point line showed
// at a few percent (docs/BENCHMARKS.md, "Oracle").
constexpr double kBoundaryBand = 0.20;
constexpr double kMeasuredBand = 0.05;

// The walk down for speed starts at this micro-batch: below it the per-micro-batch overhead
// dominates, and in every oracle grid a micro-batch of 1 or 2 ran slower than the next one up.
constexpr int64_t kWalkDownFrom = 4;

// Search state for one (precision, checkpointing) pair: finds the largest micro-batch that fits.
struct PairResult {
  Pair pair;
  std::optional<Trial> best;  // the fitting trial with the largest micro-batch
  Line line;                  // corrected by this pair's measured peaks and lower bounds
  bool measured = false;      // the line went through at least one measured peak
  // The line rests on measurement: this pair's peaks or lower bounds (out of memory, killed), or
  // another pair's measured line moved here. Such a line predicts other pairs.
  bool informed = false;
  // The next smaller micro-batch below `best`, to be timed beside the finalists (tokens/s is not
  // monotonic in the micro-batch); its memory is below best's measured peak.
  std::optional<Plan> smaller;
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
  // moves the intercept; out of memory gives a lower bound), predict again among the
  // micro-batches still open, until none is left or the line says nothing larger fits.
  // `transferred`: another pair's informed line moved to this one, trusted up to the usable bytes
  // with the measured band; otherwise the estimator's line. `best_elsewhere`: the fastest fitting
  // trial of the other pairs so far (tokens/s; 0: none), which a walk down must be able to beat.
  PairResult search(Pair pair, std::optional<Line> transferred, int64_t above,
                    double best_elsewhere) {
    PairResult res{pair,
                   std::nullopt,
                   transferred.value_or(estimator_line(pair)),
                   false,
                   transferred.has_value(),
                   std::nullopt};
    std::vector<int64_t> mbs;
    for (int64_t mb : mbs_)
      if (mb > above) mbs.push_back(mb);
    if (mbs.empty()) return res;
    const double usable = static_cast<double>(r_.usable_bytes);
    // What a plan may reach: the usable bytes, or less where the kernel killed a trial below
    // them (the machine or its container holds less than the budget).
    auto room = [&] { return std::min(usable, s_.killed_below()); };
    auto plan_of = [&](int64_t mb) { return make_plan(r_, mb, pair, seq_len_, d_model_); };

    int64_t next =
        largest_fitting(mbs, res.line, transferred ? room() : kFirstGuessFraction * room());
    if (r_.start_small || next == 0 || (!activations_known_ && !transferred)) next = mbs.front();
    int64_t measured_points = 0;
    int64_t lo_fit = 0, hi_fail = 0;  // largest known to fit, smallest known not to (0: none)
    std::optional<std::pair<int64_t, double>> last;  // the last measured (micro-batch, peak)
    while (next > 0) {
      const Trial t = s_.run(plan_of(next));  // a copy: later trials grow the session's vector
      // Too slow here: smaller micro-batches are slower still, so the pair cannot win. An error
      // other than memory (no kernel for this precision) fails at any micro-batch.
      if (t.error)
        spdlog::warn("{}{}: {}; no more plans of this pair are probed", to_string(pair.precision),
                     pair.checkpointing ? " with checkpointing" : "", t.reason);
      if (t.too_slow || t.error) break;
      if (t.fits) {
        lo_fit = next;
        res.best = t;
      } else {
        hi_fail = next;
      }
      // A trial stopped early gives a lower bound, not the plan's peak: the peak it reached when
      // killed, or (out of memory under the cap at the usable bytes) the usable bytes.
      const bool stopped = t.oom || t.killed;
      const double peak = t.oom ? std::max(static_cast<double>(t.peak_bytes), usable)
                                : static_cast<double>(t.peak_bytes);
      if (!stopped && t.peak_bytes > 0) {
        if (last && last->first != next && peak > last->second)
          res.line.b = (peak - last->second) / static_cast<double>(next - last->first);
        res.line.a = peak - res.line.b * static_cast<double>(next);
        res.measured = res.informed = true;
        last = {next, peak};
        ++measured_points;
      } else if (stopped && peak >= res.line.at(next)) {
        res.line.a = peak - res.line.b * static_cast<double>(next);  // a lower bound, at least
        res.informed = true;
      }
      std::vector<int64_t> open;
      for (int64_t mb : mbs)
        if (mb > lo_fit && (hi_fail == 0 || mb < hi_fail)) open.push_back(mb);
      if (open.empty()) break;
      next = largest_fitting(open, res.line, room());
      // How far the line may miss: little with a slope through this pair's measured peaks, or
      // another pair's moved by the estimator's ratio; more with the estimator's own slope, or
      // with an opaque model's measured slope carried to another pair unchanged (its
      // activations may be half as large in a low precision).
      const bool slope_measured = measured_points >= 2 || (transferred && activations_known_);
      const double band = slope_measured ? kMeasuredBand : kBoundaryBand;
      const bool within_band = res.line.at(open.front()) <= (1.0 + band) * room();
      // Nothing open is predicted to fit and nothing fits yet: the first pair's "infeasible" is
      // measured, not guessed (the smallest open micro-batch); a pair whose line rests on
      // measurement believes it unless the miss is within the band.
      if (next == 0 && lo_fit == 0 && (!transferred || within_band)) next = open.front();
      // The line says the next micro-batch up does not fit, but its prediction is within the
      // line's error of the usable bytes: measure it, so the boundary is measured, not guessed.
      if (next == 0 && hi_fail == 0 && (activations_known_ || measured_points >= 1) && within_band)
        next = open.front();
      // No slope from the estimator: the second point comes from the next micro-batch up.
      if (!activations_known_ && measured_points < 2 && lo_fit > 0 && !transferred)
        next = open.front();
    }
    // Tokens/s is not monotonic in the micro-batch (caches: a smaller one can run faster), so
    // the next smaller micro-batch of a pair that can win (within the noise of the fastest
    // fitting plan elsewhere) is timed beside the finalists. It needs no memory trial: its peak
    // is below the one measured above it. Only from kWalkDownFrom up.
    if (res.best && res.best->tokens_per_s >= (1.0 - kNoiseFraction) * best_elsewhere) {
      const auto it = std::find(mbs.begin(), mbs.end(), res.best->plan.micro_batch);
      if (it != mbs.begin() && *std::prev(it) >= kWalkDownFrom)
        res.smaller = plan_of(*std::prev(it));
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
  Tuner(Workload& w, const TunerRequest& r, TrialRunner& trials, const TrialProgress& progress)
      : w_(w),
        r_(r),
        knobs_(w.knobs()),
        // Every candidate plan of the task as asked, once: the most trials it can need.
        session_(trials, r, progress,
                 static_cast<int>(candidate_micro_batches(r).size()) * 2 *
                     (knobs_.checkpointing && !r.checkpointing ? 2 : 1) *
                     (r.world_size > 1 && !r.shard_optimizer ? 2 : 1)),
        baseline_(trials.baseline_bytes()) {}

  // Candidate pairs in order of cost to the user: fp32, then the device's low precision (bf16 on
  // CPUs and GPUs from compute capability 8.0, fp16 with loss scaling before). A low precision
  // slower than fp32 on this device (its matmul measured) is kept apart, probed only when no fp32
  // plan fits; where fp32 is not a candidate, the user (or a preset) asked for it.
  void choose_candidates() {
    precisions_ = {Precision::fp32, r_.low_precision};
    if (!knobs_.precision) precisions_ = {Precision::fp32};  // a model that applies none
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
        result_.precision_speed[p] = session_.runner().precision_speed(p);
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

  // Finalists within kNoiseFraction of the fastest are timed twice more, in turns, in one
  // process, and ranked by the median of their three timings: single 1-s timings move enough
  // between runs on a shared machine to rank micro-batch 16 over 8 in one run and 8 over 16 in
  // the next (docs/BENCHMARKS.md, "Trial timing"). The next smaller
  // micro-batch of each close finalist's pair is timed with them; one that is faster than every
  // finalist gets its memory trial and joins them.
  void retime_close_finalists(std::vector<Trial>& finalists) {
    std::sort(finalists.begin(), finalists.end(),
              [](const Trial& x, const Trial& y) { return x.tokens_per_s > y.tokens_per_s; });
    std::vector<Trial*> close;
    for (auto& f : finalists)
      if (close.size() < 3 && f.tokens_per_s >= (1.0 - kNoiseFraction) * finalists[0].tokens_per_s)
        close.push_back(&f);
    std::vector<Trial> plans;
    for (Trial* f : close) plans.push_back(*f);
    std::vector<Plan> smaller;
    for (const auto& [plan, above] : smaller_)
      for (Trial* f : close)
        if (f->plan == above.plan && !session_.find(plan)) {
          Trial hint = above;  // its tokens/s sets how many steps make a 1-s timing
          hint.plan = plan;
          plans.push_back(hint);
          smaller.push_back(plan);
        }
    if (plans.size() < 2) return;
    const std::vector<std::vector<double>> more = session_.runner().retime(plans, 2, r_.probe);
    // The lower median: of two timings the slower, so a plan timed twice does not displace one
    // timed three times by its luckier timing.
    auto median = [](std::vector<double> v) {
      std::sort(v.begin(), v.end());
      return v.empty() ? 0.0 : v[(v.size() - 1) / 2];
    };
    double fastest = 0;
    for (size_t i = 0; i < close.size(); ++i) {
      std::vector<double> timings = {close[i]->tokens_per_s};
      for (double t : more.at(i))
        if (t > 0) timings.push_back(t);
      close[i]->tokens_per_s = median(timings);
      close[i]->timings = static_cast<int>(timings.size());
      fastest = std::max(fastest, close[i]->tokens_per_s);
      for (auto& t : session_.trials())
        if (t.plan == close[i]->plan) {
          t.tokens_per_s = close[i]->tokens_per_s;
          t.timings = close[i]->timings;
        }
    }
    for (size_t j = 0; j < smaller.size(); ++j) {
      std::vector<double> timings;
      for (double t : more.at(close.size() + j))
        if (t > 0) timings.push_back(t);
      const double tps = median(timings);
      if (tps <= (1.0 + kTieFraction) * fastest) continue;
      Trial& t = session_.run(smaller[j]);  // its memory, measured as every chosen plan's is
      if (!t.fits) continue;
      t.tokens_per_s = tps;
      t.timings = static_cast<int>(timings.size());
      finalists.push_back(t);
    }
  }

  // The fastest finalist (within kTieFraction the one closest to the request), or the one line
  // that says what would fit.
  TunerResult finish(std::vector<Trial> finalists, double seconds) {
    if (finalists.empty()) result_.infeasible_message = infeasible_message();
    TunerResult& result = result_;
    say_what_changed();
    for (Precision p : slow_) {
      bool probed = false;
      for (const auto& t : session_.trials()) probed = probed || t.plan.precision == p;
      if (!probed) result.skipped_precisions.push_back(p);
    }
    result.trials = session_.trials();
    result.probe_seconds = seconds;
    if (finalists.empty()) return result;
    std::sort(finalists.begin(), finalists.end(),
              [](const Trial& x, const Trial& y) { return ranking_speed(x) > ranking_speed(y); });
    const Trial* chosen = &finalists.front();
    for (const auto& f : finalists)
      if (ranking_speed(f) >= (1.0 - kTieFraction) * ranking_speed(finalists.front()) &&
          preference(f.plan) < preference(chosen->plan))
        chosen = &f;
    result.plan = chosen->plan;
    for (auto& t : result.trials) {
      // What a runner said after "fits" stays (script mode: "; with 2 worker(s): Killed ...").
      const std::string note = t.reason.rfind("fits", 0) == 0 ? t.reason.substr(4) : "";
      if (t.fits && !(t.plan == chosen->plan))
        t.reason = "fits, slower than the chosen plan" + note;
      else if (t.plan == chosen->plan)
        t.reason = "chosen" + note;
    }
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
    std::optional<PairResult>& anchor = *anchor_io;  // the line other pairs are predicted from
    std::map<std::pair<Precision, bool>, PairResult> searched;  // this call's pairs
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
          // Nor for a precision that another one outran at a micro-batch no larger: checkpointing
          // costs both the same recomputation, so the other one's checkpointed plans win too.
          if (outrun(prec, best_mb[prec])) continue;
        }
        // The line to start from: the same precision's other pair (its precision-specific
        // memory, such as a low precision's kernel state, is measured there), else the first
        // measured line, moved here by the estimator's difference.
        const PairResult* source = anchor ? &*anchor : nullptr;
        const auto same = searched.find({prec, !ckpt});
        if (same != searched.end() && same->second.informed) source = &same->second;
        std::optional<Line> predicted;
        if (source) predicted = ms.transfer(*source, pair);
        PairResult pr = ms.search(pair, predicted, above, fastest_fit());
        result_.lines.push_back(
            {prec, ckpt, shards, seq_len_, d_model_, pr.line.a, pr.line.b, pr.measured});
        // The anchor: the first measured line, or until one is, the first informed one (lower
        // bounds of a pair that fitted nowhere).
        if (pr.informed && (!anchor || (pr.measured && !anchor->measured))) anchor = pr;
        if (pr.best && !ckpt) best_mb[prec] = pr.best->plan.micro_batch;
        if (pr.smaller && pr.best) smaller_.push_back({*pr.smaller, *pr.best});
        searched.emplace(std::make_pair(prec, ckpt), pr);
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

  // Whether a fitting trial of another precision without checkpointing, at a micro-batch of at
  // most `mb`, ran faster (beyond the tie band) than every fitting trial of `prec` without it.
  bool outrun(Precision prec, int64_t mb) const {
    double mine = 0, other = 0;
    for (const auto& t : session_.trials()) {
      if (!t.fits || t.plan.checkpointing || t.plan.seq_len != seq_len_ ||
          t.plan.d_model != d_model_)
        continue;
      if (t.plan.precision == prec)
        mine = std::max(mine, t.tokens_per_s);
      else if (t.plan.micro_batch <= mb)
        other = std::max(other, t.tokens_per_s);
    }
    return other > (1.0 + kTieFraction) * mine;
  }

  // Tokens/s of the fastest fitting trial of the current shape so far (0: none).
  double fastest_fit() const {
    double best = 0;
    for (const auto& t : session_.trials())
      if (t.fits && t.plan.seq_len == seq_len_ && t.plan.d_model == d_model_)
        best = std::max(best, ranking_speed(t));
    return best;
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

  // Nothing fits: the smallest plan of the shape searched last (the task as asked, or as far as
  // --allow-shrink took it) by the estimator's ranking, its need measured with no cap in one
  // trial, and the budget that would hold it. The figure is what a fresh training process of
  // that plan needs, not the peak some trial reached when it ran out of memory.
  std::string infeasible_message() {
    const std::vector<Precision>& precs = fast_.empty() ? precisions_ : fast_;
    const int64_t mb = candidate_micro_batches(r_).front();
    std::optional<Plan> smallest;
    double smallest_bytes = 0;
    for (Precision p : precs)
      for (bool ckpt : ckpts_) {
        const Plan plan = make_plan(r_, mb, {p, ckpt, shards_.back()}, seq_len_, d_model_);
        const double bytes = static_cast<double>(estimate_memory(w_, plan, baseline_).peak_bytes);
        if (!smallest || bytes < smallest_bytes) {
          smallest = plan;
          smallest_bytes = bytes;
        }
      }
    ProbeOptions once = r_.probe;
    once.measured_steps = 1;  // step 2 holds the AdamW states: the run's peak
    const std::optional<uint64_t> need = session_.runner().need_bytes(*smallest, once);
    std::string hint;
    if (!r_.allow_shrink_seq && knobs_.seq_len && !r_.seq_len) hint += ", or --allow-shrink seq";
    if (!r_.allow_shrink_width && knobs_.width && !r_.d_model) hint += ", or --allow-shrink width";
    const std::string head = "no plan fits the budget " + format_bytes(r_.budget_bytes) +
                             " (usable " + format_bytes(r_.usable_bytes) + " after the margin)";
    if (!need) {
      std::string pins;
      if (r_.precision && *r_.precision != r_.low_precision)
        pins += ", or drop --precision " + to_string(*r_.precision);
      if (r_.checkpointing && !*r_.checkpointing) pins += ", or drop --checkpointing off";
      return head + ": " + std::to_string(session_.trials().size()) +
             " trials, and the smallest plan, " + smallest->describe() +
             ", could not be measured without a cap either; give a larger --budget" + pins + hint;
    }
    result_.smallest_plan = smallest;
    result_.smallest_need_bytes = *need;
    // A need within the usable bytes: the capped trials ran out where the uncapped one did not
    // (the allocator's cache, heap); ask for the need plus what the cap had to spare.
    const uint64_t hold = *need > r_.usable_bytes ? *need : r_.usable_bytes + (*need / 20);
    result_.budget_needed_bytes = budget_to_hold(hold, r_.budget_bytes, r_.usable_bytes);
    return head + ": the smallest plan, " + smallest->describe() + ", needs " +
           format_bytes(*need) + "; give --budget " +
           std::to_string(result_.budget_needed_bytes >> 20) + "M or more" + hint;
  }

  Workload& w_;
  const TunerRequest& r_;
  const WorkloadKnobs knobs_;
  Session session_;
  const uint64_t baseline_;
  std::vector<Precision> precisions_, fast_, slow_;
  std::vector<bool> ckpts_;
  std::vector<int64_t> shards_;  // Plan::optimizer_shards candidates, 1 first
  // Each pair's next smaller micro-batch below its largest fitting trial, with that trial.
  std::vector<std::pair<Plan, Trial>> smaller_;
  int64_t seq_len_ = 0, d_model_ = 0;  // the shape searched last
  TunerResult result_;
};

}  // namespace

TunerResult tune(Workload& workload, const TunerRequest& request, TrialRunner& trials,
                 const TrialProgress& progress) {
  const auto t0 = std::chrono::steady_clock::now();
  Tuner tuner(workload, request, trials, progress);
  tuner.choose_candidates();
  std::vector<Trial> finalists =
      tuner.search_shape(request.seq_len.value_or(0), request.d_model.value_or(0));
  if (finalists.empty()) finalists = tuner.shrink_until_one_fits();  // only with --allow-shrink
  if (!finalists.empty()) tuner.retime_close_finalists(finalists);
  return tuner.finish(std::move(finalists),
                      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
}

TunerResult tune(Workload& workload, const TunerRequest& request, MemoryMeter& meter,
                 const TrialProgress& progress) {
  InProcessTrials trials(workload, meter);
  return tune(workload, request, trials, progress);
}

uint64_t budget_to_hold(uint64_t need_bytes, uint64_t budget_bytes, uint64_t usable_bytes) {
  // A margin given as a share scales with the budget; one given in bytes does not, and needs
  // less: the share is the larger answer whenever the need is above the usable bytes.
  const double kept = budget_bytes > 0 && usable_bytes > 0
                          ? static_cast<double>(usable_bytes) / static_cast<double>(budget_bytes)
                          : 1.0;
  // The same plan's peak moves a little between fresh processes (allocator and page-cache
  // timing): the named budget holds 1% more than the one measurement, so the next run fits too.
  const double need = static_cast<double>(need_bytes) * 1.01;
  const uint64_t by_share = static_cast<uint64_t>(std::ceil(need / kept));
  const uint64_t by_bytes = static_cast<uint64_t>(std::ceil(need)) +
                            (budget_bytes - std::min(budget_bytes, usable_bytes));
  constexpr uint64_t kMiB = uint64_t{1} << 20;
  return (std::max(by_share, by_bytes) / kMiB + 1) * kMiB;
}

}  // namespace autotune
