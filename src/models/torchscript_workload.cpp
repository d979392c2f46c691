#include "autotune/torchscript_workload.h"

#include <torch/csrc/jit/runtime/graph_executor.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>

#include <spdlog/spdlog.h>

#include "autotune/activation_checkpoint.h"
#include "autotune/errors.h"
#include "util/atomic_file.h"

namespace autotune {

namespace fs = std::filesystem;

// ---- data --------------------------------------------------------------------------------------

NamedTensorData::NamedTensorData(std::shared_ptr<SafetensorsFile> train,
                                 std::shared_ptr<SafetensorsFile> val)
    : train_(std::move(train)), val_(std::move(val)) {
  if (val_) {
    // The validation file must hold the same tensors, sample for sample.
    for (const auto& e : train_->entries()) {
      const SafetensorsEntry* v = val_->find(e.name);
      if (v == nullptr)
        throw UsageError("--val-data " + val_->path() + " has no tensor '" + e.name + "' that " +
                         train_->path() + " has; give both files the same tensors");
      if (v->scalar_type != e.scalar_type ||
          std::vector<int64_t>(v->shape.begin() + 1, v->shape.end()) !=
              std::vector<int64_t>(e.shape.begin() + 1, e.shape.end()))
        throw UsageError("--val-data " + val_->path() + ": tensor '" + e.name +
                         "' differs from the train file's in dtype or sample shape; give both "
                         "files the same layout");
    }
    train_count_ = train_->samples();
    val_count_ = val_->samples();
  } else {
    // The last 10% of the samples (at least one) are the validation set.
    val_count_ = std::max<int64_t>(1, train_->samples() / 10);
    train_count_ = train_->samples() - val_count_;
    val_first_ = train_count_;
  }
  if (train_count_ < 1 || val_count_ < 1)
    throw UsageError("data " + train_->path() + " has " + std::to_string(train_->samples()) +
                     " samples: too few for a train and a validation split; give more samples "
                     "or --val-data FILE");
}

Batch NamedTensorData::gather(const SafetensorsFile& f, const std::vector<int64_t>& rows) const {
  Batch b;
  for (const auto& e : f.entries()) b.tensors.emplace(e.name, f.gather(e.name, rows));
  return b;
}

Batch NamedTensorData::train_batch(uint64_t seed, uint64_t stream, int64_t first,
                                   int64_t count) const {
  std::vector<int64_t> rows(static_cast<size_t>(count));
  for (int64_t i = 0; i < count; ++i)
    rows[static_cast<size_t>(i)] = static_cast<int64_t>(sample_hash(seed, stream, first + i) %
                                                        static_cast<uint64_t>(train_count_));
  return gather(*train_, rows);
}

Batch NamedTensorData::val_batch(int64_t first, int64_t count) const {
  std::vector<int64_t> rows(static_cast<size_t>(count));
  for (int64_t i = 0; i < count; ++i)
    rows[static_cast<size_t>(i)] = val_first_ + (first + i) % val_count_;
  return gather(val_ ? *val_ : *train_, rows);
}

uint64_t NamedTensorData::sample_bytes() const {
  uint64_t n = 0;
  for (const auto& e : train_->entries()) n += e.row_bytes();
  return n;
}

std::string NamedTensorData::describe() const {
  std::string names;
  for (const auto& e : train_->entries()) {
    std::string shape;
    for (size_t i = 1; i < e.shape.size(); ++i)
      shape += (i > 1 ? "x" : "") + std::to_string(e.shape[i]);
    names += (names.empty() ? "" : ", ") + e.name + " " + e.dtype +
             (shape.empty() ? "" : "[" + shape + "]");
  }
  return "safetensors, " + std::to_string(train_count_) + " train + " + std::to_string(val_count_) +
         " val samples (validation: " + (val_ ? val_->path() : std::string("its last 10%")) +
         "): " + names;
}

nlohmann::json NamedTensorData::config() const {
  nlohmann::json tensors = nlohmann::json::object();
  for (const auto& e : train_->entries())
    tensors[e.name] = {{"dtype", e.dtype}, {"shape", e.shape}};
  return {{"path", train_->path()},
          {"format", "safetensors"},
          {"fingerprint", train_->fingerprint()},
          {"val_path", val_ ? val_->path() : ""},
          {"train_samples", train_count_},
          {"val_samples", val_count_},
          {"tensors", tensors}};
}

// ---- the model ---------------------------------------------------------------------------------

namespace {

// One module of the model's `blocks`, recomputed in backward by the same function as the GPT's.
class ScriptBlock : public RecomputableBlock {
 public:
  explicit ScriptBlock(torch::jit::Module m) : m_(std::move(m)) {}
  torch::Tensor forward(const torch::Tensor& x) override { return m_.forward({x}).toTensor(); }

