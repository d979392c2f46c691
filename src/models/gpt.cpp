#include "autotune/gpt.h"

#include <ATen/ExpandUtils.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <set>

#include "autotune/errors.h"
#include "models/precision.h"

namespace autotune {

// ---- config ------------------------------------------------------------------------------------

void GptConfig::validate() const {
  auto need = [&](bool ok, const std::string& what) {
    if (!ok) throw UsageError("model '" + name + "': " + what);
  };
  need(n_layer >= 1 && n_layer <= 1024, "n_layer must be in [1, 1024]");
  need(n_head >= 1 && n_head <= 1024, "n_head must be in [1, 1024]");
  need(d_model >= 1 && d_model <= 65536, "d_model must be in [1, 65536]");
  need(d_model % n_head == 0, "n_head (" + std::to_string(n_head) + ") must divide d_model (" +
                                  std::to_string(d_model) +
                                  "); set d_model to a multiple of n_head");
  need(seq_len >= 1 && seq_len <= 1048576, "seq_len must be in [1, 1048576]");
  need(vocab_size >= 2 && vocab_size <= 1048576, "vocab_size must be in [2, 1048576]");
  need(dropout >= 0.0 && dropout < 1.0, "dropout must be in [0, 1)");
  // 2^40 parameters (4 TiB of fp32 weights) is beyond any budget this tool can meet; refusing it
  // here keeps every byte count below in int64 range.
  need(n_params() < (int64_t{1} << 40), "the model has more than 2^40 parameters; shrink it");
}

int64_t GptConfig::n_params() const {
  // Per block: 2 LayerNorms (2C each), qkv (3C^2+3C), attn proj (C^2+C), fc (4C^2+4C),
  // mlp proj (4C^2+C). Plus wte (V*C, shared with the head), wpe (T*C), ln_f (2C).
  const double c = static_cast<double>(d_model);
  double block = 12 * c * c + 13 * c;
  double total = n_layer * block + vocab_size * c + seq_len * c + 2 * c;
  return total >= 0x1p62 ? int64_t{1} << 62 : static_cast<int64_t>(total);
}

nlohmann::json GptConfig::to_json() const {
  return {{"name", name},       {"n_layer", n_layer}, {"n_head", n_head},
          {"d_model", d_model}, {"seq_len", seq_len}, {"vocab_size", vocab_size},
          {"dropout", dropout}};
}

namespace {
struct Preset {
  const char* name;
  int64_t n_layer, n_head, d_model, seq_len, vocab_size;
};
const Preset kPresets[] = {
    {"gpt-tiny", 2, 2, 64, 64, 256},           // ~0.12M params: tests
    {"gpt-mini", 4, 4, 128, 128, 256},         // ~0.8M: the quick start
    {"gpt-10m", 6, 6, 384, 256, 256},          // ~10.7M
    {"gpt2-small", 12, 12, 768, 1024, 50304},  // 124M, GPT-2 small with the padded vocab
};
}  // namespace

std::vector<std::string> gpt_preset_names() {
  std::vector<std::string> names;
  for (const auto& p : kPresets) names.emplace_back(p.name);
  return names;
}

GptConfig gpt_config_from_json(const nlohmann::json& j, const std::string& origin) {
  if (!j.is_object()) throw UsageError("model config " + origin + ": expected a JSON object");
  static const std::set<std::string> known = {"name",    "n_layer",    "n_head", "d_model",
                                              "seq_len", "vocab_size", "dropout"};
  for (auto it = j.begin(); it != j.end(); ++it)
    if (!known.count(it.key()))
      throw UsageError("model config " + origin + ": unknown key '" + it.key() +
                       "'; allowed: n_layer, n_head, d_model, seq_len, vocab_size, dropout");
  GptConfig c;
  c.name = origin;
  auto get_int = [&](const char* key, int64_t& out) {
    if (!j.contains(key)) return;
    const auto& v = j.at(key);
    if (!v.is_number_integer())
      throw UsageError("model config " + origin + ": '" + key + "' must be an integer");
    out = v.get<int64_t>();
  };
  get_int("n_layer", c.n_layer);
  get_int("n_head", c.n_head);
  get_int("d_model", c.d_model);
  get_int("seq_len", c.seq_len);
  get_int("vocab_size", c.vocab_size);
  if (j.contains("dropout")) {
    if (!j.at("dropout").is_number())
      throw UsageError("model config " + origin + ": 'dropout' must be a number");
    c.dropout = j.at("dropout").get<double>();
  }
  if (j.contains("name") && j.at("name").is_string()) c.name = j.at("name").get<std::string>();
  c.validate();
  return c;
}

GptConfig load_gpt_config(const std::string& preset_or_file) {
  for (const auto& p : kPresets)
    if (preset_or_file == p.name) {
      GptConfig c;
      c.name = p.name;
      c.n_layer = p.n_layer;
      c.n_head = p.n_head;
      c.d_model = p.d_model;
      c.seq_len = p.seq_len;
      c.vocab_size = p.vocab_size;
      c.validate();
      return c;
    }
  namespace fs = std::filesystem;
  if (!fs::is_regular_file(preset_or_file)) {
    std::string names;
    for (const auto& n : gpt_preset_names()) names += (names.empty() ? "" : ", ") + n;
    throw UsageError("unknown model '" + preset_or_file + "': use a preset (" + names +
                     ") or a path to a JSON config file");
  }
  std::ifstream f(preset_or_file);
  nlohmann::json j = nlohmann::json::parse(f, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded())
    throw UsageError("model config " + preset_or_file + ": not valid JSON; fix the file");
  GptConfig c = gpt_config_from_json(j, preset_or_file);
  if (!j.contains("name")) c.name = fs::path(preset_or_file).stem().string();
  return c;
}

// ---- model -------------------------------------------------------------------------------------

BlockImpl::BlockImpl(int64_t d_model, int64_t n_head, double dropout)
    : n_head_(n_head), dropout_(dropout) {
  ln1_ = register_module("ln1", torch::nn::LayerNorm(torch::nn::LayerNormOptions({d_model})));
  qkv_ = register_module("qkv", torch::nn::Linear(d_model, 3 * d_model));
  attn_proj_ = register_module("attn_proj", torch::nn::Linear(d_model, d_model));
  ln2_ = register_module("ln2", torch::nn::LayerNorm(torch::nn::LayerNormOptions({d_model})));
  fc_ = register_module("fc", torch::nn::Linear(d_model, 4 * d_model));
  mlp_proj_ = register_module("mlp_proj", torch::nn::Linear(4 * d_model, d_model));
  resid_drop_ = register_module("resid_drop", torch::nn::Dropout(dropout));
}

namespace {
// at::linear, as Python's nn.Linear calls it: on a contiguous [B, T, in] input one addmm with the
// bias fused in. torch::nn::Linear::forward (F::linear) runs matmul and then adds the bias in a
// pass of its own, and its backward reduces the bias gradient in another.
torch::Tensor linear(const torch::nn::Linear& l, const torch::Tensor& x) {
  return at::linear(x, l->weight, l->bias);
}
}  // namespace

std::pair<torch::Tensor, torch::Tensor> BlockImpl::attention_and_mlp_hidden(torch::Tensor x) {
  const int64_t B = x.size(0), T = x.size(1), C = x.size(2), hs = C / n_head_;
  // Attention: qkv [B, T, 3C] -> q, k, v [B, H, T, hs]
  auto qkv = linear(qkv_, ln1_->forward(x)).split(C, /*dim=*/2);
  auto heads = [&](const torch::Tensor& t) { return t.view({B, T, n_head_, hs}).transpose(1, 2); };
  auto y = at::scaled_dot_product_attention(heads(qkv[0]), heads(qkv[1]), heads(qkv[2]),
                                            /*attn_mask=*/{}, is_training() ? dropout_ : 0.0,
                                            /*is_causal=*/true);
  y = y.transpose(1, 2).contiguous().view({B, T, C});  // [B, T, C]
  x = x + resid_drop_->forward(linear(attn_proj_, y));
  // MLP hidden: [B, T, C] -> [B, T, 4C]
  return {x, torch::gelu(linear(fc_, ln2_->forward(x)))};
}

torch::Tensor BlockImpl::forward(const torch::Tensor& x) {
  auto [x2, h] = attention_and_mlp_hidden(x);
  return x2 + resid_drop_->forward(linear(mlp_proj_, h));  // [B, T, 4C] -> [B, T, C]
}

std::optional<std::vector<torch::Tensor>> BlockImpl::forward_before_last(const torch::Tensor& x) {
  if (dropout_ > 0 && is_training()) return std::nullopt;
  auto [x2, h] = attention_and_mlp_hidden(x);
  return std::vector<torch::Tensor>{x2, h};
}

std::vector<torch::Tensor> BlockImpl::last_backward(const std::vector<torch::Tensor>& before,
                                                    const torch::Tensor& g) {
  // Forward (at::linear on a contiguous 3-D input): addmm(b, h2, W^T) in h's dtype, h2 = h as
  // [N, 4C]. Backward, as autograd computes it: the upstream gradient cast to that dtype, then
  // dh = g2 W, dW = (g2^T h2), db = g2 summed to [C]; W and b get theirs back in fp32.
  torch::NoGradGuard no_grad;
  const torch::Tensor& h = before[1];
  const auto dtype = h.scalar_type();
  const int64_t C = g.size(-1), N = g.numel() / C;
  const torch::Tensor g2 = g.to(dtype).reshape({N, C});
  const torch::Tensor h2 = h.reshape({N, h.size(-1)});
  const torch::Tensor& w = mlp_proj_->weight;
  const torch::Tensor& b = mlp_proj_->bias;
  const torch::Tensor dh = g2.mm(w.to(dtype));
  auto accumulate = [](const torch::Tensor& param, torch::Tensor grad) {  // as AccumulateGrad
    grad = grad.to(param.scalar_type());
    if (param.grad().defined())
      param.mutable_grad().add_(grad);
    else
      param.mutable_grad() = grad;
  };
  accumulate(w, g2.t().mm(h2));
  accumulate(b, at::sum_to(g2, b.sizes(), /*always_return_non_view=*/true));
  return {g, dh.view(h.sizes())};  // x2's share is the residual's: g as it is
}

GptModel::GptModel(const GptConfig& cfg, bool checkpointing)
    : cfg_(cfg), checkpointing_(checkpointing) {
  cfg_.validate();
  const int64_t C = cfg_.d_model;
  wte_ = register_module("wte", torch::nn::Embedding(cfg_.vocab_size, C));
  wpe_ = register_module("wpe", torch::nn::Embedding(cfg_.seq_len, C));
  drop_ = register_module("drop", torch::nn::Dropout(cfg_.dropout));
  for (int64_t i = 0; i < cfg_.n_layer; ++i)
    blocks_.push_back(
        register_module("block" + std::to_string(i), Block(C, cfg_.n_head, cfg_.dropout)));
  ln_f_ = register_module("ln_f", torch::nn::LayerNorm(torch::nn::LayerNormOptions({C})));

  // GPT-2 initialisation: N(0, 0.02), residual projections scaled by 1/sqrt(2 * n_layer) so the
  // residual stream's variance does not grow with depth; zero biases.
  torch::NoGradGuard no_grad;
  const double resid_std = 0.02 / std::sqrt(2.0 * static_cast<double>(cfg_.n_layer));
  for (auto& item : named_parameters()) {
    const auto& key = item.key();
    auto& p = item.value();
    if (key.find("ln") != std::string::npos) continue;  // LayerNorm keeps weight 1, bias 0
    if (p.dim() == 1) {
      p.zero_();
    } else {
      bool resid = key.find("attn_proj.weight") != std::string::npos ||
                   key.find("mlp_proj.weight") != std::string::npos;
      p.normal_(0.0, resid ? resid_std : 0.02);
    }
  }
}

torch::Tensor GptModel::forward(const torch::Tensor& idx) {
  const int64_t T = idx.size(1);
  TORCH_CHECK(T <= cfg_.seq_len, "sequence of ", T, " tokens exceeds the context ", cfg_.seq_len);
  auto pos = torch::arange(T, idx.options());                        // [T]
  auto x = drop_->forward(wte_->forward(idx) + wpe_->forward(pos));  // [B, T, C]
  for (auto& block : blocks_)
    x = checkpointing_ && is_training() ? checkpointed(*block, x) : block->forward(x);
  x = ln_f_->forward(x);
  return torch::linear(x, wte_->weight);  // tied head: [B, T, C] x [V, C]^T -> [B, T, V]
}

torch::Tensor GptModel::loss(const Batch& batch) {
  auto logits = forward(batch.input());
  const int64_t V = logits.size(-1);
  // The loss is computed in fp32 whatever the autocast dtype (B*T*V floats: often the single
  // largest tensor of a step).
  return torch::nn::functional::cross_entropy(logits.view({-1, V}).to(torch::kFloat32),
                                              batch.target().reshape({-1}));
}

}  // namespace autotune
