// The built-in GPT language model (nanoGPT's shape): token + position embeddings, pre-LayerNorm
// blocks with causal self-attention (scaled_dot_product_attention, is_causal) and a GELU MLP,
// final LayerNorm, and an output head tied to the token embedding.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include <torch/torch.h>
#include <nlohmann/json.hpp>

#include "autotune/activation_checkpoint.h"
#include "autotune/workload.h"

namespace autotune {

struct GptConfig {
  std::string name = "custom";
  int64_t n_layer = 4;
  int64_t n_head = 4;
  int64_t d_model = 128;
  int64_t seq_len = 128;  // context length (block size)
  int64_t vocab_size = 256;
  double dropout = 0.0;

  // Throws UsageError naming the field and the fix (n_head must divide d_model, sizes positive,
  // nothing so large that byte counts overflow).
  void validate() const;
  int64_t n_params() const;  // with the tied head counted once
  nlohmann::json to_json() const;
};

// Presets: gpt-tiny (~0.1M params), gpt-mini (~0.8M), gpt-10m (~10.7M), gpt2-small (124M, vocab
// padded to 50304 as usual).
std::vector<std::string> gpt_preset_names();
// A preset name or a path to a JSON file with keys n_layer, n_head, d_model, seq_len, vocab_size,
// dropout. Unknown keys and wrong types are refused (UsageError).
GptConfig load_gpt_config(const std::string& preset_or_file);
GptConfig gpt_config_from_json(const nlohmann::json& j, const std::string& origin);

class BlockImpl : public torch::nn::Module, public RecomputableBlock {
 public:
  BlockImpl(int64_t d_model, int64_t n_head, double dropout);
  torch::Tensor forward(const torch::Tensor& x) override;  // [B, T, C] -> [B, T, C]
  // Without dropout the recomputation stops before the MLP's output projection (one of the
  // block's four matmuls), which is what torch.utils.checkpoint's early stop gives Python: returns
  // {x2, h}, the residual after attention [B, T, C] and the MLP hidden gelu(fc(ln2(x2)))
  // [B, T, 4C], with forward = x2 + mlp_proj(h). With dropout its mask needs the projection's
  // output, so the block is recomputed whole (nullopt).
  std::optional<std::vector<torch::Tensor>> forward_before_last(const torch::Tensor& x) override;
  // Gradients of x2 + mlp_proj(h) without its forward, with the ATen ops autograd runs for it (in
  // h's dtype, as under autocast), so they are identical: {g, dL/dh}; mlp_proj's weight and bias
  // gradients accumulate as AccumulateGrad does.
  std::vector<torch::Tensor> last_backward(const std::vector<torch::Tensor>& before,
                                           const torch::Tensor& g) override;

 private:
  // The residual after attention and the MLP hidden (see forward_before_last).
  std::pair<torch::Tensor, torch::Tensor> attention_and_mlp_hidden(torch::Tensor x);
  int64_t n_head_;
  double dropout_;
  torch::nn::LayerNorm ln1_{nullptr}, ln2_{nullptr};
  torch::nn::Linear qkv_{nullptr}, attn_proj_{nullptr}, fc_{nullptr}, mlp_proj_{nullptr};
  torch::nn::Dropout resid_drop_{nullptr};
};
TORCH_MODULE(Block);

class GptModel : public TrainableModel {
 public:
  // Built for one plan: plan.seq_len and plan.d_model (when non-zero) override the config.
  GptModel(const GptConfig& cfg, bool checkpointing);
  torch::Tensor forward(const torch::Tensor& idx);  // [B, T] int64 -> logits [B, T, vocab]
  torch::Tensor loss(const Batch& batch) override;
  void set_checkpointing(bool on) override { checkpointing_ = on; }
  bool checkpointing() const { return checkpointing_; }
  const GptConfig& config() const { return cfg_; }

 private:
  GptConfig cfg_;
  bool checkpointing_;
  torch::nn::Embedding wte_{nullptr}, wpe_{nullptr};
  torch::nn::Dropout drop_{nullptr};
  std::vector<Block> blocks_;
  torch::nn::LayerNorm ln_f_{nullptr};
};

}  // namespace autotune