 private:
  torch::jit::Module m_;
};

c10::Dict<std::string, torch::Tensor> to_dict(const Batch& b) {
  c10::Dict<std::string, torch::Tensor> d;
  for (const auto& [name, t] : b.tensors) d.insert(name, t);
  return d;
}

// torch::nn::Module names cannot hold dots: "blocks.0.fc.weight" is kept as "blocks/0/fc/weight".
std::string module_key(std::string name) {
  std::replace(name.begin(), name.end(), '.', '/');
  return name;
}

class ScriptedModel : public TrainableModel {
 public:
  ScriptedModel(torch::jit::Module m, bool block_contract)
      : m_(std::move(m)), contract_(block_contract) {
    // The module's own tensors, registered by name: the optimizer updates them in place, and
    // checkpoints save and load them (buffers too, so a resume is exact).
    for (const auto& p : m_.named_parameters(/*recurse=*/true))
      register_parameter(module_key(p.name), p.value, p.value.requires_grad());
    for (const auto& b : m_.named_buffers(/*recurse=*/true))
      register_buffer(module_key(b.name), b.value);
    if (contract_)
      for (auto block : m_.attr("blocks").toModule().children())
        blocks_.push_back(std::make_unique<ScriptBlock>(block));
  }

  torch::Tensor loss(const Batch& batch) override {
    auto dict = to_dict(batch);
    if (!(contract_ && checkpointing_ && is_training())) return m_.forward({dict}).toTensor();
    torch::Tensor x = m_.run_method("embed", dict).toTensor();
    for (auto& block : blocks_) x = checkpointed(*block, x);
    return m_.run_method("head", x, dict).toTensor();
  }
  void set_checkpointing(bool on) override { checkpointing_ = on; }
  void train(bool on) override {
    TrainableModel::train(on);
    m_.train(on);
  }
  // The trained module as TorchScript, for Python: torch.jit.load(path).state_dict() loads into
  // the original nn.Module with load_state_dict.
  void export_to(const std::string& run_dir) override {
    atomic_write_with(run_dir + "/model.pt", [&](const std::string& tmp) { m_.save(tmp); });
  }

 private:
  torch::jit::Module m_;
  bool contract_;
  bool checkpointing_ = false;
  std::vector<std::unique_ptr<ScriptBlock>> blocks_;
};

uint64_t hash_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  uint64_t h = splitmix64(0x7ea5ULL);
  char buf[1 << 16];
  while (f.read(buf, sizeof buf).gcount() > 0) {
    const auto n = f.gcount();
    for (std::streamsize i = 0; i < n; i += 8) {
      uint64_t word = 0;
      std::memcpy(&word, buf + i, static_cast<size_t>(std::min<std::streamsize>(8, n - i)));
      h = splitmix64(h ^ word);
    }
  }
  return h;
}

}  // namespace

std::string TorchScriptWorkload::tensor_names() const {
  std::string names;
  for (const auto& e : data_->train_file().entries()) names += (names.empty() ? "" : ", ") + e.name;
  return names;
}

