// The optimizer step of the trainer: AdamW through LibTorch's fused kernel (one pass over each
// parameter's weights, gradient and both moments, where torch::optim::AdamW runs eight tensor
// ops per parameter), and gradient clipping on the foreach kernels. Neither reads a value back
// to the host, so an accelerator is never stalled inside a step.
#pragma once
#include <unordered_map>
#include <vector>

#include <torch/torch.h>

namespace autotune {

// torch::optim::AdamW whose step() runs at::_fused_adamw_ per parameter group. The states are
// torch::optim::AdamWParamState, so checkpoints save and load exactly as AdamW's.
class FusedAdamW : public torch::optim::AdamW {
 public:
  using torch::optim::AdamW::AdamW;

  // exp_avg and exp_avg_sq of every parameter with a gradient, created all or none: an OOM while
  // they are allocated leaves no state half-made and the step can be re-run exactly.
  void create_states();
  // One AdamW update in two halves. prepare() makes everything the update needs (missing states,
  // the step counts the kernel reads) and changes nothing, so an OOM in it leaves the step
  // re-runnable; apply() then updates the parameters, states and counts in place without
  // allocating. step() is both.
  struct Update {
    struct Group {
      std::vector<torch::Tensor> params, grads, exp_avgs, exp_avg_sqs, steps;
      std::vector<torch::optim::AdamWParamState*> states;
      const torch::optim::AdamWOptions* options = nullptr;
    };
    std::vector<Group> groups;
  };
  Update prepare();
  void apply(Update& update);
  torch::Tensor step(LossClosure closure = nullptr) override;
  void load(torch::serialize::InputArchive& archive) override;
};

// Scales the gradients of `params` so their global L2 norm is at most max_norm (as
// torch.nn.utils.clip_grad_norm_ with foreach=True) and returns that norm before clipping, as a
// scalar tensor on the gradients' device. Undefined when no parameter has a gradient.
torch::Tensor clip_grad_norm(const std::vector<torch::Tensor>& params, double max_norm);

// ZeRO stage 1: which of `shards` ranks keeps the AdamW states of each parameter (and updates
// it). Whole tensors, largest first, each to the rank with the fewest elements so far (as
// torch.distributed.optim.ZeroRedundancyOptimizer): every rank computes the same split.
std::vector<int> shard_owners(const std::vector<torch::Tensor>& params, int shards);
// The rank whose shard holds the most elements: a probe trial measures that rank's memory.
int heaviest_shard(const std::vector<torch::Tensor>& params, const std::vector<int>& owners,
                   int shards);
// Bytes of the optimizer's AdamW states (exp_avg + exp_avg_sq) that exist now.
int64_t optimizer_state_bytes(torch::optim::Optimizer& optimizer);

}  // namespace autotune
