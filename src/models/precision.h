// Mixed precision, device-generic: an autocast scope and the dynamic loss scaler that fp16 needs
// (LibTorch has no GradScaler; this is its algorithm on the same ATen kernels).
#pragma once
#include <vector>

#include <torch/torch.h>

#include "autotune/plan.h"

namespace autotune {

// The low precision that is fast on `device`: bf16 on CPUs (AVX-512-BF16/AMX run it faster than
// fp32; plain AVX2 slower, which the tuner measures) and on GPUs of compute capability >= 8.0;
// fp16, with dynamic loss scaling, on older GPUs, where bf16 is emulated or missing.
// AUTOTUNE_FAKE_LOW_PRECISION=fp16|bf16 substitutes the answer (a testing aid, like
// AUTOTUNE_FAKE_MEM_TOTAL).
Precision low_precision_for(torch::Device device);

// Low-precision regions (enabled AutocastScopes) this process has entered: every forward of a
// bf16/fp16 plan, its evaluation and its recomputation. A run of an fp32 plan enters none, nor
// should anything before it (reported in --json as process.autocast_regions).
int64_t autocast_regions_entered();

// Enables autocast for `device`'s type with the plan's dtype for the life of the scope
// (fp32: does nothing). Restores the previous state and clears the cast cache on exit.
class AutocastScope {
 public:
  AutocastScope(torch::Device device, Precision precision);
  // Re-enters a recorded state (used by checkpoint recomputation in backward).
  AutocastScope(c10::DeviceType type, bool enabled, c10::ScalarType dtype);
  ~AutocastScope();
  AutocastScope(const AutocastScope&) = delete;
  AutocastScope& operator=(const AutocastScope&) = delete;

 private:
  void enter(bool enabled, c10::ScalarType dtype);
  c10::DeviceType type_;
  bool prev_enabled_ = false;
  c10::ScalarType prev_dtype_ = c10::ScalarType::Float;
  bool active_ = false;
};

// Dynamic loss scaling (fp16): multiply the loss by scale(), then unscale_and_check() the
// gradients before clipping; step only when it returns true; update() the scale once the step is
// certain (after the ranks agreed on it: an OOM before that re-runs the step with the scale
// unchanged). Growth x2 every 2000 finite steps, backoff x0.5 on inf/nan.
class LossScaler {
 public:
  LossScaler(torch::Device device, bool enabled, double init_scale = 65536.0);
  bool enabled() const { return enabled_; }
  torch::Tensor scale_loss(const torch::Tensor& loss) const;
  // Unscales grads in place; returns false when any was inf/nan (update() then backs off).
  bool unscale_and_check(const std::vector<torch::Tensor>& params);
  // Grows or backs off the scale by the last unscale_and_check's finding; nothing allocated.
  void update();
  double scale() const;
  torch::Tensor state() const;  // [scale, growth_tracker] for checkpoints
  void load_state(const torch::Tensor& s);

 private:
  bool enabled_;
  torch::Tensor scale_;           // [1] float32 on device
  torch::Tensor growth_tracker_;  // [1] int32 on device
  torch::Tensor found_inf_;       // [1] float32 on device, from the last unscale_and_check
};

}  // namespace autotune
