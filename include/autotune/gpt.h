// The built-in GPT language model (nanoGPT's shape): token + position embeddings, pre-LayerNorm
// blocks with causal self-attention (scaled_dot_product_attention, is_causal) and a GELU MLP,
// final LayerNorm, and an output head tied to the token embedding.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include <torch/torch.h>
#include <nlohmann/json.hpp>

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

class BlockImpl : public torch::nn::Module {
 public:
  BlockImpl(int64_t d_model, int64_t n_head, double dropout);
  torch::Tensor forward(torch::Tensor x);  // [B, T, C] -> [B, T, C]
  // All of forward but the MLP's output projection: the residual after attention x2 [B, T, C]
  // and the MLP hidden h = gelu(fc(ln2(x2))) [B, T, 4C]; forward = x2 + drop(mlp_proj(h)).
  std::pair<torch::Tensor, torch::Tensor> forward_to_mlp_hidden(torch::Tensor x);
  // Gradients of out = x2 + mlp_proj(h) for the upstream gradient g [B, T, C], without its
  // forward: adds to mlp_proj's weight and bias gradients and returns dL/dh. The same ATen ops
  // autograd runs for it (in h's dtype, as under autocast), so the results are identical.
  torch::Tensor mlp_proj_backward(const torch::Tensor& h, const torch::Tensor& g);
  double dropout() const { return dropout_; }

 private:
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
