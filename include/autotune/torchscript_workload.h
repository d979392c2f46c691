// A user's own PyTorch model as a Workload: a TorchScript module (torch.jit.script or
// torch.jit.trace, then .save) trained on named tensors from a safetensors file.
//
// Contract (docs/MODELS.md): forward(batch: Dict[str, Tensor]) -> Tensor returns the mean loss of
// a micro-batch. Its parameters are the fp32 master weights the trainer's AdamW updates in place
// (decay on dim >= 2); it trains in train() mode. The block contract, which activation
// checkpointing needs: a `blocks` ModuleList whose modules map one Tensor to one Tensor, and
// methods embed(batch) -> Tensor and head(x, batch) -> Tensor, with
// forward(batch) == head(blocks(embed(batch)), batch); autotune then drives the blocks itself.
//
// TorchScript is what LibTorch can train from C++ today (PyTorch marks it deprecated in favour of
// torch.export, which has no C++ training path yet). Loading stays behind this adapter so
// another one can replace it without touching the tuner or the trainer.
#pragma once
#include <memory>
#include <string>
#include <vector>

#include <torch/script.h>

#include "autotune/machine.h"
#include "autotune/run_spec.h"
#include "autotune/safetensors.h"
#include "autotune/workload.h"

namespace autotune {

// Samples as named tensors: the train file, and the validation file or the train file's last 10%.
class NamedTensorData {
 public:
  NamedTensorData(std::shared_ptr<SafetensorsFile> train, std::shared_ptr<SafetensorsFile> val);
  // Samples [first, first+count) of `stream`'s batch (the (seed, stream, index) hash places
  // them), or of the validation samples in order.
  Batch train_batch(uint64_t seed, uint64_t stream, int64_t first, int64_t count) const;
  Batch val_batch(int64_t first, int64_t count) const;
  int64_t train_samples() const { return train_count_; }
  int64_t val_samples() const { return val_count_; }
  const SafetensorsFile& train_file() const { return *train_; }
  std::string describe() const;  // for the settings table
  nlohmann::json config() const;
  // Bytes of one sample, all tensors together.
  uint64_t sample_bytes() const;

 private:
  Batch gather(const SafetensorsFile& f, const std::vector<int64_t>& rows) const;
  std::shared_ptr<SafetensorsFile> train_, val_;  // val_ may be train_ (its last 10%)
  int64_t train_count_ = 0, val_first_ = 0, val_count_ = 0;
};

class TorchScriptWorkload : public Workload {
 public:
  // Loads and checks the module against the data (UsageError naming the fix).
  TorchScriptWorkload(const std::string& model_path, std::shared_ptr<NamedTensorData> data,
                      uint64_t seed);

  std::string kind() const override { return "torchscript"; }
  std::string model_name() const override { return name_; }
  nlohmann::json config() const override;
  WorkloadKnobs knobs() const override { return {false, false, block_contract_}; }
  int64_t default_seq_len() const override { return 0; }
  int64_t default_width() const override { return 0; }
  void validate(const Plan& plan) const override;
  int64_t tokens_per_sequence(const Plan&) const override { return 1; }
  std::string throughput_unit() const override { return "samples"; }
  std::shared_ptr<TrainableModel> build(const Plan& plan, torch::Device device,
                                        uint64_t seed) override;
  Batch train_batch(int64_t step, int64_t first, int64_t count, const Plan& plan,
                    torch::Device device) override;
  Batch val_batch(int64_t first, int64_t count, const Plan& plan, torch::Device device) override;
  EstimateTerms estimate_terms(const Plan& plan) const override;
  std::string describe_data() const override { return data_->describe(); }

  bool block_contract() const { return block_contract_; }
  int64_t n_params() const { return n_params_; }

 private:
  std::string tensor_names() const;  // the data file's, for messages
  std::string path_, name_;
  uint64_t file_hash_ = 0;
  torch::jit::Module template_;  // as loaded; each build() gets a deep copy
  std::shared_ptr<NamedTensorData> data_;
  uint64_t seed_;
  bool block_contract_ = false;
  int64_t n_params_ = 0;
  std::vector<std::string> batch_keys_;  // what forward reads, when the module declares it
};

// The registry's entries (src/models/workload_registry.cpp).
bool is_torchscript_model(const std::string& model);
std::unique_ptr<Workload> make_torchscript_workload(const RunSpec& spec, const ModePolicy& policy);

}  // namespace autotune
