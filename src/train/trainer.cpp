#include "autotune/trainer.h"

#include <csignal>

#include <ATen/DeviceAccelerator.h>

#include <malloc.h>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <memory>
#include <optional>

#include <spdlog/spdlog.h>

#include "autotune/checkpoint.h"
#include "autotune/distributed.h"
#include "autotune/errors.h"
#include "memory/cpu_allocator.h"
#include "models/precision.h"
#include "train/optimizer.h"
#include "util/hash.h"

namespace autotune {

const char* to_string(Phase p) {
  switch (p) {
    case Phase::forward:
      return "forward";
    case Phase::backward:
      return "backward";
    case Phase::optimizer:
      return "optimizer";
    case Phase::eval:
      return "eval";
  }
  return "?";
}

double learning_rate(const TrainOptions& opt, int64_t step) {
  const int64_t warmup =
      opt.warmup_steps >= 0 ? opt.warmup_steps : std::min<int64_t>(100, opt.steps / 10);
  if (step < warmup) return opt.lr * static_cast<double>(step + 1) / static_cast<double>(warmup);
  const double span = static_cast<double>(std::max<int64_t>(1, opt.steps - warmup));
  const double progress = std::min(1.0, static_cast<double>(step - warmup) / span);
  return opt.min_lr + 0.5 * (1.0 + std::cos(M_PI * progress)) * (opt.lr - opt.min_lr);
}

bool next_plan_after_oom(const Plan& plan, bool can_checkpoint, bool allow_precision_change,
                         Plan* next, Precision low_precision) {
  *next = plan;
  // Halving keeps micro_batch * grad_accum exact only when micro_batch is even.
  if (plan.micro_batch > 1 && plan.micro_batch % 2 == 0) {
    next->micro_batch /= 2;
    next->grad_accum *= 2;
    return true;
  }
  if (can_checkpoint && !plan.checkpointing) {
    next->checkpointing = true;
    return true;
  }
  if (allow_precision_change && plan.precision == Precision::fp32) {
    next->precision = low_precision;
    return true;
  }
  return false;
}

namespace {

// Hands cached blocks back (accelerator cache, the CPU allocator's cache, the C heap's top):
// between phases in ultra-low-mem, and after an OOM so the re-run starts from what it needs.
void release_cached_memory(torch::Device device) {
  if (device.type() != c10::DeviceType::CPU) at::accelerator::emptyCache();
  cpu_alloc::release_cache();
  malloc_trim(0);
}

// Another rank ran out of memory in this step: this one recovers with it.
struct PeerOutOfMemory : std::runtime_error {
  PeerOutOfMemory() : std::runtime_error("another rank ran out of memory in this step") {}
};

std::string digest(const std::vector<torch::Tensor>& params) {
  uint64_t h = kFnvOffset;
  for (const auto& p : params) {
    const torch::Tensor c = p.detach().to(torch::kCPU).contiguous();
    h = fnv1a64(c.data_ptr(), c.nbytes(), h);
  }
  return hex16(h);
}

void synchronize(torch::Device device) {
  if (device.type() != c10::DeviceType::CPU) at::accelerator::synchronizeDevice(device.index());
}

torch::optim::AdamWOptions adamw_options(const TrainOptions& opt, double weight_decay) {
  return torch::optim::AdamWOptions(opt.lr)
      .betas({opt.beta1, opt.beta2})
      .weight_decay(weight_decay);
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// The tensors of one attempt at a step. They live until the attempt ends, as locals of one scope
// would: the last micro-batch lasts through the optimizer phase, and an OOM frees them all (by
// unwinding) before the recovery releases the cached memory. Destroyed in reverse order.
struct StepTensors {
  torch::Tensor loss_sum;   // [] fp32 on the device: the step's mean loss (the ranks sum theirs)
  Batch batch;              // the micro-batch being trained
  torch::Tensor grad_norm;  // [] before clipping; undefined without clipping or on fp16 overflow
  FusedAdamW::Update update;
};

// One call of train(): the state its parts share, from the resume to the summary. Members are
// declared in the order the run makes them, so they are destroyed in the reverse order: the
// gradient reducer (its hooks) before the parameters and the model, the CPU cache scope last.
class TrainingRun {
 public:
  TrainingRun(Workload& workload, Plan plan, const TrainOptions& opt,
              const std::vector<TrainObserver*>& observers)
      : workload_(workload),
        plan_(std::move(plan)),
        opt_(opt),
        observers_(observers),
        can_checkpoint_(workload.knobs().checkpointing),
        comm_(opt.comm),
        world_(comm_ ? comm_->size() : 1),
        rank_(comm_ ? comm_->rank() : 0) {}

  // Start (or resume), run the steps up to opt.steps or a stop signal, then the summary.
  RunSummary train();

 private:
  template <class F>
  void notify(F&& fn) {
    for (auto* o : observers_) fn(*o);
  }

  // Before the first step.
  void start();
  void choose_checkpoint();
  bool checkpoint_usable(const std::string& file, const CheckpointMeta& meta) const;
  bool shards_complete(const CheckpointMeta& meta) const;
  void build_optimizer();
  std::vector<torch::Tensor> in_my_shard(std::vector<torch::Tensor> ps) const;
  void restore();

  // A step.
  int stop_requested();
  bool run_step();
  Batch fetch(int64_t s, int64_t m);
  void forward_backward(StepTensors* t, Phase* phase);
  bool optimizer_step(StepTensors* t, bool* agreed);
  void record_step(const StepTensors& t, double lr, std::chrono::steady_clock::time_point t0,
                   bool finite);
  void recover_from_oom(Phase phase, bool agreed, bool own, const char* what);

  // Between and after the steps.
  double evaluate();
  void checkpoint(int writer = 0);
  void write_checkpoint(const CheckpointMeta& meta);
  void save_after_lost(const LostRank& lost);
  RunSummary finish();

  const std::chrono::steady_clock::time_point wall_start_ = std::chrono::steady_clock::now();
  // Freed CPU blocks stay mapped for the next step's tensors of the same size (no page faults);
  // the cache is handed back when the run ends.
  cpu_alloc::CachingScope caching_;
  Workload& workload_;
  Plan plan_;  // as asked, then the resumed checkpoint's, then each OOM recovery's
  const TrainOptions& opt_;
  const std::vector<TrainObserver*>& observers_;
  const bool can_checkpoint_;
  Communicator* const comm_;
  const int world_, rank_;

  std::string resume_from_;  // the checkpoint to resume; empty: a fresh start
  int64_t resume_step_ = 0;  // the step resume_from_ holds (it names its shards' files)
  std::shared_ptr<TrainableModel> model_;
  std::vector<torch::Tensor> params_;
  int shards_ = 1;           // ZeRO-1: ranks the optimizer states are split over
  std::vector<int> owners_;  // ZeRO-1: the shard of each parameter of params_
  int my_shard_ = 0;         // the shard this rank's optimizer holds
  std::unique_ptr<FusedAdamW> optimizer_;
  std::optional<LossScaler> scaler_;
  RunSummary summary_;
  int64_t step_ = 0;                          // optimizer steps completed
  std::unique_ptr<GradientReducer> reducer_;  // data parallel only
  // The communicator's totals at the start: the summary reports this run's share.
  double allreduce_s0_ = 0;
  int64_t allreduce_calls0_ = 0;
  double broadcast_s0_ = 0;
  double train_seconds_ = 0;  // evaluation excluded
  int64_t tokens_per_step_ = 0;
  std::optional<Batch> ahead_;  // the next micro-batch, fetched early
  torch::Tensor last_loss_;     // [] the last completed step's loss, on the device
};

// The loop: one iteration is one optimizer step over the global batch (or an attempt at it that
// ran out of memory and was recovered). Nothing in a step reads a value back to the host (the
// loss and the gradient norm stay on the device until an observer prints them), so an
// accelerator never waits for the host.
RunSummary TrainingRun::train() {
  start();
  while (step_ < opt_.steps) {
    // A stop signal ends the run between steps; the summary checkpoints where it stopped.
    if (const int stop = stop_requested()) {
      summary_.stop_signal = stop;
      break;
    }
    // Out of memory (here or on another rank): recovered with the next plan down the ladder,
    // the same step is attempted again on the same samples.
    if (!run_step()) continue;
    // The last step's evaluation and checkpoint are finish()'s.
    const bool last = step_ == opt_.steps;
    if (opt_.eval_every > 0 && step_ % opt_.eval_every == 0 && !last) {
      const double v = evaluate();
      notify([&](TrainObserver& o) { o.on_eval(step_, v); });
    }
    if (opt_.checkpoint_every > 0 && step_ % opt_.checkpoint_every == 0 && !last) checkpoint();
  }
  return finish();
}

// Everything before the first step: the checkpoint to resume (its plan wins), the model, its
// optimizer and loss scaler, their state, the parameters every rank starts from.
void TrainingRun::start() {
  if (opt_.resume) choose_checkpoint();
  workload_.validate(plan_);
  model_ = workload_.build(plan_, opt_.device, opt_.seed);
  model_->train();
  params_ = model_->parameters();
  build_optimizer();
  scaler_.emplace(opt_.device, plan_.precision == Precision::fp16);
  restore();
  if (comm_) comm_->broadcast(params_);  // every rank starts from rank 0's parameters
  // Data parallel: the gradient all-reduces of a step start during its last backward (on an
  // accelerator) or right after it.
  if (comm_)
    reducer_ = std::make_unique<GradientReducer>(*comm_, params_, overlap_allreduce(opt_.device));
  allreduce_s0_ = comm_ ? comm_->allreduce_seconds() : 0;
  allreduce_calls0_ = comm_ ? comm_->allreduce_calls() : 0;
  broadcast_s0_ = comm_ ? comm_->broadcast_seconds() : 0;
  summary_.first_step = step_;
  notify([&](TrainObserver& o) { o.on_start(plan_, opt_, step_); });
  tokens_per_step_ = world_ * plan_.global_batch() * workload_.tokens_per_sequence(plan_);
}

// --resume: the newest checkpoint of run_dir that is readable and complete. Its plan replaces
// the one asked (it may be a safer plan found by OOM recovery). A damaged newest file falls back
// to the one before, saying so.
void TrainingRun::choose_checkpoint() {
  if (opt_.run_dir.empty()) throw resume_needs_run_dir();
  auto files = list_checkpoints(opt_.run_dir);
  for (auto it = files.rbegin(); it != files.rend() && resume_from_.empty(); ++it) {
    std::string why;
    const auto meta = read_checkpoint_meta(*it, &why);
    if (!meta) {
      spdlog::warn("checkpoint {} is unreadable ({}); trying the one before", *it, why);
      continue;
    }
    if (!checkpoint_usable(*it, *meta)) continue;
    plan_ = meta->plan;
    resume_from_ = *it;
    resume_step_ = meta->step;
  }
  if (resume_from_.empty()) throw no_complete_checkpoint(opt_.run_dir);
}

// False (saying so) when a rank's optimizer shard of `file` is missing, so the one before is
// tried; a checkpoint of another model, data, world size or global batch is refused.
bool TrainingRun::checkpoint_usable(const std::string& file, const CheckpointMeta& meta) const {
  if (meta.workload != workload_.config())
    throw UsageError("checkpoint " + file + " belongs to a different model or data; " +
                     "use the same --model and --data, or a new --run-dir");
  if (meta.world_size != world_)
    throw UsageError("checkpoint " + file + " was written by " + std::to_string(meta.world_size) +
                     " rank(s), this run has " + std::to_string(world_) +
                     "; resume it with --nproc " + std::to_string(meta.world_size));
  if (!shards_complete(meta)) {
    spdlog::warn("checkpoint {} lacks a rank's optimizer shard; trying the one before", file);
    return false;
  }
  if (meta.plan.global_batch() != plan_.global_batch())
    throw UsageError("checkpoint " + file + " has global batch " +
                     std::to_string(meta.plan.global_batch()) + ", this run asks " +
                     std::to_string(plan_.global_batch()) + "; use the same --global-batch");
  return true;
}

// ZeRO-1 checkpoints: every rank's optimizer shard of the step is on disk.
bool TrainingRun::shards_complete(const CheckpointMeta& meta) const {
  for (int r = 1; r < meta.plan.optimizer_shards; ++r)
    if (!std::filesystem::exists(optimizer_shard_path(opt_.run_dir, meta.step, r))) return false;
  return true;
}

// AdamW, with weight decay on the matrices only. ZeRO-1 (plan.optimizer_shards > 1): this rank's
// optimizer holds and updates only the parameters of its shard; the owners broadcast them after
// each update. A probe trial without the other ranks measures the heaviest shard's rank (the
// others' parameters stay unchanged).
void TrainingRun::build_optimizer() {
  shards_ = static_cast<int>(plan_.optimizer_shards);
  if (shards_ > 1 && comm_ && shards_ != world_)
    throw UsageError("the plan splits the optimizer states over " + std::to_string(shards_) +
                     " ranks but this run has " + std::to_string(world_) +
                     "; run it with --nproc " + std::to_string(shards_) + " or re-probe");
  my_shard_ = rank_;
  if (shards_ > 1) {
    owners_ = shard_owners(params_, shards_);
    if (!comm_) my_shard_ = heaviest_shard(params_, owners_, shards_);
  }
  std::vector<torch::optim::OptimizerParamGroup> groups;
  groups.emplace_back(
      in_my_shard(model_->decay_parameters()),
      std::make_unique<torch::optim::AdamWOptions>(adamw_options(opt_, opt_.weight_decay)));
  groups.emplace_back(in_my_shard(model_->no_decay_parameters()),
                      std::make_unique<torch::optim::AdamWOptions>(adamw_options(opt_, 0.0)));
  optimizer_ =
      std::make_unique<FusedAdamW>(std::move(groups), adamw_options(opt_, opt_.weight_decay));
}

// The parameters of `ps` that this rank's optimizer holds (all of them without ZeRO-1).
std::vector<torch::Tensor> TrainingRun::in_my_shard(std::vector<torch::Tensor> ps) const {
  if (shards_ <= 1) return ps;
  std::vector<torch::Tensor> mine;
  for (const auto& p : ps)
    for (size_t i = 0; i < params_.size(); ++i)
      if (params_[i].is_same(p) && owners_[i] == my_shard_) mine.push_back(p);
  return mine;
}

// The state to continue from: the chosen checkpoint's (ZeRO-1 ranks > 0 read their optimizer
// states from their shard's file), or a fresh start's seed.
void TrainingRun::restore() {
  if (resume_from_.empty()) {
    torch::manual_seed(opt_.seed);  // dropout masks are reproducible from the seed
    return;
  }
  torch::Tensor scaler_state;
  const std::string shard_file = shards_ > 1 && rank_ > 0
                                     ? optimizer_shard_path(opt_.run_dir, resume_step_, rank_)
                                     : std::string();
  step_ =
      load_checkpoint(resume_from_, *model_, *optimizer_, &scaler_state, opt_.device, shard_file)
          .step;
  if (scaler_->enabled() && scaler_state.numel() == 2) scaler_->load_state(scaler_state);
}

// The signal that stops the run before this step, or 0. Data parallel: a signal to one rank
// stops all (SIGTERM where none came), so every rank leaves at the same step.
int TrainingRun::stop_requested() {
  int stop = opt_.stop_signal ? opt_.stop_signal->load() : 0;
  try {
    if (comm_ && comm_->any(stop != 0) && !stop) stop = SIGTERM;
  } catch (const LostRank& lost) {
    save_after_lost(lost);
    throw;
  }
  return stop;
}

// One attempt at optimizer step step_ + 1: the forward and backward of each micro-batch, then
// the update. False when it ran out of memory, here or on another rank, and was recovered: the
// loop then attempts the same step again with the next plan.
bool TrainingRun::run_step() {
  notify([&](TrainObserver& o) { o.on_step_begin(step_); });
  const double lr = learning_rate(opt_, step_);
  for (auto& group : optimizer_->param_groups()) group.options().set_lr(lr);
  const auto t0 = std::chrono::steady_clock::now();
  Phase phase = Phase::forward;  // where an OOM hit
  bool agreed = false;           // data parallel: the ranks agreed this step has no OOM
  try {
    StepTensors t;
    forward_backward(&t, &phase);
    phase = Phase::optimizer;
    const bool finite = optimizer_step(&t, &agreed);
    ++step_;
    record_step(t, lr, t0, finite);
  } catch (const LostRank& lost) {
    save_after_lost(lost);
    throw;
  } catch (const c10::OutOfMemoryError& oom) {
    recover_from_oom(phase, agreed, /*own=*/true, oom.what_without_backtrace());
    return false;
  } catch (const PeerOutOfMemory& peer) {
    recover_from_oom(phase, agreed, /*own=*/false, peer.what());
    return false;
  }
  return true;
}

// Micro-batch m of step s holds samples [m*mb, (m+1)*mb) of this rank's share of the global
// batch, which starts at rank * mb * grad_accum: the samples of a step are the same whatever the
// world size.
Batch TrainingRun::fetch(int64_t s, int64_t m) {
  return workload_.train_batch(s, rank_ * plan_.global_batch() + m * plan_.micro_batch,
                               plan_.micro_batch, plan_, opt_.device);
}

// The forward and backward of the step's grad_accum micro-batches, their gradients accumulated
// and their losses summed into t->loss_sum. The next micro-batch is fetched before the current
// one's backward, so its host-to-device copy is queued behind compute instead of in front of it.
void TrainingRun::forward_backward(StepTensors* t, Phase* phase) {
  if (reducer_) reducer_->begin_step();
  model_->zero_grad(/*set_to_none=*/true);  // every parameter's (not only this shard's)
  t->loss_sum = torch::zeros({}, torch::TensorOptions(opt_.device));  // [] fp32
  // (Fetching counts as the forward: a prefetch that ran out of memory surfaces here.)
  t->batch = ahead_ ? std::move(*ahead_) : fetch(step_, 0);
  ahead_.reset();
  for (int64_t m = 0; m < plan_.grad_accum; ++m) {
    *phase = Phase::forward;
    notify([&](TrainObserver& o) { o.on_phase_begin(*phase); });
    torch::Tensor loss;
    {
      AutocastScope autocast(opt_.device, plan_.precision);
      loss = model_->loss(t->batch);
    }
    // Each micro-batch's mean loss weighs 1/grad_accum: gradients equal one big batch's.
    loss = loss / static_cast<double>(plan_.grad_accum);
    notify([&](TrainObserver& o) { o.on_phase_end(*phase, step_); });
    if (opt_.release_between_phases) release_cached_memory(opt_.device);
    *phase = Phase::backward;
    notify([&](TrainObserver& o) { o.on_phase_begin(*phase); });
    if (m + 1 < plan_.grad_accum)
      ahead_ = fetch(step_, m + 1);
    else if (step_ + 1 < opt_.steps)
      ahead_ = fetch(step_ + 1, 0);
    if (reducer_ && m + 1 == plan_.grad_accum) reducer_->arm();  // its gradients are final
    scaler_->scale_loss(loss).backward();
    t->loss_sum += world_ > 1 ? loss.detach() / static_cast<double>(world_) : loss.detach();
    notify([&](TrainObserver& o) { o.on_phase_end(*phase, step_); });
    if (opt_.release_between_phases) release_cached_memory(opt_.device);
    if (m + 1 < plan_.grad_accum) {
      t->batch = std::move(*ahead_);
      ahead_.reset();
    }
  }
}

// The optimizer phase: the averaged gradients, then the update. Returns whether the gradients
// were finite (false: an fp16 overflow, the update is skipped).
bool TrainingRun::optimizer_step(StepTensors* t, bool* agreed) {
  notify([&](TrainObserver& o) { o.on_phase_begin(Phase::optimizer); });
  optimizer_->create_states();
  if (comm_) reducer_->finish();  // the averaged gradients, from the all-reduces backward started
  // Everything that allocates comes before anything that outlives the step changes
  // (parameters, optimizer states, the loss scale): an OOM up to here re-runs the step.
  // Unscaling and clipping change only the gradients, which a re-run makes again.
  // fp16 only: whether any gradient overflowed is read back (one sync per step, as
  // torch.amp.GradScaler does); bf16 and fp32 never skip a step.
  const bool finite = scaler_->unscale_and_check(params_);
  if (finite) {
    if (opt_.grad_clip > 0) t->grad_norm = clip_grad_norm(params_, opt_.grad_clip);
    t->update = optimizer_->prepare();
  }
  if (comm_) {
    // Before any rank changes its parameters, all agree that every forward and backward
    // ran: an OOM on one rank is recovered on all, with the same plan, so none diverges.
    if (comm_->any(false)) throw PeerOutOfMemory();
    *agreed = true;
    comm_->sum_in_place(t->loss_sum);  // each rank's share was divided by the world size
  }
  scaler_->update();
  if (finite) {
    optimizer_->apply(t->update);
    if (comm_ && shards_ > 1) comm_->broadcast_shards(params_, owners_);
  }
  notify([&](TrainObserver& o) { o.on_phase_end(Phase::optimizer, step_); });
  if (opt_.synchronize_steps) synchronize(opt_.device);
  return finite;
}

// The step just completed, counted and handed to the observers.
void TrainingRun::record_step(const StepTensors& t, double lr,
                              std::chrono::steady_clock::time_point t0, bool finite) {
  const double dt = seconds_since(t0);
  train_seconds_ += dt;
  summary_.tokens += tokens_per_step_;
  last_loss_ = t.loss_sum;
  StepStats s{step_,
              opt_.steps,
              t.loss_sum,
              t.grad_norm,
              lr,
              dt * 1e3,
              static_cast<double>(tokens_per_step_) / dt,
              !finite,
              plan_};
  notify([&](TrainObserver& o) { o.on_step(s); });
}

// Out of memory in this step's attempt, on this rank (`own`) or another: drop the partial
// gradients, release memory, step down the ladder, and the loop re-runs this same step on the
// same samples: no step and no sample is lost. Called while the OOM is being handled: without
// recovery (probe trials) it rethrows it; a RuntimeError when it cannot recover.
void TrainingRun::recover_from_oom(Phase phase, bool agreed, bool own, const char* what) {
  if (comm_ && agreed)
    throw RuntimeError("rank " + std::to_string(rank_) + " ran out of memory at step " +
                       std::to_string(step_ + 1) +
                       " after the ranks agreed on it (gradient all-reduce or optimizer); "
                       "give a larger --budget");
  ahead_.reset();
  model_->zero_grad(/*set_to_none=*/true);
  release_cached_memory(opt_.device);
  if (own && comm_) {
    // The other ranks run all of this step's all-reduces and then wait in the agreement.
    try {
      reducer_->abandon();
    } catch (const c10::OutOfMemoryError&) {
      throw RuntimeError("rank " + std::to_string(rank_) + " ran out of memory at step " +
                         std::to_string(step_ + 1) +
                         " and again while finishing the gradient all-reduce with the other "
                         "ranks; give a larger --budget");
    }
    comm_->any(true);
  }
  if (!opt_.recover_oom) throw;  // probe trials: the caller records the OOM by its type
  Plan next;
  if (!next_plan_after_oom(plan_, can_checkpoint_, opt_.allow_precision_change, &next,
                           opt_.low_precision))
    throw RuntimeError("out of memory at step " + std::to_string(step_ + 1) + " (" +
                       to_string(phase) + ") with plan " + plan_.describe() +
                       " and nothing left to step down to; give a larger budget or a "
                       "smaller model");
  Recovery r{step_, phase, plan_, next, false, what};
  plan_ = next;
  model_->set_checkpointing(plan_.checkpointing);
  if (plan_.precision == Precision::fp16 && !scaler_->enabled())
    *scaler_ = LossScaler(opt_.device, true);  // fp16 needs its loss scaling from here on
  summary_.recoveries.push_back(r);
  notify([&](TrainObserver& o) { o.on_recovery(r); });
}

// The mean validation loss over opt.eval_sequences. An OOM halves the eval batch only (the
// training plan is not touched) and evaluates again.
double TrainingRun::evaluate() {
  model_->eval();
  torch::NoGradGuard no_grad;
  int64_t eval_batch = plan_.eval_batch_or_micro_batch();
  for (;;) {
    try {
      notify([&](TrainObserver& o) { o.on_phase_begin(Phase::eval); });
      AutocastScope autocast(opt_.device, plan_.precision);
      torch::Tensor sum = torch::zeros({}, torch::TensorOptions(opt_.device));  // on the device
      for (int64_t first = 0; first < opt_.eval_sequences; first += eval_batch) {
        int64_t n = std::min(eval_batch, opt_.eval_sequences - first);
        sum += model_->loss(workload_.val_batch(first, n, plan_, opt_.device)) *
               static_cast<double>(n);
      }
      const double mean = sum.item<double>() / static_cast<double>(opt_.eval_sequences);
      notify([&](TrainObserver& o) { o.on_phase_end(Phase::eval, step_); });
      model_->train();
      return mean;
    } catch (const c10::OutOfMemoryError& e) {
      if (!opt_.recover_oom || eval_batch == 1) throw;
      Recovery r{step_, Phase::eval, plan_, plan_, true, e.what_without_backtrace()};
      eval_batch = std::max<int64_t>(1, eval_batch / 2);
      plan_.eval_batch = eval_batch;
      r.after = plan_;
      summary_.recoveries.push_back(r);
      notify([&](TrainObserver& o) { o.on_recovery(r); });
    }
  }
}

// Rank 0 writes the checkpoints (`writer` 1 when rank 0 was lost). With ZeRO-1 every other rank
// first writes its optimizer shard, so the writer's file appears only when all shards exist.
void TrainingRun::checkpoint(int writer) {
  if (opt_.run_dir.empty()) return;
  if (shards_ > 1 && comm_) {
    if (rank_ != writer) save_optimizer_shard(opt_.run_dir, step_, rank_, *optimizer_);
    comm_->barrier();
  }
  if (rank_ != writer) return;
  CheckpointMeta meta{step_, plan_, opt_.seed, workload_.config(), opt_.device, world_};
  // Writing copies a few buffers: an OOM there leaves the previous checkpoint intact (the
  // write is atomic) and is tried once more with the cache released.
  try {
    write_checkpoint(meta);
  } catch (const c10::OutOfMemoryError& e) {
    spdlog::warn("the checkpoint of step {} ran out of memory ({}); writing it once more", step_,
                 e.what_without_backtrace());
    release_cached_memory(opt_.device);
    try {
      write_checkpoint(meta);
    } catch (const c10::OutOfMemoryError& again) {
      throw RuntimeError("out of memory while writing the checkpoint of step " +
                         std::to_string(step_) + " (" + again.what_without_backtrace() +
                         "); the previous checkpoint is intact; give a larger --budget");
    }
  }
  notify([&](TrainObserver& o) { o.on_checkpoint(step_, summary_.last_checkpoint); });
}

// The checkpoint file (the oldest beyond opt.keep_checkpoints removed) and the exported model.
void TrainingRun::write_checkpoint(const CheckpointMeta& meta) {
  summary_.last_checkpoint = save_checkpoint(opt_.run_dir, meta, *model_, *optimizer_,
                                             scaler_->state(), opt_.keep_checkpoints);
  model_->export_to(opt_.run_dir);
}

// A lost rank stops the run; the parameters and optimizer state are still those of the last
// completed step, so the surviving writer saves them first.
void TrainingRun::save_after_lost(const LostRank& lost) {
  if (step_ <= summary_.first_step) return;
  if (shards_ > 1) {
    // The lost rank's optimizer shard is gone with it.
    if (rank_ == 0)
      spdlog::warn(
          "the optimizer states are split over the ranks: the last step's cannot be "
          "saved without the lost rank; --resume continues from the last checkpoint");
    return;
  }
  checkpoint(lost.rank0_lost ? 1 : 0);
}

// After the loop: the final evaluation (unless stopped) and checkpoint, then the summary.
RunSummary TrainingRun::finish() {
  ahead_.reset();
  const auto sync_start = std::chrono::steady_clock::now();
  synchronize(opt_.device);  // work still queued on an accelerator belongs to the training time
  train_seconds_ += seconds_since(sync_start);
  if (last_loss_.defined()) summary_.final_loss = last_loss_.item<double>();
  if (summary_.stop_signal == 0 && opt_.eval_sequences > 0) {
    summary_.val_loss = evaluate();
    notify([&](TrainObserver& o) { o.on_eval(step_, summary_.val_loss); });
  }
  if (step_ > summary_.first_step || summary_.stop_signal) checkpoint();
  summary_.plan = plan_;
  summary_.params_digest = digest(params_);
  if (comm_) {
    summary_.allreduce_s = comm_->allreduce_seconds() - allreduce_s0_;
    summary_.allreduce_calls = comm_->allreduce_calls() - allreduce_calls0_;
    summary_.broadcast_s = comm_->broadcast_seconds() - broadcast_s0_;
  }
  summary_.optimizer_state_bytes = optimizer_state_bytes(*optimizer_);
  summary_.steps_done = step_;
  summary_.tokens_per_s =
      train_seconds_ > 0 ? static_cast<double>(summary_.tokens) / train_seconds_ : 0;
  summary_.wall_s = seconds_since(wall_start_);
  notify([&](TrainObserver& o) { o.on_end(summary_); });
  return summary_;
}

}  // namespace

RunSummary train(Workload& workload, Plan plan, const TrainOptions& opt,
                 const std::vector<TrainObserver*>& observers) {
  TrainingRun run(workload, std::move(plan), opt, observers);
  return run.train();
}

}  // namespace autotune
