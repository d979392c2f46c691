#include "autotune/run_spec.h"

#include <ATen/DeviceAccelerator.h>

#include "autotune/errors.h"

namespace autotune {

std::string to_string(Mode m) {
  switch (m) {
    case Mode::auto_:
      return "auto";
    case Mode::normal:
      return "normal";
    case Mode::low:
      return "low";
    case Mode::ultra_low:
      return "ultra-low";
  }
  return "?";
}

std::optional<Mode> parse_mode(const std::string& s) {
  for (Mode m : {Mode::auto_, Mode::normal, Mode::low, Mode::ultra_low})
    if (s == to_string(m)) return m;
  return std::nullopt;
}

torch::Device resolve_device(const std::string& name) {
  if (name == "auto") {
    auto acc = at::accelerator::getAccelerator(false);
    if (acc && at::accelerator::deviceCount() > 0) return torch::Device(*acc, 0);
    return torch::kCPU;
  }
  torch::Device device = torch::kCPU;
  try {
    device = torch::Device(name);
  } catch (const c10::Error&) {
    throw UsageError("invalid --device '" + name + "': use auto, cpu or cuda[:N]");
  }
  if (device.is_cpu()) return device;
  auto acc = at::accelerator::getAccelerator(false);
  if (!acc || *acc != device.type() || at::accelerator::deviceCount() == 0)
    throw UsageError("--device " + name + ": no such device on this machine (this LibTorch sees " +
                     (acc ? c10::DeviceTypeName(*acc, true) + " x" +
                                std::to_string(at::accelerator::deviceCount())
                          : std::string("no accelerator")) +
                     "); use --device cpu or auto");
  if (device.has_index() && device.index() >= at::accelerator::deviceCount())
    throw UsageError("--device " + name + ": only " +
                     std::to_string(at::accelerator::deviceCount()) + " device(s) present");
  if (!device.has_index()) device = torch::Device(device.type(), 0);
  return device;
}

void check_splits_over_ranks(int64_t global_batch, int64_t ranks) {
  if (global_batch % ranks != 0)
    throw UsageError("--global-batch " + std::to_string(global_batch) + " does not split over " +
                     std::to_string(ranks) + " ranks; give a multiple of " + std::to_string(ranks));
}

void check_divides_batch(const std::string& flag, int64_t value, int64_t batch,
                         const std::string& batch_text) {
  if (batch % value != 0)
    throw UsageError(batch_text + " is not reachable with --" + flag + " " + std::to_string(value) +
                     ": it must divide the global batch " + std::to_string(batch) +
                     "; pick a divisor");
}

int64_t checked_global_batch(const RunSpec& spec, int64_t seq_len, int world) {
  const int64_t global_batch = resolve_global_batch(spec, seq_len);
  check_splits_over_ranks(global_batch, world);
  if (spec.shard_optimizer.value_or(false) && world == 1)
    throw UsageError(
        "--shard-optimizer on splits the optimizer states over ranks; add --nproc N (N > 1) "
        "or drop it");
  if (spec.micro_batch)
    check_divides_batch(
        "micro-batch", *spec.micro_batch, global_batch / world,
        "--global-batch " + std::to_string(global_batch) +
            (world > 1 ? " (" + std::to_string(global_batch / world) + " per rank)" : ""));
  return global_batch;
}

int64_t resolve_global_batch(const RunSpec& spec, int64_t seq_len) {
  if (spec.batch_tokens) {
    if (*spec.batch_tokens % seq_len != 0)
      throw UsageError("--batch-tokens " + std::to_string(*spec.batch_tokens) +
                       " is not a multiple of the sequence length " + std::to_string(seq_len) +
                       "; use a multiple or --global-batch");
    return *spec.batch_tokens / seq_len;
  }
  if (spec.global_batch) return *spec.global_batch;
  if (spec.micro_batch && spec.grad_accum) return *spec.micro_batch * *spec.grad_accum;
  return kDefaultGlobalBatch;
}

Plan plan_from_pins(const RunSpec& spec, int64_t seq_len, int64_t default_micro_batch) {
  Plan p;
  const int64_t global = resolve_global_batch(spec, seq_len);
  if (spec.micro_batch && spec.grad_accum) {
    p.micro_batch = *spec.micro_batch;
    p.grad_accum = *spec.grad_accum;
    if (p.global_batch() != global)
      throw UsageError("--micro-batch " + std::to_string(p.micro_batch) + " x --grad-accum " +
                       std::to_string(p.grad_accum) + " = " + std::to_string(p.global_batch()) +
                       " but --global-batch is " + std::to_string(global) +
                       "; drop one of the three flags");
  } else if (spec.micro_batch) {
    p.micro_batch = *spec.micro_batch;
    check_divides_batch("micro-batch", p.micro_batch, global,
                        "--global-batch " + std::to_string(global));
    p.grad_accum = global / p.micro_batch;
  } else if (spec.grad_accum) {
    p.grad_accum = *spec.grad_accum;
    check_divides_batch("grad-accum", p.grad_accum, global,
                        "--global-batch " + std::to_string(global));
    p.micro_batch = global / p.grad_accum;
  } else {
    // The largest divisor of the global batch not above the default.
    p.micro_batch = 1;
    for (int64_t d = std::min(global, default_micro_batch); d >= 1; --d)
      if (global % d == 0) {
        p.micro_batch = d;
        break;
      }
    p.grad_accum = global / p.micro_batch;
  }
  apply_pins(spec, p);
  return p;
}

}  // namespace autotune
