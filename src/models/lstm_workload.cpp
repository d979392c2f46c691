#include "autotune/lstm_workload.h"

#include <cmath>
#include <filesystem>

#include "autotune/errors.h"

namespace autotune {

void LstmConfig::validate() const {
  auto need = [&](bool ok, const std::string& what) {
    if (!ok) throw UsageError("model '" + name + "': " + what);
  };
  need(channels >= 1 && channels <= 4096, "channels must be in [1, 4096]");
  need(hidden >= 1 && hidden <= 16384, "hidden must be in [1, 16384]");
  need(layers >= 1 && layers <= 64, "layers must be in [1, 64]");
  need(seq_len >= 2 && seq_len <= 100000, "seq_len must be in [2, 100000]");
  need(outputs >= 1 && outputs <= 1024, "outputs must be in [1, 1024]");
}

nlohmann::json LstmConfig::to_json() const {
  return {{"name", name},     {"channels", channels}, {"hidden", hidden},
          {"layers", layers}, {"seq_len", seq_len},   {"outputs", outputs}};
}

LstmConfig load_lstm_config(const std::string& preset) {
  LstmConfig c;
  c.name = preset;
  if (preset == "lstm-small") {
  } else if (preset == "lstm-medium") {
    c.hidden = 512;
  } else if (preset == "lstm-large") {
    c.hidden = 1024;
    c.layers = 3;
  } else {
    throw UsageError("unknown model '" + preset +
                     "': LSTM presets are lstm-small, lstm-medium, "
                     "lstm-large");
  }
  c.validate();
  return c;
}

namespace {
// [B, T, channels] -> [B, T, outputs] through a stacked LSTM and a linear head.
class LstmRegressor : public TrainableModel {
 public:
  explicit LstmRegressor(const LstmConfig& c) {
    lstm_ = register_module(
        "lstm",
        torch::nn::LSTM(
            torch::nn::LSTMOptions(c.channels, c.hidden).num_layers(c.layers).batch_first(true)));
    head_ = register_module("head", torch::nn::Linear(c.hidden, c.outputs));
  }
  torch::Tensor loss(const Batch& b) override {
    auto h = std::get<0>(lstm_->forward(b.input()));  // [B, T, hidden]
    // at::linear: the bias fused into the matmul, as Python's nn.Linear (F::linear adds it apart).
    return torch::mse_loss(at::linear(h, head_->weight, head_->bias).to(torch::kFloat32),
                           b.target());
  }

