// Workload: what the tuner and the trainer talk to. The tuner never includes a concrete workload's
// header; it reads knobs and asks for models, batches and estimate terms through this interface.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <torch/torch.h>
#include <nlohmann/json.hpp>

#include "autotune/plan.h"
#include "autotune/splitmix.h"

namespace autotune {

// Where sample `index` of `stream` goes, for a seed. Workloads place a sample by hashing its
// coordinates (seed, stream, index in the global batch), so any split of a batch sees the same
// samples.
inline uint64_t sample_hash(uint64_t seed, uint64_t stream, int64_t index) {
  return splitmix64(seed ^ splitmix64(stream ^ splitmix64(static_cast<uint64_t>(index))));
}
// The stream of validation samples, apart from every training step's stream.
constexpr uint64_t kValidationStream = 0x5a17ULL << 40;

// A micro-batch: named tensors, each with the sample count B as its first dimension, so a model
// with several inputs (three feature streams, a signal window and its angles) needs no special
// case. The GPT's are "input" [B, T] and "target" [B, T] (int64 tokens, next tokens); a
// TorchScript model's are the names of its data file.
struct Batch {
  std::map<std::string, torch::Tensor> tensors;

  Batch() = default;
  Batch(torch::Tensor input, torch::Tensor target);  // "input" and "target"
  // Throws std::out_of_range naming the missing tensor and the ones there.
  const torch::Tensor& at(const std::string& name) const;
  const torch::Tensor& input() const { return at("input"); }
  const torch::Tensor& target() const { return at("target"); }
  int64_t samples() const;  // B (0 for an empty batch)
  Batch to(torch::Device device, bool non_blocking = false) const;
};

// A model built by a workload for one plan. Parameters are fp32 master weights; autocast (owned
// by the trainer) decides the compute dtype.
class TrainableModel : public torch::nn::Module {
 public:
  // Mean loss over the batch (scalar, fp32). Forward only: the trainer owns backward.
  virtual torch::Tensor loss(const Batch& batch) = 0;
  // Recompute activations in backward (no-op where the model has no checkpointing).
  virtual void set_checkpointing(bool on) {}
  // Files for the user beside each checkpoint in run_dir (a TorchScript model: the trained
  // module, model.pt, for Python). Nothing by default.
  virtual void export_to(const std::string& run_dir) {}
  // nanoGPT's rule: every parameter with dim >= 2 (matrices, embeddings) decays; biases and
  // norm gains do not.
  std::vector<torch::Tensor> decay_parameters();
  std::vector<torch::Tensor> no_decay_parameters();
};

// Which knobs of a Plan this workload honours. micro_batch and precision always.
struct WorkloadKnobs {
  bool seq_len = false;        // can the sequence length change (only with --allow-shrink seq)
  bool width = false;          // can the model width change (only with --allow-shrink width)
  bool checkpointing = false;  // is activation checkpointing implemented
  bool precision = true;       // can it train in a low precision (a script may apply none)
};

// Analytic memory terms of one plan, in bytes, computed by the workload that knows its structure.
// The tuner's Estimator adds optimizer state, allocator slack and calibration.
struct EstimateTerm {
  std::string name;  // "params", "activations", "logits", ...
  double bytes = 0;
};
struct EstimateTerms {
  int64_t n_params = 0;
  // Alive at the end of the forward (step 2 on: AdamW states exist, gradients do not yet).
  std::vector<EstimateTerm> terms;
  // Allocated as backward starts, on top of everything alive at the end of the forward: the
  // loss's gradient, or the first block's weight gradients and its widest incoming gradient.
  double backward_start_bytes = 0;
  // Activation bytes alive while the last gradients are produced (all gradients allocated):
  // the first block's saved tensors (or its recomputation) plus its backward working memory.
  double backward_tail_bytes = 0;
  // True where the backward's peak comes before the gradients are written (oneDNN's LSTM
  // writes its weight gradients when its backward ends): at grad_accum 1 none is alive at the
  // tail; from the second micro-batch on, the accumulated ones are.
  bool gradients_after_backward_tail = false;
  double weight_copy_bytes = 0;  // autocast's low-precision weight copies (alive in both)
  // Alive at the evaluation's peak (no-grad forward at the plan's eval batch) on top of the
  // parameters, AdamW states and the last step's gradients, which are still allocated then.
  double eval_bytes = 0;
  // The caching allocator's reserved bytes above its allocated bytes at the peak, as a fraction
  // of the tensor peak: cached blocks no request could reuse. Measured per workload on shapes
  // the other terms were not fitted on (docs/ESTIMATOR.md).
  double reserve_fraction = 0.10;
  // False for an opaque model (TorchScript): its activations are not in `terms` but measured by
  // the probes, and the search fits its line from measured peaks alone.
  bool activations_known = true;
};

class Workload {
 public:
  virtual ~Workload() = default;

  virtual std::string kind() const = 0;        // "gpt", "lstm"
  virtual std::string model_name() const = 0;  // preset or file stem, for tables and file names
  virtual nlohmann::json config() const = 0;   // full model + data config (fingerprint)
  virtual WorkloadKnobs knobs() const = 0;
  virtual int64_t default_seq_len() const = 0;
  virtual int64_t default_width() const = 0;
  // The narrower widths the model can be built at, widest first (knobs().width only).
  virtual std::vector<int64_t> width_options() const { return {}; }
  // Checks a plan against the model and the data; throws UsageError naming the fix.
  virtual void validate(const Plan& plan) const = 0;
  // Units of work per sequence for throughput (tokens for a language model, 1 for a model whose
  // unit is the sample), and their name.
  virtual int64_t tokens_per_sequence(const Plan& plan) const = 0;
  virtual std::string throughput_unit() const { return "tokens"; }
  // The data, in a line for the settings table.
  virtual std::string describe_data() const { return ""; }

  // A fresh model for the plan on `device`; initialisation is deterministic in `seed`.
  virtual std::shared_ptr<TrainableModel> build(const Plan& plan, torch::Device device,
                                                uint64_t seed) = 0;

  // Sequences [first, first+count) of the global batch of optimizer step `step`. The content of a
  // sample depends only on (seed, step, index), never on how the global batch is split into
  // micro-batches: that is what makes grad accumulation and OOM recovery exact.
  virtual Batch train_batch(int64_t step, int64_t first, int64_t count, const Plan& plan,
                            torch::Device device) = 0;
  // Sequences [first, first+count) of the fixed validation set.
  virtual Batch val_batch(int64_t first, int64_t count, const Plan& plan, torch::Device device) = 0;

  virtual EstimateTerms estimate_terms(const Plan& plan) const = 0;

  // Data path counters for the monitor and the summary: read_mode, cache_hits, cache_misses,
  // cache_hit_rate, cache_bytes_in_use, cache_capacity_bytes, prefetch_batches, prefetch_hits,
  // prefetch_misses, prefetch_hit_rate. null when the workload has no such data path.
  virtual nlohmann::json data_report() const { return nullptr; }
};

}  // namespace autotune