TorchScriptWorkload::TorchScriptWorkload(const std::string& model_path,
                                         std::shared_ptr<NamedTensorData> data, uint64_t seed)
    : path_(model_path), data_(std::move(data)), seed_(seed) {
  name_ = fs::path(model_path).stem().string();
  const std::string what = "model " + model_path;
  if (!fs::is_regular_file(model_path))
    throw UsageError(what +
                     ": no such file; give a TorchScript module saved with "
                     "torch.jit.script(model).save(PATH)");
  try {
    template_ = torch::jit::load(model_path, torch::kCPU);
  } catch (const c10::Error& e) {
    throw UsageError(what + " is not a TorchScript module (" +
                     std::string(e.what_without_backtrace()).substr(0, 120) +
                     "); save it with torch.jit.script(model).save(PATH)");
  }
  // The graph executor's fusers are not autocast-aware (a fused group would run in fp32 under
  // bf16 autocast), and on CPU they fuse little: run the graphs as written.
  torch::jit::setGraphExecutorOptimize(false);
  file_hash_ = hash_file(model_path);
  if (!template_.find_method("forward"))
    throw UsageError(what +
                     " has no forward method; it must define forward(batch: Dict[str, "
                     "Tensor]) -> Tensor (docs/MODELS.md)");
  for (const auto& p : template_.named_parameters(/*recurse=*/true)) {
    if (p.value.scalar_type() != torch::kFloat32)
      throw UsageError(what + ": parameter '" + p.name + "' is " +
                       std::string(c10::toString(p.value.scalar_type())) +
                       "; parameters are the fp32 master weights: call model.float() before "
                       "saving (autotune's --precision sets the compute dtype)");
    if (p.value.requires_grad()) n_params_ += p.value.numel();
  }
  if (n_params_ == 0) throw UsageError(what + " has no trainable parameters");
  block_contract_ = template_.hasattr("blocks") && template_.attr("blocks").isModule() &&
                    template_.find_method("embed") && template_.find_method("head");
  if (template_.hasattr("batch_keys")) {
    for (const auto& k : template_.attr("batch_keys").toListRef())
      batch_keys_.push_back(k.toStringRef());
    for (const auto& k : batch_keys_)
      if (!data_->train_file().find(k))
        throw UsageError(what + " reads batch['" + k + "'], which " + data_->train_file().path() +
                         " lacks (it has: " + tensor_names() +
                         "); write that tensor into the "
                         "data file");
  }
  // One sample through forward in eval mode: a name the forward needs but the data lacks, or a
  // forward that does not return a scalar loss, is said now rather than in the first trial.
  torch::NoGradGuard no_grad;
  torch::jit::Module probe = template_.clone();
  probe.eval();
  const Batch one = data_->val_batch(0, 1);
  torch::Tensor loss;
  try {
    loss = probe.forward({to_dict(one)}).toTensor();
  } catch (const std::exception& e) {
    // The interpreter's message ends in the Python error it raised ("RuntimeError: KeyError: z").
    std::string last;
    std::istringstream lines(e.what());
    for (std::string line; std::getline(lines, line);)
      if (!line.empty()) last = line;
    const auto key = last.find("KeyError: ");
    if (key != std::string::npos)
      throw UsageError(what + " reads batch['" + last.substr(key + 10) + "'], which " +
                       data_->train_file().path() + " lacks (it has: " + tensor_names() +
                       "); write that tensor into the data file");
    throw UsageError(what + ": forward failed on one sample of " + data_->train_file().path() +
                     " (" + last.substr(0, 300) +
                     "); check the tensor names and shapes the model reads (docs/MODELS.md)");
  }
  if (loss.dim() != 0 || !loss.is_floating_point())
    throw UsageError(what +
                     ": forward must return the mean loss as a scalar float tensor; it "
                     "returned shape " +
                     c10::str(loss.sizes()));
  if (block_contract_) {
    // head(blocks(embed(batch))) must be forward(batch), or checkpointing would train another
    // model than the user's.
    torch::Tensor x = probe.run_method("embed", to_dict(one)).toTensor();
    for (auto block : probe.attr("blocks").toModule().children()) x = block.forward({x}).toTensor();
    const torch::Tensor driven = probe.run_method("head", x, to_dict(one)).toTensor();
    if (!torch::allclose(driven, loss, 1e-5, 1e-6))
      throw UsageError(what + ": head(blocks(embed(batch))) gives loss " +
                       std::to_string(driven.item<double>()) + " but forward gives " +
                       std::to_string(loss.item<double>()) +
                       "; make forward run exactly embed, each of blocks, head (docs/MODELS.md)");
  }
}

