#include "models/precision.h"

#include <ATen/autocast_mode.h>

#include <atomic>
#include <cstdlib>

namespace autotune {

#ifdef AUTOTUNE_WITH_CUDA
namespace detail {
bool cuda_bf16_fast(c10::DeviceIndex index);  // src/memory/cuda_memory.cpp
}
#endif

Precision low_precision_for(torch::Device device) {
  if (const char* fake = std::getenv("AUTOTUNE_FAKE_LOW_PRECISION"); fake && *fake)
    return parse_precision(fake);
#ifdef AUTOTUNE_WITH_CUDA
  if (device.is_cuda() && torch::cuda::is_available())
    return detail::cuda_bf16_fast(device.has_index() ? device.index() : 0) ? Precision::bf16
                                                                           : Precision::fp16;
#endif
  return Precision::bf16;
}

namespace {
c10::ScalarType dtype_of(Precision p) {
  return p == Precision::bf16 ? c10::ScalarType::BFloat16 : c10::ScalarType::Half;
}
}  // namespace

AutocastScope::AutocastScope(torch::Device device, Precision precision) : type_(device.type()) {
  enter(precision != Precision::fp32, dtype_of(precision));
}

AutocastScope::AutocastScope(c10::DeviceType type, bool enabled, c10::ScalarType dtype)
    : type_(type) {
  enter(enabled, dtype);
}

namespace {
std::atomic<int64_t> g_autocast_regions{0};
}

int64_t autocast_regions_entered() {
  return g_autocast_regions.load();
}

void AutocastScope::enter(bool enabled, c10::ScalarType dtype) {
  if (!enabled) return;
  active_ = true;
  g_autocast_regions.fetch_add(1, std::memory_order_relaxed);
  prev_enabled_ = at::autocast::is_autocast_enabled(type_);
  prev_dtype_ = at::autocast::get_autocast_dtype(type_);
  at::autocast::set_autocast_enabled(type_, true);
  at::autocast::set_autocast_dtype(type_, dtype);
  at::autocast::increment_nesting();
}

AutocastScope::~AutocastScope() {
  if (!active_) return;
  // The weight-cast cache lives until the outermost scope closes, like torch.autocast.
  if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
  at::autocast::set_autocast_enabled(type_, prev_enabled_);
  at::autocast::set_autocast_dtype(type_, prev_dtype_);
}

LossScaler::LossScaler(torch::Device device, bool enabled, double init_scale) : enabled_(enabled) {
  auto f = torch::TensorOptions().device(device);
  scale_ = torch::full({1}, init_scale, f.dtype(torch::kFloat32));
  growth_tracker_ = torch::zeros({1}, f.dtype(torch::kInt32));
}

torch::Tensor LossScaler::scale_loss(const torch::Tensor& loss) const {
  return enabled_ ? loss * scale_ : loss;
}

bool LossScaler::unscale_and_check(const std::vector<torch::Tensor>& params) {
  if (!enabled_) return true;
  std::vector<torch::Tensor> grads;
  for (const auto& p : params)
    if (p.grad().defined()) grads.push_back(p.grad());
  found_inf_ = torch::zeros({1}, scale_.options());
  auto inv_scale = scale_.reciprocal();
  at::_amp_foreach_non_finite_check_and_unscale_(grads, found_inf_, inv_scale);
  return found_inf_.item<float>() == 0.0f;
}

void LossScaler::update() {
  if (!enabled_ || !found_inf_.defined()) return;
  at::_amp_update_scale_(scale_, growth_tracker_, found_inf_, 2.0, 0.5, 2000);
  found_inf_ = torch::Tensor();
}

double LossScaler::scale() const {
  return enabled_ ? scale_.item<double>() : 1.0;
}

torch::Tensor LossScaler::state() const {
  return torch::stack({scale_.cpu().to(torch::kFloat64).squeeze(),
                       growth_tracker_.cpu().to(torch::kFloat64).squeeze()});
}

void LossScaler::load_state(const torch::Tensor& s) {
  scale_.fill_(s[0].item<double>());
  growth_tracker_.fill_(s[1].item<int64_t>());
}

}  // namespace autotune
