#include "train/optimizer.h"

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

FusedAdamW::Update FusedAdamW::prepare() {
  torch::NoGradGuard no_grad;
  create_states();
  Update update;
  for (auto& group : param_groups()) {
    Update::Group g;
    g.options = &static_cast<const torch::optim::AdamWOptions&>(group.options());
    TORCH_CHECK(!g.options->amsgrad(), "FusedAdamW does not implement amsgrad");
    for (auto& p : group.params()) {
      if (!p.grad().defined()) continue;
      auto& s = static_cast<torch::optim::AdamWParamState&>(*state().at(p.unsafeGetTensorImpl()));
      g.params.push_back(p);
      g.grads.push_back(p.grad());
      g.exp_avgs.push_back(s.exp_avg());
      g.exp_avg_sqs.push_back(s.exp_avg_sq());
      g.states.push_back(&s);
    }
    if (g.params.empty()) continue;
    // The kernel reads each step count after the increment (bias correction 1 - beta^step), as
    // torch.optim.AdamW(fused=True) does, from float scalars on the parameters' device: views of
    // one tensor, so one allocation (and one copy to an accelerator) per group and step.
    std::vector<float> counts;
    for (auto* s : g.states) counts.push_back(static_cast<float>(s->step() + 1));
    const torch::Tensor all = torch::tensor(counts).to(g.params[0].device());
    for (int64_t i = 0; i < all.size(0); ++i) g.steps.push_back(all[i]);
    update.groups.push_back(std::move(g));
  }
  return update;
}

void FusedAdamW::apply(Update& update) {
  torch::NoGradGuard no_grad;
  for (auto& g : update.groups) {
    const auto& o = *g.options;
    at::_fused_adamw_(g.params, g.grads, g.exp_avgs, g.exp_avg_sqs, /*max_exp_avg_sqs=*/{}, g.steps,
                      o.lr(), std::get<0>(o.betas()), std::get<1>(o.betas()), o.weight_decay(),
                      o.eps(), /*amsgrad=*/false, /*maximize=*/false);
    for (auto* s : g.states) s->step(s->step() + 1);
  }
}

torch::Tensor FusedAdamW::step(LossClosure closure) {
  TORCH_CHECK(!closure, "FusedAdamW::step takes no closure");
  Update update = prepare();
  apply(update);
  return {};
}

void FusedAdamW::load(torch::serialize::InputArchive& archive) {
  torch::optim::AdamW::load(archive);
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
