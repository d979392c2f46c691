#include "autotune/optimizer.h"

#include <algorithm>
#include <memory>
#include <numeric>
#include <tuple>

namespace autotune {

void FusedAdamW::create_states() {
  auto& state = this->state();
  std::vector<void*> created;
  try {
    for (auto& group : param_groups())
      for (auto& p : group.params()) {
        void* key = p.unsafeGetTensorImpl();
        if (!p.grad().defined() || state.count(key)) continue;
        auto s = std::make_unique<torch::optim::AdamWParamState>();
        s->step(0);
        s->exp_avg(torch::zeros_like(p, torch::MemoryFormat::Preserve));
        s->exp_avg_sq(torch::zeros_like(p, torch::MemoryFormat::Preserve));
        state[key] = std::move(s);
        created.push_back(key);
      }
  } catch (...) {
    for (void* key : created) state.erase(key);
    throw;
  }
}

torch::Tensor FusedAdamW::step(LossClosure closure) {
  TORCH_CHECK(!closure, "FusedAdamW::step takes no closure");
  torch::NoGradGuard no_grad;
  create_states();
  for (auto& group : param_groups()) {
    const auto& o = static_cast<const torch::optim::AdamWOptions&>(group.options());
    TORCH_CHECK(!o.amsgrad(), "FusedAdamW does not implement amsgrad");
    std::vector<torch::Tensor> params, grads, exp_avgs, exp_avg_sqs, steps;
    for (auto& p : group.params()) {
      if (!p.grad().defined()) continue;
      void* key = p.unsafeGetTensorImpl();
      auto& s = static_cast<torch::optim::AdamWParamState&>(*state().at(key));
      auto it = step_tensors_.find(key);
      if (it == step_tensors_.end())
        it = step_tensors_
                 .emplace(key, torch::full({}, static_cast<double>(s.step()),
                                           p.options().dtype(torch::kFloat32)))
                 .first;
      s.step(s.step() + 1);
      params.push_back(p);
      grads.push_back(p.grad());
      exp_avgs.push_back(s.exp_avg());
      exp_avg_sqs.push_back(s.exp_avg_sq());
      steps.push_back(it->second);
    }
    if (params.empty()) continue;
    // The kernel reads the step count after the increment (bias correction 1 - beta^step), as
    // torch.optim.AdamW(fused=True) does.
    at::_foreach_add_(steps, 1.0);
    at::_fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, /*max_exp_avg_sqs=*/{}, steps, o.lr(),
                      std::get<0>(o.betas()), std::get<1>(o.betas()), o.weight_decay(), o.eps(),
                      /*amsgrad=*/false, /*maximize=*/false);
  }
  return {};
}

void FusedAdamW::load(torch::serialize::InputArchive& archive) {
  torch::optim::AdamW::load(archive);
  step_tensors_.clear();  // re-made from the loaded states' step counts at the next step
}

torch::Tensor clip_grad_norm(const std::vector<torch::Tensor>& params, double max_norm) {
  std::vector<torch::Tensor> grads;
  for (const auto& p : params)
    if (p.grad().defined()) grads.push_back(p.grad());
  if (grads.empty()) return {};
  torch::NoGradGuard no_grad;
  const auto norms = at::_foreach_norm(grads, 2);
  torch::Tensor total = at::linalg_vector_norm(at::stack(norms), 2);
  const torch::Tensor coef = (max_norm / (total + 1e-6)).clamp_max(1.0);
  at::_foreach_mul_(grads, coef);
  return total;
}

std::vector<int> shard_owners(const std::vector<torch::Tensor>& params, int shards) {
  std::vector<size_t> order(params.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](size_t a, size_t b) { return params[a].numel() > params[b].numel(); });
  std::vector<int64_t> held(static_cast<size_t>(shards), 0);
  std::vector<int> owners(params.size(), 0);
  for (size_t i : order) {
    const int r = static_cast<int>(std::min_element(held.begin(), held.end()) - held.begin());
    owners[i] = r;
    held[static_cast<size_t>(r)] += params[i].numel();
  }
  return owners;
}

int heaviest_shard(const std::vector<torch::Tensor>& params, const std::vector<int>& owners,
                   int shards) {
  std::vector<int64_t> held(static_cast<size_t>(shards), 0);
  for (size_t i = 0; i < params.size(); ++i)
    held[static_cast<size_t>(owners[i])] += params[i].numel();
  return static_cast<int>(std::max_element(held.begin(), held.end()) - held.begin());
}

int64_t optimizer_state_bytes(torch::optim::Optimizer& optimizer) {
  int64_t bytes = 0;
  for (const auto& [key, state] : optimizer.state()) {
    const auto* s = dynamic_cast<const torch::optim::AdamWParamState*>(state.get());
    if (!s) continue;
    for (const auto& t : {s->exp_avg(), s->exp_avg_sq()})
      if (t.defined()) bytes += static_cast<int64_t>(t.nbytes());
  }
  return bytes;
}

}  // namespace autotune