nlohmann::json TorchScriptWorkload::config() const {
  return {{"workload", "torchscript"},
          {"model",
           {{"path", path_},
            {"name", name_},
            {"file_hash", file_hash_},
            {"parameters", n_params_},
            {"block_contract", block_contract_}}},
          {"data", data_->config()}};
}

void TorchScriptWorkload::validate(const Plan& plan) const {
  if (plan.seq_len || plan.d_model)
    throw UsageError("model " + path_ +
                     " is a TorchScript module: autotune cannot change its sequence length or "
                     "width; drop --seq-len, --d-model and --allow-shrink");
  if (plan.checkpointing && !block_contract_)
    throw UsageError("model " + path_ +
                     ": activation checkpointing is unsupported for it (it does not follow the "
                     "block contract: a `blocks` ModuleList and embed/head methods, "
                     "docs/MODELS.md); drop --checkpointing on");
}

std::shared_ptr<TrainableModel> TorchScriptWorkload::build(const Plan& plan, torch::Device device,
                                                           uint64_t seed) {
  // The weights are the file's: every build starts from the same initialisation. Cloned outside
  // autograd (a recorded clone would make the parameters non-leaf), then marked trainable as the
  // file had them.
  torch::jit::Module m;
  {
    torch::NoGradGuard no_grad;
    m = template_.clone();
    m.to(device);
  }
  std::map<std::string, bool> trainable;
  for (const auto& p : template_.named_parameters(/*recurse=*/true))
    trainable[p.name] = p.value.requires_grad();
  for (const auto& p : m.named_parameters(/*recurse=*/true))
    p.value.requires_grad_(trainable.at(p.name));
  auto model = std::make_shared<ScriptedModel>(std::move(m), block_contract_);
  model->set_checkpointing(plan.checkpointing);
  return model;
}

Batch TorchScriptWorkload::train_batch(int64_t step, int64_t first, int64_t count, const Plan& plan,
                                       torch::Device device) {
  Batch b = data_->train_batch(seed_, static_cast<uint64_t>(step), first, count);
  return device == torch::kCPU ? b : b.to(device, /*non_blocking=*/true);
}

Batch TorchScriptWorkload::val_batch(int64_t first, int64_t count, const Plan& plan,
                                     torch::Device device) {
  Batch b = data_->val_batch(first, count);
  return device == torch::kCPU ? b : b.to(device, /*non_blocking=*/true);
}

EstimateTerms TorchScriptWorkload::estimate_terms(const Plan& plan) const {
  // Parameters, gradients and AdamW states are exact (the Estimator adds them from n_params);
  // what the opaque forward saves is measured by the probes.
  EstimateTerms e;
  e.n_params = n_params_;
  e.activations_known = false;
  e.terms.push_back({"batch", static_cast<double>(plan.micro_batch * data_->sample_bytes())});
  return e;
}

// ---- registry entry ----------------------------------------------------------------------------

bool is_torchscript_model(const std::string& model) {
  return fs::path(model).extension() == ".pt";
}

std::unique_ptr<Workload> make_torchscript_workload(const RunSpec& spec, const ModePolicy& policy) {
  if (spec.data.empty())
    throw UsageError("--model " + spec.model +
                     " needs --data FILE.safetensors: the named tensors its forward reads "
                     "(docs/MODELS.md)");
  const ReadMode mode = policy.pread_data ? ReadMode::pread : ReadMode::mmap;
  auto train = SafetensorsFile::open(spec.data, mode);
  std::shared_ptr<SafetensorsFile> val;
  if (!spec.val_data.empty()) val = SafetensorsFile::open(spec.val_data, mode);
  return std::make_unique<TorchScriptWorkload>(
      spec.model, std::make_shared<NamedTensorData>(std::move(train), std::move(val)), spec.seed);
}

}  // namespace autotune
