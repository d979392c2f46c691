#include "autotune/gpt_workload.h"

#include <algorithm>
#include <filesystem>

#include <string>

#include "autotune/errors.h"
#include "data/batch_loader.h"
#include "data/sample_cache.h"

namespace autotune {

GptWorkload::GptWorkload(GptConfig config, std::shared_ptr<TokenFile> data, uint64_t seed)
    : config_(std::move(config)), data_(std::move(data)), seed_(seed) {
  config_.validate();
  if (data_->vocab_size() > static_cast<uint32_t>(config_.vocab_size))
    throw UsageError("data " + data_->path() + " has vocab " + std::to_string(data_->vocab_size()) +
                     " but model '" + config_.name + "' has vocab_size " +
                     std::to_string(config_.vocab_size) +
                     "; set vocab_size >= " + std::to_string(data_->vocab_size()));
  // The file is used as given until set_data_options asks for something else.
  options_.read_mode = data_->mode();
}

GptWorkload::~GptWorkload() {
  stop_loader();
}

void GptWorkload::stop_loader() {
  if (!loader_) return;
  const PrefetchStats p = loader_->stats();
  retired_.prefetch_hits += p.hits;
  retired_.prefetch_misses += p.misses;
  retired_.prefetch_late += p.late;
  retired_.prefetch_discarded += p.discarded;
  loader_.reset();  // joins the thread
}

void GptWorkload::set_data_options(const DataOptions& options) {
  if (options.prefetch_batches < 0)
    throw UsageError("prefetch_batches must be >= 0, got " +
                     std::to_string(options.prefetch_batches));
  // Open first: if the file cannot be reopened, nothing has changed yet.
  std::shared_ptr<TokenFile> file = data_;
  if (options.read_mode != data_->mode()) file = data_->reopen(options.read_mode);

  stop_loader();
  const bool new_file = file != data_;
  data_ = std::move(file);
  if (cache_ && (options.cache_bytes != cache_->capacity_bytes() || new_file)) {
    const SampleCacheStats c = cache_->stats();
    retired_.cache_hits += c.hits;
    retired_.cache_misses += c.misses;
    retired_.cache_evictions += c.evictions;
    cache_.reset();
  }
  if (!cache_ && options.cache_bytes > 0)
    cache_ = std::make_unique<SampleCache>(options.cache_bytes);
  options_ = options;
  if (options_.prefetch_batches > 0) {
    loader_ = std::make_unique<BatchLoader>(
        [this](const BatchKey& k, const std::atomic<bool>& cancel) {
          return fill(Split::train, static_cast<uint64_t>(k.step), k.first, k.count, k.seq_len,
                      &cancel);
        },
        options_.prefetch_batches);
  }
}

nlohmann::json GptWorkload::data_report() const {
  const DataStats s = data_stats();
  return {{"read_mode", s.read_mode == ReadMode::pread ? "pread" : "mmap"},
          {"cache_hits", s.cache_hits},
          {"cache_misses", s.cache_misses},
          {"cache_evictions", s.cache_evictions},
          {"cache_hit_rate", s.cache_hit_rate()},
          {"cache_bytes_in_use", s.cache_bytes_in_use},
          {"cache_capacity_bytes", s.cache_capacity_bytes},
          {"prefetch_batches", s.prefetch_batches},
          {"prefetch_hits", s.prefetch_hits},
          {"prefetch_misses", s.prefetch_misses},
          {"prefetch_hit_rate", s.prefetch_hit_rate()}};
}

DataStats GptWorkload::data_stats() const {
  DataStats s;
  s.read_mode = data_->mode();
  s.cache_hits = retired_.cache_hits;
  s.cache_misses = retired_.cache_misses;
  s.cache_evictions = retired_.cache_evictions;
  if (cache_) {
    const SampleCacheStats c = cache_->stats();
    s.cache_hits += c.hits;
    s.cache_misses += c.misses;
    s.cache_evictions += c.evictions;
    s.cache_entries = c.entries;
    s.cache_bytes_in_use = c.bytes_in_use;
    s.cache_capacity_bytes = c.capacity_bytes;
  }
  s.prefetch_batches = loader_ ? loader_->max_batches() : 0;
  s.prefetch_hits = retired_.prefetch_hits;
  s.prefetch_misses = retired_.prefetch_misses;
  s.prefetch_late = retired_.prefetch_late;
  s.prefetch_discarded = retired_.prefetch_discarded;
  if (loader_) {
    const PrefetchStats p = loader_->stats();
    s.prefetch_hits += p.hits;
    s.prefetch_misses += p.misses;
    s.prefetch_late += p.late;
    s.prefetch_discarded += p.discarded;
    s.prefetch_ready = p.ready;
  }
  return s;
}

nlohmann::json GptWorkload::config() const {
  return {{"workload", "gpt"},
          {"model", config_.to_json()},
          {"data",
           {{"path", data_->path()},
            {"format", to_string(data_->format())},
            {"train_tokens", data_->tokens(Split::train)},
            {"val_tokens", data_->tokens(Split::val)}}}};
}

std::vector<int64_t> GptWorkload::width_options() const {
  std::vector<int64_t> out;
  const int64_t h = config_.n_head;
  for (double f : {0.75, 0.5, 0.375, 0.25, 0.1875, 0.125, 0.09375, 0.0625}) {
    const int64_t w = static_cast<int64_t>(static_cast<double>(config_.d_model) * f) / h * h;
    if (w >= std::max<int64_t>(8, h) && w < config_.d_model && (out.empty() || w < out.back()))
      out.push_back(w);
  }
  return out;
}

GptConfig GptWorkload::config_for(const Plan& plan) const {
  GptConfig c = config_;
  if (plan.seq_len) c.seq_len = plan.seq_len;
  if (plan.d_model) c.d_model = plan.d_model;
  return c;
}

void GptWorkload::validate(const Plan& plan) const {
  config_for(plan).validate();
  const int64_t T = seq_len(plan);
  // A window is T+1 tokens (inputs and shifted targets); both splits must hold at least one.
  for (Split s : {Split::train, Split::val}) {
    uint64_t n = data_->tokens(s);
    if (n < static_cast<uint64_t>(T) + 2)
      throw UsageError("seq_len " + std::to_string(T) + " is beyond the data: the " +
                       (s == Split::train ? "train" : "validation") + " split of " + data_->path() +
                       " has " + std::to_string(n) +
                       " tokens; use a shorter --seq-len or more text");
  }
}

std::shared_ptr<TrainableModel> GptWorkload::build(const Plan& plan, torch::Device device,
                                                   uint64_t seed) {
  torch::manual_seed(seed);
  auto model = std::make_shared<GptModel>(config_for(plan), plan.checkpointing);
  model->to(device);
  return model;
}

torch::Tensor GptWorkload::fill(Split split, uint64_t stream, int64_t first, int64_t count,
                                int64_t T, const std::atomic<bool>* cancel) const {
  const uint64_t n_starts = data_->tokens(split) - static_cast<uint64_t>(T);  // window = T+1
  // [count, T+1] tokens; input = [:, :T], target = [:, 1:]
  auto buf = torch::empty({count, T + 1},
                          torch::TensorOptions(torch::kInt64).pinned_memory(options_.pin_memory));
  int64_t* out = buf.data_ptr<int64_t>();
  for (int64_t i = 0; i < count; ++i) {
    if (cancel != nullptr && cancel->load(std::memory_order_relaxed)) return torch::Tensor();
    // The position depends on (seed, stream, index) only: never on how a step is split into
    // micro-batches, nor on the read path below.
    const uint64_t h = sample_hash(seed_, stream, first + i);
    const uint64_t offset = h % n_starts;
    int64_t* window = out + i * (T + 1);
    if (cache_) {
      cache_->read(*data_, split, offset, T + 1, window);
    } else {
      data_->read(split, offset, T + 1, window);
    }
  }
  return buf;
}

Batch GptWorkload::to_batch(const torch::Tensor& buf, torch::Device device) const {
  const int64_t T = buf.size(1) - 1;
  Batch b(buf.narrow(1, 0, T), buf.narrow(1, 1, T));
  return device == torch::kCPU ? b : b.to(device, /*non_blocking=*/true);
}

Batch GptWorkload::train_batch(int64_t step, int64_t first, int64_t count, const Plan& plan,
                               torch::Device device) {
  const int64_t T = seq_len(plan);
  if (loader_ && count > 0) return to_batch(loader_->get({step, first, count, T}), device);
  return to_batch(fill(Split::train, static_cast<uint64_t>(step), first, count, T, nullptr),
                  device);
}

Batch GptWorkload::val_batch(int64_t first, int64_t count, const Plan& plan, torch::Device device) {
  // Not prefetched: evaluation is rare and short. The cache is where its windows, the same at
  // every evaluation, are served again.
  return to_batch(fill(Split::val, kValidationStream, first, count, seq_len(plan), nullptr),
                  device);
}

EstimateTerms GptWorkload::estimate_terms(const Plan& plan) const {
  // Bytes alive at the peaks of a training step, from what autograd saves for backward,
  // calibrated once against the counting allocator (docs/ESTIMATOR.md). B*T positions, C width,
  // L layers, V vocab, P parameters.
  const GptConfig c = config_for(plan);
  const double B = static_cast<double>(plan.micro_batch), T = static_cast<double>(c.seq_len);
  const double C = static_cast<double>(c.d_model), L = static_cast<double>(c.n_layer);
  const double V = static_cast<double>(c.vocab_size), P = static_cast<double>(c.n_params());
  const bool low = plan.precision != Precision::fp32;
  const double value_bytes = low ? 2 : 4;  // an activation under autocast, or in fp32
  const double BT = B * T;

  EstimateTerms e;
  e.n_params = c.n_params();
  // Saved per block and position. Counted: residual x, ln1 out, qkv (3), attention out and its
  // contiguous copy, residual x2, ln2 out, fc out (4), gelu out (4) = 17 C-vectors; measured
  // 15.6 in fp32 (62.4*C bytes). Under autocast the two residuals stay fp32 (8*C bytes) and the
  // rest are 2-byte copies: measured 34.2*C bytes in all.
  const double block_bytes = BT * (low ? 34.2 * C : 62.4 * C);
  // Backward working memory of one block: the incoming gradient and the widest (4C) gradient,
  // 2-byte under autocast like the activations they are gradients of.
  const double working = BT * 5 * value_bytes * C;
  const double final_norm = BT * 2 * 4 * C;  // ln_f's input and output, fp32 [B, T, C] each
  const double logits_grad = BT * V * value_bytes;
  if (plan.checkpointing) {
    // Only each block's input (fp32) survives the forward; one block is recomputed at a time.
    const double block_inputs = BT * L * 4 * C;
    e.terms.push_back({"activations (block inputs)", block_inputs});
    // Two moments in backward: the last block's recomputation right after the head (the block
    // inputs, the final norm's saved tensors, the logits' gradient, one block and its working
    // memory) and the first block's at the end (all gradients + one block). At grad_accum 1 the
    // gradients are not yet allocated at the first moment; from the second micro-batch on they
    // are. Expressed on top of the end's 16P.
    const double first_extra = block_inputs + final_norm + logits_grad;
    const double grads_missing = plan.grad_accum >= 2 ? 0.0 : 4 * P;
    e.backward_tail_bytes = block_bytes + working + std::max(0.0, first_extra - grads_missing);
    e.backward_start_bytes = logits_grad;
  } else {
    e.terms.push_back({"activations", L * block_bytes});
    e.backward_tail_bytes = block_bytes + working;
    // As backward starts, everything saved is alive beside the loss's gradient [B, T, V] or,
    // where the width outweighs the vocabulary, the last block's MLP backward: the projection's
    // weight gradient [4C, C] fp32 and the [B, T, 2C]-sized share of its incoming gradients not
    // yet offset by freed saved tensors (measured on gpt-10m at micro-batch 2, 4 and 8).
    e.backward_start_bytes = std::max(logits_grad, 4 * C * C * 4 + BT * 2 * C * value_bytes);
  }
  e.terms.push_back({"final norm", final_norm});
  // Logits [B, T, V] (4 bytes, or 2 under autocast plus the fp32 copy the loss takes) and the
  // saved log-softmax (4 bytes).
  e.terms.push_back({"logits", BT * V * (low ? 2 + 4 + 4 : 4 + 4)});
  e.terms.push_back({"batch", B * (T + 1) * 8});
  if (low) e.weight_copy_bytes = 2.0 * P;
  // Evaluation (no grad, at the eval batch): the larger of the logits with the loss's
  // log-softmax and one block's forward temporaries (measured 15 fp32 C-vectors per position,
  // 17 two-byte ones under autocast, on gpt-mini 32 x 1 and gpt-10m 8 x 1), beside autocast's
  // weight copies.
  const double eval_B = static_cast<double>(plan.eval_batch_or_micro_batch());
  e.eval_bytes = e.weight_copy_bytes +
                 eval_B * T * std::max(V * (low ? 2 + 4 + 4 : 4 + 4), low ? 34 * C : 60 * C) +
                 eval_B * (T + 1) * 8;
  // The caching allocator's reserved-above-allocated at the peak, as a share of the tensor peak:
  // the median over the GPT plans measured in docs/ESTIMATOR.md.
  e.reserve_fraction = 0.10;
  return e;
}

// ---- registry entry ----------------------------------------------------------------------------

std::unique_ptr<Workload> make_gpt_workload(const RunSpec& spec, const ModePolicy& policy) {
  GptConfig cfg = load_gpt_config(spec.model);
  std::string data = spec.data.empty() ? "data/corpus.tok" : spec.data;
  if (spec.data.empty() && !std::filesystem::exists(data))
    throw UsageError(
        "no --data given and the default corpus data/corpus.tok is missing; run "
        "scripts/setup or `autotune prepare-data --input TEXT... --output FILE`");
  if (std::filesystem::path(data).extension() == ".safetensors")
    throw UsageError("--data " + data +
                     " is a safetensors file, for a TorchScript --model "
                     "FILE.pt; a GPT trains on a token file (.tok, nanoGPT or llm.c .bin)");
  // The memory mode decides the data path: positioned reads without caching in ultra-low-mem
  // (resident memory stays flat), a byte-capped sample cache and bounded prefetch otherwise.
  const ReadMode mode = policy.pread_data ? ReadMode::pread : ReadMode::mmap;
  auto w =
      std::make_unique<GptWorkload>(cfg, TokenFile::open(data, mode, spec.val_data), spec.seed);
  w->set_data_options({mode, policy.cache_bytes, policy.prefetch_batches, policy.pin_memory});
  return w;
}

}  // namespace autotune
