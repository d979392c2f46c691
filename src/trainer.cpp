#include "autotune/trainer.h"

#include <csignal>

#include <ATen/DeviceAccelerator.h>

#include <malloc.h>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <optional>

#include <spdlog/spdlog.h>

#include "autotune/checkpoint.h"
#include "autotune/cpu_allocator.h"
#include "autotune/distributed.h"
#include "autotune/errors.h"
#include "autotune/hash.h"
#include "autotune/optimizer.h"
#include "autotune/precision.h"

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

}  // namespace

RunSummary train(Workload& workload, Plan plan, const TrainOptions& opt,
                 const std::vector<TrainObserver*>& observers) {
  auto notify = [&](auto&& fn) {
    for (auto* o : observers) fn(*o);
  };
  auto wall_start = std::chrono::steady_clock::now();
  // Freed CPU blocks stay mapped for the next step's tensors of the same size (no page faults);
  // the cache is handed back when the run ends.
  cpu_alloc::CachingScope caching;
  const bool can_checkpoint = workload.knobs().checkpointing;

  Communicator* comm = opt.comm;
  const int world = comm ? comm->size() : 1, rank = comm ? comm->rank() : 0;
  // ZeRO-1 checkpoints: every rank's optimizer shard of the step is on disk.
  auto shards_complete = [&](const CheckpointMeta& meta) {
    for (int r = 1; r < meta.plan.optimizer_shards; ++r)
      if (!std::filesystem::exists(optimizer_shard_path(opt.run_dir, meta.step, r))) return false;
    return true;
  };

  // ---- resume: the checkpoint's plan wins (it may be a safer plan found by OOM recovery) ----
  std::string resume_from;
  int64_t resume_step = 0;  // the step resume_from holds (it names its shards' files)
  if (opt.resume) {
    if (opt.run_dir.empty()) throw UsageError("--resume needs --run-dir DIR of an earlier run");
    auto files = list_checkpoints(opt.run_dir);
    // The newest readable one; a damaged newest file falls back to the one before, saying so.
    for (auto it = files.rbegin(); it != files.rend() && resume_from.empty(); ++it) {
      std::string why;
      const auto meta = read_checkpoint_meta(*it, &why);
      if (!meta) {
        spdlog::warn("checkpoint {} is unreadable ({}); trying the one before", *it, why);
        continue;
      }
      {
        if (meta->workload != workload.config())
          throw UsageError("checkpoint " + *it + " belongs to a different model or data; " +
                           "use the same --model and --data, or a new --run-dir");
        if (meta->world_size != world)
          throw UsageError("checkpoint " + *it + " was written by " +
                           std::to_string(meta->world_size) + " rank(s), this run has " +
                           std::to_string(world) + "; resume it with --nproc " +
                           std::to_string(meta->world_size));
        if (!shards_complete(*meta)) {
          spdlog::warn("checkpoint {} lacks a rank's optimizer shard; trying the one before", *it);
          continue;
        }
        if (meta->plan.global_batch() != plan.global_batch())
          throw UsageError("checkpoint " + *it + " has global batch " +
                           std::to_string(meta->plan.global_batch()) + ", this run asks " +
                           std::to_string(plan.global_batch()) + "; use the same --global-batch");
        plan = meta->plan;
        resume_from = *it;
        resume_step = meta->step;
      }
    }
    if (resume_from.empty())
      throw UsageError("--resume: no complete checkpoint in " + checkpoint_dir(opt.run_dir) +
                       "; start without --resume");
  }
  workload.validate(plan);

  // ---- model, optimizer (AdamW, decay on matrices only), loss scaler ----
  auto model = workload.build(plan, opt.device, opt.seed);
  model->train();
  auto adamw = [&](double wd) {
    return torch::optim::AdamWOptions(opt.lr).betas({opt.beta1, opt.beta2}).weight_decay(wd);
  };
  const auto params = model->parameters();
  // ZeRO-1 (plan.optimizer_shards > 1): this rank's optimizer holds and updates only the
  // parameters of its shard; the owners broadcast them after each update. A probe trial without
  // the other ranks measures the heaviest shard's rank (the others' parameters stay unchanged).
  const int shards = static_cast<int>(plan.optimizer_shards);
  if (shards > 1 && comm && shards != world)
    throw UsageError("the plan splits the optimizer states over " + std::to_string(shards) +
                     " ranks but this run has " + std::to_string(world) + "; run it with --nproc " +
                     std::to_string(shards) + " or re-probe");
  std::vector<int> owners;
  int my_shard = rank;
  if (shards > 1) {
    owners = shard_owners(params, shards);
    if (!comm) my_shard = heaviest_shard(params, owners, shards);
  }
  auto in_my_shard = [&](std::vector<torch::Tensor> ps) {
    if (shards <= 1) return ps;
    std::vector<torch::Tensor> mine;
    for (const auto& p : ps)
      for (size_t i = 0; i < params.size(); ++i)
        if (params[i].is_same(p) && owners[i] == my_shard) mine.push_back(p);
    return mine;
  };
  std::vector<torch::optim::OptimizerParamGroup> groups;
  groups.emplace_back(in_my_shard(model->decay_parameters()),
                      std::make_unique<torch::optim::AdamWOptions>(adamw(opt.weight_decay)));
  groups.emplace_back(in_my_shard(model->no_decay_parameters()),
                      std::make_unique<torch::optim::AdamWOptions>(adamw(0.0)));
  FusedAdamW optimizer(std::move(groups), adamw(opt.weight_decay));
  LossScaler scaler(opt.device, plan.precision == Precision::fp16);

  RunSummary summary;
  int64_t step = 0;
  if (!resume_from.empty()) {
    torch::Tensor scaler_state;
    const std::string shard_file = shards > 1 && rank > 0
                                       ? optimizer_shard_path(opt.run_dir, resume_step, rank)
                                       : std::string();
    step =
        load_checkpoint(resume_from, *model, optimizer, &scaler_state, opt.device, shard_file).step;
    if (scaler.enabled() && scaler_state.numel() == 2) scaler.load_state(scaler_state);
  } else {
    torch::manual_seed(opt.seed);  // dropout masks are reproducible from the seed
  }
  if (comm) comm->broadcast(params);  // every rank starts from rank 0's parameters
  // Data parallel: the gradient all-reduces of a step start during its last backward (on an
  // accelerator) or right after it.
  std::unique_ptr<GradientReducer> reducer;
  if (comm)
    reducer = std::make_unique<GradientReducer>(*comm, params, overlap_allreduce(opt.device));
  const double allreduce_s0 = comm ? comm->allreduce_seconds() : 0;
  const int64_t allreduce_calls0 = comm ? comm->allreduce_calls() : 0;
  const double broadcast_s0 = comm ? comm->broadcast_seconds() : 0;
  summary.first_step = step;
  notify([&](TrainObserver& o) { o.on_start(plan, opt, step); });

  // Rank 0 writes the checkpoints (rank 1 when rank 0 was lost). With ZeRO-1 every other rank
  // first writes its optimizer shard, so the writer's file appears only when all shards exist.
  auto checkpoint = [&](int writer = 0) {
    if (opt.run_dir.empty()) return;
    if (shards > 1 && comm) {
      if (rank != writer) save_optimizer_shard(opt.run_dir, step, rank, optimizer);
      comm->barrier();
    }
    if (rank != writer) return;
    CheckpointMeta meta{step, plan, opt.seed, workload.config(), opt.device, world};
    auto save = [&] {
      summary.last_checkpoint = save_checkpoint(opt.run_dir, meta, *model, optimizer,
                                                scaler.state(), opt.keep_checkpoints);
      model->export_to(opt.run_dir);
    };
    // Writing copies a few buffers: an OOM there leaves the previous checkpoint intact (the
    // write is atomic) and is tried once more with the cache released.
    try {
      save();
    } catch (const c10::OutOfMemoryError& e) {
      spdlog::warn("the checkpoint of step {} ran out of memory ({}); writing it once more", step,
                   e.what_without_backtrace());
      release_cached_memory(opt.device);
      try {
        save();
      } catch (const c10::OutOfMemoryError& again) {
        throw RuntimeError("out of memory while writing the checkpoint of step " +
                           std::to_string(step) + " (" + again.what_without_backtrace() +
                           "); the previous checkpoint is intact; give a larger --budget");
      }
    }
    notify([&](TrainObserver& o) { o.on_checkpoint(step, summary.last_checkpoint); });
  };

  auto evaluate = [&]() -> double {
    model->eval();
    torch::NoGradGuard no_grad;
    int64_t eval_batch = plan.eval_batch_or_micro_batch();
    for (;;) {
      try {
        notify([&](TrainObserver& o) { o.on_phase_begin(Phase::eval); });
        AutocastScope autocast(opt.device, plan.precision);
        torch::Tensor sum = torch::zeros({}, torch::TensorOptions(opt.device));  // on the device
        for (int64_t first = 0; first < opt.eval_sequences; first += eval_batch) {
          int64_t n = std::min(eval_batch, opt.eval_sequences - first);
          sum +=
              model->loss(workload.val_batch(first, n, plan, opt.device)) * static_cast<double>(n);
        }
        const double mean = sum.item<double>() / static_cast<double>(opt.eval_sequences);
        notify([&](TrainObserver& o) { o.on_phase_end(Phase::eval, step); });
        model->train();
        return mean;
      } catch (const c10::OutOfMemoryError& e) {
        // An eval OOM lowers the eval batch only; the training plan is not touched.
        if (!opt.recover_oom || eval_batch == 1) throw;
        Recovery r{step, Phase::eval, plan, plan, true, e.what_without_backtrace()};
        eval_batch = std::max<int64_t>(1, eval_batch / 2);
        plan.eval_batch = eval_batch;
        r.after = plan;
        summary.recoveries.push_back(r);
        notify([&](TrainObserver& o) { o.on_recovery(r); });
      }
    }
  };

  // ---- the loop: one iteration is one optimizer step over the global batch ----
  // Nothing in a step reads a value back to the host (the loss and the gradient norm stay on the
  // device until an observer prints them), so an accelerator never waits for the host.
  double train_seconds = 0;
  const int64_t tokens_per_step = world * plan.global_batch() * workload.tokens_per_sequence(plan);
  // Micro-batch m of a step holds samples [m*mb, (m+1)*mb) of this rank's share of the global
  // batch, which starts at rank * mb * grad_accum: the samples of a step are the same whatever
  // the world size. The next one is fetched before the current one's backward, so its
  // host-to-device copy is queued behind compute instead of in front of it.
  auto fetch = [&](int64_t s, int64_t m) {
    return workload.train_batch(s, rank * plan.global_batch() + m * plan.micro_batch,
                                plan.micro_batch, plan, opt.device);
  };
  std::optional<Batch> ahead;  // the next micro-batch, fetched early
  torch::Tensor last_loss;
  // A lost rank stops the run; the parameters and optimizer state are still those of the last
  // completed step, so the surviving writer saves them first.
  auto save_after_lost = [&](const LostRank& lost) {
    if (step <= summary.first_step) return;
    if (shards > 1) {
      // The lost rank's optimizer shard is gone with it.
      if (rank == 0)
        spdlog::warn(
            "the optimizer states are split over the ranks: the last step's cannot be "
            "saved without the lost rank; --resume continues from the last checkpoint");
      return;
    }
    checkpoint(lost.rank0_lost ? 1 : 0);
  };
  while (step < opt.steps) {
    int stop = opt.stop_signal ? opt.stop_signal->load() : 0;
    try {
      if (comm && comm->any(stop != 0) && !stop) stop = SIGTERM;  // a signal to one stops all
    } catch (const LostRank& lost) {
      save_after_lost(lost);
      throw;
    }
    if (stop) {
      summary.stop_signal = stop;
      break;
    }
    notify([&](TrainObserver& o) { o.on_step_begin(step); });
    const double lr = learning_rate(opt, step);
    for (auto& group : optimizer.param_groups()) group.options().set_lr(lr);
    auto t0 = std::chrono::steady_clock::now();
    Phase phase = Phase::forward;
    bool agreed = false;  // data parallel: the ranks agreed this step has no OOM
    try {
      if (reducer) reducer->begin_step();
      model->zero_grad(/*set_to_none=*/true);  // every parameter's (not only this shard's)
      torch::Tensor loss_sum = torch::zeros({}, torch::TensorOptions(opt.device));  // [] fp32
      // (Fetching counts as the forward: a prefetch that ran out of memory surfaces here.)
      Batch batch = ahead ? std::move(*ahead) : fetch(step, 0);
      ahead.reset();
      for (int64_t m = 0; m < plan.grad_accum; ++m) {
        phase = Phase::forward;
        notify([&](TrainObserver& o) { o.on_phase_begin(phase); });
        torch::Tensor loss;
        {
          AutocastScope autocast(opt.device, plan.precision);
          loss = model->loss(batch);
        }
        // Each micro-batch's mean loss weighs 1/grad_accum: gradients equal one big batch's.
        loss = loss / static_cast<double>(plan.grad_accum);
        notify([&](TrainObserver& o) { o.on_phase_end(phase, step); });
        if (opt.release_between_phases) release_cached_memory(opt.device);
        phase = Phase::backward;
        notify([&](TrainObserver& o) { o.on_phase_begin(phase); });
        if (m + 1 < plan.grad_accum)
          ahead = fetch(step, m + 1);
        else if (step + 1 < opt.steps)
          ahead = fetch(step + 1, 0);
        if (reducer && m + 1 == plan.grad_accum) reducer->arm();  // its gradients are final
        scaler.scale_loss(loss).backward();
        loss_sum += world > 1 ? loss.detach() / static_cast<double>(world) : loss.detach();
        notify([&](TrainObserver& o) { o.on_phase_end(phase, step); });
        if (opt.release_between_phases) release_cached_memory(opt.device);
        if (m + 1 < plan.grad_accum) {
          batch = std::move(*ahead);
          ahead.reset();
        }
      }
      phase = Phase::optimizer;
      notify([&](TrainObserver& o) { o.on_phase_begin(phase); });
      optimizer.create_states();
      if (comm) reducer->finish();  // the averaged gradients, from the all-reduces backward started
      // Everything that allocates comes before anything that outlives the step changes
      // (parameters, optimizer states, the loss scale): an OOM up to here re-runs the step.
      // Unscaling and clipping change only the gradients, which a re-run makes again.
      // fp16 only: whether any gradient overflowed is read back (one sync per step, as
      // torch.amp.GradScaler does); bf16 and fp32 never skip a step.
      const bool finite = scaler.unscale_and_check(params);
      torch::Tensor grad_norm;
      FusedAdamW::Update update;
      if (finite) {
        if (opt.grad_clip > 0) grad_norm = clip_grad_norm(params, opt.grad_clip);
        update = optimizer.prepare();
      }
      if (comm) {
        // Before any rank changes its parameters, all agree that every forward and backward
        // ran: an OOM on one rank is recovered on all, with the same plan, so none diverges.
        if (comm->any(false)) throw PeerOutOfMemory();
        agreed = true;
        comm->sum_in_place(loss_sum);  // each rank's share was divided by the world size
      }
      scaler.update();
      if (finite) {
        optimizer.apply(update);
        if (comm && shards > 1) comm->broadcast_shards(params, owners);
      }
      notify([&](TrainObserver& o) { o.on_phase_end(phase, step); });
      if (opt.synchronize_steps) synchronize(opt.device);
      ++step;

      const double dt =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      train_seconds += dt;
      summary.tokens += tokens_per_step;
      last_loss = loss_sum;
      StepStats s{step,
                  opt.steps,
                  loss_sum,
                  grad_norm,
                  lr,
                  dt * 1e3,
                  static_cast<double>(tokens_per_step) / dt,
                  !finite,
                  plan};
      notify([&](TrainObserver& o) { o.on_step(s); });
    } catch (const std::exception& e) {
      if (const auto* lost = dynamic_cast<const LostRank*>(&e)) {
        save_after_lost(*lost);
        throw;
      }
      const auto* oom = dynamic_cast<const c10::OutOfMemoryError*>(&e);
      const bool peer = dynamic_cast<const PeerOutOfMemory*>(&e) != nullptr;
      if (!oom && !peer) throw;
      if (comm && agreed)
        throw RuntimeError("rank " + std::to_string(rank) + " ran out of memory at step " +
                           std::to_string(step + 1) +
                           " after the ranks agreed on it (gradient all-reduce or optimizer); "
                           "give a larger --budget");
      // Drop the partial gradients, release memory, step down the ladder and re-run this same
      // step on the same samples: no step and no sample is lost.
      ahead.reset();
      model->zero_grad(/*set_to_none=*/true);
      release_cached_memory(opt.device);
      if (oom && comm) {
        // The other ranks run all of this step's all-reduces and then wait in the agreement.
        try {
          reducer->abandon();
        } catch (const c10::OutOfMemoryError&) {
          throw RuntimeError("rank " + std::to_string(rank) + " ran out of memory at step " +
                             std::to_string(step + 1) +
                             " and again while finishing the gradient all-reduce with the other "
                             "ranks; give a larger --budget");
        }
        comm->any(true);
      }
      if (!opt.recover_oom) throw;  // probe trials: the caller records the OOM by its type
      Plan next;
      if (!next_plan_after_oom(plan, can_checkpoint, opt.allow_precision_change, &next,
                               opt.low_precision))
        throw RuntimeError("out of memory at step " + std::to_string(step + 1) + " (" +
                           to_string(phase) + ") with plan " + plan.describe() +
                           " and nothing left to step down to; give a larger budget or a "
                           "smaller model");
      Recovery r{step, phase, plan, next, false, oom ? oom->what_without_backtrace() : e.what()};
      plan = next;
      model->set_checkpointing(plan.checkpointing);
      if (plan.precision == Precision::fp16 && !scaler.enabled())
        scaler = LossScaler(opt.device, true);  // fp16 needs its loss scaling from here on
      summary.recoveries.push_back(r);
      notify([&](TrainObserver& o) { o.on_recovery(r); });
      continue;
    }

    const bool last = step == opt.steps;
    if (opt.eval_every > 0 && step % opt.eval_every == 0 && !last) {
      double v = evaluate();
      notify([&](TrainObserver& o) { o.on_eval(step, v); });
    }
    if (opt.checkpoint_every > 0 && step % opt.checkpoint_every == 0 && !last) checkpoint();
  }

  ahead.reset();
  const auto sync_start = std::chrono::steady_clock::now();
  synchronize(opt.device);  // work still queued on an accelerator belongs to the training time
  train_seconds +=
      std::chrono::duration<double>(std::chrono::steady_clock::now() - sync_start).count();
  if (last_loss.defined()) summary.final_loss = last_loss.item<double>();
  if (summary.stop_signal == 0 && opt.eval_sequences > 0) {
    summary.val_loss = evaluate();
    notify([&](TrainObserver& o) { o.on_eval(step, summary.val_loss); });
  }
  if (step > summary.first_step || summary.stop_signal) checkpoint();
  summary.plan = plan;
  summary.params_digest = digest(params);
  if (comm) {
    summary.allreduce_s = comm->allreduce_seconds() - allreduce_s0;
    summary.allreduce_calls = comm->allreduce_calls() - allreduce_calls0;
    summary.broadcast_s = comm->broadcast_seconds() - broadcast_s0;
  }
  summary.optimizer_state_bytes = optimizer_state_bytes(optimizer);
  summary.steps_done = step;
  summary.tokens_per_s =
      train_seconds > 0 ? static_cast<double>(summary.tokens) / train_seconds : 0;
  summary.wall_s =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - wall_start).count();
  notify([&](TrainObserver& o) { o.on_end(summary); });
  return summary;
}

}  // namespace autotune
