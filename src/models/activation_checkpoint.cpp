#include "autotune/activation_checkpoint.h"

#include <ATen/autocast_mode.h>

#include "models/precision.h"

namespace autotune {

namespace {
struct CheckpointFunction : public torch::autograd::Function<CheckpointFunction> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, torch::Tensor x,
                               RecomputableBlock* block) {
    auto gen = at::globalContext().defaultGenerator(x.device());
    ctx->saved_data["rng"] = gen.get_state();
    ctx->saved_data["block"] = reinterpret_cast<int64_t>(block);
    const auto type = x.device().type();
    ctx->saved_data["autocast"] = at::autocast::is_autocast_enabled(type);
    ctx->saved_data["autocast_dtype"] =
        static_cast<int64_t>(at::autocast::get_autocast_dtype(type));
    ctx->save_for_backward({x});
    torch::NoGradGuard no_grad;
    return block->forward(x);
  }

  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx,
                                               torch::autograd::tensor_list grad_out) {
    auto x = ctx->get_saved_variables()[0].detach().requires_grad_(true);
    auto* block = reinterpret_cast<RecomputableBlock*>(ctx->saved_data["block"].toInt());
    auto gen = at::globalContext().defaultGenerator(x.device());
    torch::Tensor outer_rng = gen.get_state();
    gen.set_state(ctx->saved_data["rng"].toTensor());
    torch::Tensor y;
    std::optional<std::vector<torch::Tensor>> before;
    {
      torch::AutoGradMode grad_on(true);
      AutocastScope autocast(
          x.device().type(), ctx->saved_data["autocast"].toBool(),
          static_cast<c10::ScalarType>(ctx->saved_data["autocast_dtype"].toInt()));
      before = block->forward_before_last(x);
      if (!before) y = block->forward(x);
    }
    gen.set_state(outer_rng);
    if (before)
      torch::autograd::backward(*before, block->last_backward(*before, grad_out[0]));
    else
      torch::autograd::backward({y}, {grad_out[0]});
    return {x.grad(), torch::Tensor()};
  }
};
}  // namespace

torch::Tensor checkpointed(RecomputableBlock& block, const torch::Tensor& x) {
  if (!torch::GradMode::is_enabled()) return block.forward(x);
  return CheckpointFunction::apply(x, &block);
}

}  // namespace autotune
