// Activation checkpointing, for any model made of blocks: the forward keeps only each block's
// input; backward recomputes the block with the forward's RNG and autocast state (so dropout
// masks and dtypes match) and back-propagates through the recomputed graph. Parameter gradients
// accumulate into .grad by the inner backward, as in PyTorch's reentrant checkpoint. The GPT's
// blocks and a TorchScript model's `blocks` both go through this one function.
#pragma once
#include <optional>
#include <vector>

#include <torch/torch.h>

namespace autotune {

class RecomputableBlock {
 public:
  virtual ~RecomputableBlock() = default;
  virtual torch::Tensor forward(const torch::Tensor& x) = 0;

  // Early stop (optional): a block whose last operation's backward reads only that operation's
  // inputs (a linear layer: its input and weight, not its output) can stop the recomputation
  // before it. forward_before_last returns those inputs' tensors (in the recomputed graph), or
  // nullopt where the block cannot stop early (then it is recomputed whole).
  virtual std::optional<std::vector<torch::Tensor>> forward_before_last(const torch::Tensor& x) {
    return std::nullopt;
  }
  // The last operation's backward, for the upstream gradient of the block's output: adds to its
  // parameters' gradients and returns the gradients of forward_before_last's tensors.
  virtual std::vector<torch::Tensor> last_backward(const std::vector<torch::Tensor>& before,
                                                   const torch::Tensor& grad_out) {
    return {};
  }
};

// block(x), recomputed in backward. Outside grad mode (evaluation) it is plain block.forward(x).
// `block` must outlive the backward of the graph this builds.
torch::Tensor checkpointed(RecomputableBlock& block, const torch::Tensor& x);

}  // namespace autotune