 private:
  torch::nn::LSTM lstm_{nullptr};
  torch::nn::Linear head_{nullptr};
};
}  // namespace

LstmWorkload::LstmWorkload(LstmConfig config, uint64_t seed)
    : config_(std::move(config)), seed_(seed) {
  config_.validate();
  auto gen = at::make_generator<at::CPUGeneratorImpl>(splitmix64(seed_));
  mixing_ = torch::randn({config_.outputs, config_.channels}, gen);
}

nlohmann::json LstmWorkload::config() const {
  return {{"workload", "lstm"}, {"model", config_.to_json()}, {"data", "synthetic"}};
}

void LstmWorkload::validate(const Plan& plan) const {
  if (plan.d_model && plan.d_model != config_.hidden)
    throw UsageError("the LSTM workload has no width knob; drop --allow-shrink width");
  if (seq_len(plan) < 2) throw UsageError("--seq-len must be at least 2 for the LSTM workload");
}

std::shared_ptr<TrainableModel> LstmWorkload::build(const Plan& plan, torch::Device device,
                                                    uint64_t seed) {
  torch::manual_seed(seed);
  auto m = std::make_shared<LstmRegressor>(config_);
  m->to(device);
  return m;
}

Batch LstmWorkload::windows(uint64_t stream, int64_t first, int64_t count, const Plan& plan,
                            torch::Device device) const {
  const int64_t T = seq_len(plan), K = config_.outputs;
  // Angles: per sample and joint, a sum of two sinusoids with hashed frequency and phase.
  auto angles = torch::empty({count, T, K});
  auto a = angles.accessor<float, 3>();
  for (int64_t i = 0; i < count; ++i) {
    const uint64_t h = sample_hash(seed_, stream, first + i);
    for (int64_t k = 0; k < K; ++k) {
      const uint64_t hk = splitmix64(h + static_cast<uint64_t>(k));
      const double f1 = 0.01 + 0.05 * static_cast<double>(hk & 0xffff) / 65535.0;
      const double f2 = 0.02 + 0.08 * static_cast<double>((hk >> 16) & 0xffff) / 65535.0;
      const double p1 = 6.283 * static_cast<double>((hk >> 32) & 0xffff) / 65535.0;
      const double p2 = 6.283 * static_cast<double>((hk >> 48) & 0xffff) / 65535.0;
      for (int64_t t = 0; t < T; ++t)
        a[i][t][k] = static_cast<float>(std::sin(f1 * t + p1) + 0.5 * std::sin(f2 * t + p2));
    }
  }
  // Signal: velocities mixed into channels, plus a little deterministic noise.
  auto velocity = torch::cat({torch::zeros({count, 1, K}), angles.diff(1, 1)}, 1) * 10.0;
  auto gen = at::make_generator<at::CPUGeneratorImpl>(splitmix64(seed_ ^ stream ^ (first * 7919)));
  auto signal =
      torch::matmul(velocity, mixing_) + 0.05 * torch::randn({count, T, config_.channels}, gen);
  return Batch(signal, angles).to(device, /*non_blocking=*/true);
}

Batch LstmWorkload::train_batch(int64_t step, int64_t first, int64_t count, const Plan& plan,
                                torch::Device device) {
  return windows(static_cast<uint64_t>(step), first, count, plan, device);
}

Batch LstmWorkload::val_batch(int64_t first, int64_t count, const Plan& plan,
                              torch::Device device) {
  return windows(kValidationStream, first, count, plan, device);
}

EstimateTerms LstmWorkload::estimate_terms(const Plan& plan) const {
  const double B = static_cast<double>(plan.micro_batch), T = static_cast<double>(seq_len(plan));
  const double Hd = static_cast<double>(config_.hidden), L = static_cast<double>(config_.layers);
  const double C = static_cast<double>(config_.channels), K = static_cast<double>(config_.outputs);
  const double bytes = plan.precision == Precision::fp32 ? 4 : 2;
  EstimateTerms e;
  const double h4 = 4 * Hd;
  e.n_params =
      static_cast<int64_t>(h4 * (C + Hd + 2) + (L - 1) * h4 * (Hd + Hd + 2) + K * (Hd + 1));
  const double P = static_cast<double>(e.n_params);
  // Fitted once to the counting allocator's backward peaks (fp32; lstm-small at micro-batch 4
  // and 32, lstm-medium at 2 and 16, lstm-large at 1 and 8; docs/ESTIMATOR.md): oneDNN's LSTM
  // keeps 11.4 H values per sample, time step and layer for backward (its gates, cell and
  // hidden states, workspace and each layer's output); the layer it back-propagates adds 17.4 H
  // values per sample and step (gate and state gradients, its diff workspace); the weights in
  // oneDNN's layout and the diff weights of the layer in flight take 5.8P bytes.
  const double saved = B * T * L * 11.4 * Hd * bytes;
  const double batch = B * T * (C + K) * 4 * 2, head = B * T * K * 4 * 3;
  e.terms.push_back({"activations", saved});
  e.terms.push_back({"oneDNN weight layouts", 4 * P});
  e.terms.push_back({"batch", batch});
  e.terms.push_back({"head", head});
  e.backward_tail_bytes = saved + B * T * 17.4 * Hd * bytes + 5.8 * P + batch + head;
  // oneDNN writes the weight gradients when the LSTM's backward ends, after its peak.
  e.gradients_after_backward_tail = true;
  if (plan.precision != Precision::fp32) e.weight_copy_bytes = 2.0 * P;
  // Evaluation (no grad): 6 H values per sample and step and half a weight copy in oneDNN's
  // layout (fitted on the same shapes).
  const double eval_B = static_cast<double>(plan.eval_batch_or_micro_batch());
  e.eval_bytes = e.weight_copy_bytes + eval_B * T * 6 * Hd * bytes + 2 * P;
  // Reserved above allocated at the peak, as a share of the tensor peak: about the median over
  // the LSTM shapes measured in docs/ESTIMATOR.md.
  e.reserve_fraction = 0.05;
  return e;
}

// ---- registry entry ----------------------------------------------------------------------------

bool is_lstm_model(const std::string& model) {
  return model.rfind("lstm", 0) == 0 && !std::filesystem::exists(model);
}

std::unique_ptr<Workload> make_lstm_workload(const RunSpec& spec, const ModePolicy&) {
  if (!spec.data.empty())
    throw UsageError("the LSTM presets train on synthetic signals; drop --data " + spec.data);
  return std::make_unique<LstmWorkload>(load_lstm_config(spec.model), spec.seed);
}

}  // namespace autotune
