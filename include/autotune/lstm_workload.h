// A second, different workload: an LSTM regressor from windows of multichannel signal to joint
// angles (the shape of ../shared/seeds/001: EMG windows -> hand angles). Its data is generated
// deterministically from the seed: smooth angle trajectories, and channels that mix the angles'
// velocities through a fixed random matrix plus noise, so the task is learnable.
#pragma once
#include "autotune/machine.h"
#include "autotune/run_spec.h"
#include "autotune/workload.h"

namespace autotune {

struct LstmConfig {
  std::string name = "lstm-small";
  int64_t channels = 16;  // input signal channels
  int64_t hidden = 128;   // LSTM hidden size
  int64_t layers = 2;
  int64_t seq_len = 200;  // samples per window
  int64_t outputs = 4;    // angles predicted per time step
  void validate() const;
  nlohmann::json to_json() const;
};

// lstm-small, lstm-medium (hidden 512), lstm-large (hidden 1024, 3 layers).
LstmConfig load_lstm_config(const std::string& preset);

class LstmWorkload : public Workload {
 public:
  LstmWorkload(LstmConfig config, uint64_t seed);

  std::string kind() const override { return "lstm"; }
  std::string model_name() const override { return config_.name; }
  nlohmann::json config() const override;
  WorkloadKnobs knobs() const override { return {true, false, false}; }
  int64_t default_seq_len() const override { return config_.seq_len; }
  int64_t default_width() const override { return config_.hidden; }
  void validate(const Plan& plan) const override;
  int64_t tokens_per_sequence(const Plan& plan) const override { return seq_len(plan); }
  std::shared_ptr<TrainableModel> build(const Plan& plan, torch::Device device,
                                        uint64_t seed) override;
  Batch train_batch(int64_t step, int64_t first, int64_t count, const Plan& plan,
                    torch::Device device) override;
  Batch val_batch(int64_t first, int64_t count, const Plan& plan, torch::Device device) override;
  EstimateTerms estimate_terms(const Plan& plan) const override;

 private:
  int64_t seq_len(const Plan& plan) const { return plan.seq_len ? plan.seq_len : config_.seq_len; }
  Batch windows(uint64_t stream, int64_t first, int64_t count, const Plan& plan,
                torch::Device device) const;
  LstmConfig config_;
  uint64_t seed_;
  torch::Tensor mixing_;  // [outputs, channels] fixed by the seed
};

// The registry's entries (src/models/workload_registry.cpp): an lstm-* preset name (not a file).
bool is_lstm_model(const std::string& model);
std::unique_ptr<Workload> make_lstm_workload(const RunSpec& spec, const ModePolicy& policy);

}  // namespace autotune
