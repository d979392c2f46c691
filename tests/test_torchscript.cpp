// A user's own model: TorchScript fixtures exported by tests/fixtures/torchscript_fixture.py with
// the project's venv torch during the test (it fails loudly when that Python is missing), trained
// through the same Workload interface as the GPT.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "autotune/checkpoint.h"
#include "autotune/errors.h"
#include "autotune/memory.h"
#include "autotune/torchscript_workload.h"
#include "autotune/trainer.h"
#include "autotune/tuner.h"
#include "memory/cpu_allocator.h"
#include "models/precision.h"
#include "test_support.h"

namespace tu = autotune::testing;
using namespace autotune;

namespace {

const std::string& fixtures() {
  static const std::string dir = [] {
    const std::string d = tu::temp_dir("torchscript");
    auto r = tu::run_python(
        {std::string(AUTOTUNE_SOURCE_DIR) + "/tests/fixtures/torchscript_fixture.py", d});
    if (r.exit_code != 0) throw std::runtime_error("fixture export failed: " + r.err);
    return d;
  }();
  return dir;
}

std::unique_ptr<TorchScriptWorkload> workload(const std::string& model) {
  auto data = std::make_shared<NamedTensorData>(
      SafetensorsFile::open(fixtures() + "/data.safetensors"), nullptr);
  return std::make_unique<TorchScriptWorkload>(fixtures() + "/" + model + ".pt", data, 5);
}

std::vector<torch::Tensor> grads_of(TrainableModel& m) {
  std::vector<torch::Tensor> g;
  for (auto& p : m.parameters()) g.push_back(p.grad().clone());
  return g;
}

double max_rel_error(const std::vector<torch::Tensor>& a, const std::vector<torch::Tensor>& b) {
  double worst = 0;
  for (size_t i = 0; i < a.size(); ++i)
    worst = std::max(
        worst, (a[i] - b[i]).norm().item<double>() / std::max(a[i].norm().item<double>(), 1e-12));
  return worst;
}

std::vector<torch::Tensor> checkpoint_params(Workload& w, const Plan& p, const std::string& file) {
  auto model = w.build(p, torch::kCPU, 1);
  torch::serialize::InputArchive archive, model_archive;
  archive.load_from(file);
  archive.read("model", model_archive);
  model->load(model_archive);
  std::vector<torch::Tensor> out;
  for (auto& t : model->parameters()) out.push_back(t.detach().clone());
  return out;
}

}  // namespace

TEST(TorchScript, LoadsWithItsParametersAndItsBlockContract) {
  auto c = workload("contract");
  EXPECT_TRUE(c->block_contract());
  EXPECT_TRUE(c->knobs().checkpointing);
  EXPECT_FALSE(c->knobs().seq_len);
  EXPECT_FALSE(c->knobs().width);
  // inp 16x32+32, 3 blocks of (ln 2x32, fc 32x64+64, proj 64x32+32), out 32x4+4
  const int64_t per_block = 64 + 32 * 64 + 64 + 64 * 32 + 32;
  EXPECT_EQ(c->n_params(), 16 * 32 + 32 + 3 * per_block + 32 * 4 + 4);
  auto model = c->build(Plan{}, torch::kCPU, 1);
  int64_t n = 0;
  for (const auto& p : model->parameters()) n += p.numel();
  EXPECT_EQ(n, c->n_params()) << "every parameter reaches the optimizer";
  EXPECT_EQ(model->decay_parameters().size(), 1u + 3 * 2 + 1) << "the matrices decay";
}

TEST(TorchScript, MicroBatchesGiveTheGradientsOfOneBigBatch) {
  auto w = workload("contract_nodrop");
  const int64_t global = 8;
  Plan big;
  big.micro_batch = global;
  auto model = w->build(big, torch::kCPU, 1);
  model->train();
  model->loss(w->train_batch(2, 0, global, big, torch::kCPU)).backward();
  const auto reference = grads_of(*model);
  for (int64_t k : {2, 4, 8}) {
    model->zero_grad();
    const int64_t b = global / k;
    Plan p = big;
    p.micro_batch = b;
    p.grad_accum = k;
    for (int64_t m = 0; m < k; ++m)
      (model->loss(w->train_batch(2, m * b, b, p, torch::kCPU)) / static_cast<double>(k))
          .backward();
    const double err = max_rel_error(reference, grads_of(*model));
    std::printf("grad_accum %lld: max relative gradient error %.2e\n", static_cast<long long>(k),
                err);
    EXPECT_LE(err, 1e-5) << "grad_accum " << k;
  }
}

TEST(TorchScript, CheckpointingGivesTheSameLossAndGradientsWithDropout) {
  auto w = workload("contract");
  Plan p;
  p.micro_batch = 6;
  auto run = [&](bool ckpt) {
    Plan q = p;
    q.checkpointing = ckpt;
    auto model = w->build(q, torch::kCPU, 1);
    model->train();
    torch::manual_seed(77);  // the same dropout masks in both runs
    auto loss = model->loss(w->train_batch(0, 0, 6, q, torch::kCPU));
    loss.backward();
    return std::make_pair(loss.item<double>(), grads_of(*model));
  };
  const auto [loss_off, grads_off] = run(false);
  const auto [loss_on, grads_on] = run(true);
  EXPECT_NEAR(loss_on, loss_off, 1e-6 * std::abs(loss_off));
  EXPECT_LE(max_rel_error(grads_off, grads_on), 1e-6);
  // Guards the above: dropout really acts (another seed, another loss).
  auto model = w->build(p, torch::kCPU, 1);
  model->train();
  torch::manual_seed(78);
  EXPECT_GT(
      std::abs(model->loss(w->train_batch(0, 0, 6, p, torch::kCPU)).item<double>() - loss_off),
      1e-6);
}

TEST(TorchScript, Bf16AutocastReachesTheOpsTheInterpreterRuns) {
  auto w = workload("contract");
  auto module = torch::jit::load(fixtures() + "/contract.pt");
  const Batch b = w->val_batch(0, 2, Plan{}, torch::kCPU);
  c10::Dict<std::string, torch::Tensor> dict;
  for (const auto& [name, t] : b.tensors) dict.insert(name, t);
  EXPECT_EQ(module.run_method("hidden_dtype", dict).toInt(), static_cast<int64_t>(torch::kFloat32));
  {
    AutocastScope autocast(torch::kCPU, Precision::bf16);
    EXPECT_EQ(module.run_method("hidden_dtype", dict).toInt(),
              static_cast<int64_t>(torch::kBFloat16))
        << "activations inside the TorchScript module must be bf16 under autocast";
  }
}

TEST(TorchScript, AModelWithoutTheBlockContractHasNoCheckpointingAndTheSearchSkipsIt) {
  auto w = workload("plain");
  EXPECT_FALSE(w->block_contract());
  EXPECT_FALSE(w->knobs().checkpointing);
  Plan p;
  p.checkpointing = true;
  try {
    w->validate(p);
    ADD_FAILURE() << "checkpointing accepted for a model without the block contract";
  } catch (const UsageError& e) {
    EXPECT_NE(std::string(e.what()).find("unsupported"), std::string::npos) << e.what();
  }
  MemoryMeter meter(torch::kCPU);
  TunerRequest r;
  r.global_batch = 8;
  r.budget_bytes = r.usable_bytes = r.probe.usable_bytes = meter.baseline_bytes() + (64u << 20);
  const TunerResult res = tune(*w, r, meter);
  ASSERT_TRUE(res.plan);
  for (const auto& t : res.trials) EXPECT_FALSE(t.plan.checkpointing) << t.plan.describe();
}

// The tuner has no analytic activations for an opaque model: it starts small, fits its line from
// two measured trials, predicts, confirms; the plan it picks fits under the cap.
TEST(TorchScript, TheTunerTunesItUnchangedAndThePlanFitsUnderTheCap) {
  auto w = workload("contract");
  MemoryMeter meter(torch::kCPU);
  Plan one;
  one.micro_batch = 1;
  ProbeOptions warm;
  warm.usable_bytes = UINT64_MAX;
  warm.measured_steps = 0;
  run_trial(*w, one, warm, meter);  // LibTorch's one-time growth stays out of the figures
  meter.release_cache();
  meter.remeasure_baseline();
  TunerRequest r;
  r.global_batch = 32;
  r.budget_bytes = meter.baseline_bytes() + (48u << 20);
  r.usable_bytes = r.probe.usable_bytes = r.budget_bytes;
  cpu_alloc::set_cap(static_cast<int64_t>(r.usable_bytes - meter.baseline_bytes()));
  const TunerResult res = tune(*w, r, meter);
  ASSERT_TRUE(res.plan) << res.infeasible_message;
  ASSERT_GE(res.trials.size(), 2u);
  EXPECT_EQ(res.trials[0].plan.micro_batch, 1)
      << "no activation estimate: the first trial is small";
  for (const auto& t : res.trials)
    if (t.fits) EXPECT_LE(t.peak_bytes, r.usable_bytes);
  TrainOptions opt;
  opt.steps = 3;
  opt.eval_sequences = 4;
  opt.recover_oom = false;  // a refusal would fail the test instead of being recovered
  EXPECT_NO_THROW(train(*w, *res.plan, opt));
  cpu_alloc::set_cap(std::nullopt);
}

TEST(TorchScript, ResumeIsExact) {
  auto w = workload("contract");
  Plan p;
  p.micro_batch = 4;
  p.grad_accum = 2;
  TrainOptions opt;
  opt.eval_sequences = 0;
  opt.steps = 6;
  const std::string straight = tu::temp_dir("ts-straight"), split = tu::temp_dir("ts-split");
  opt.run_dir = straight;
  train(*w, p, opt);
  std::atomic<int> stop{0};
  struct StopAt : TrainObserver {
    std::atomic<int>* flag;
    void on_step(const StepStats& s) override {
      if (s.step == 3) flag->store(15);
    }
  } stopper;
  stopper.flag = &stop;
  opt.run_dir = split;
  opt.stop_signal = &stop;
  EXPECT_EQ(train(*w, p, opt, {&stopper}).steps_done, 3);
  stop = 0;
  opt.resume = true;
  EXPECT_EQ(train(*w, p, opt).first_step, 3);
  const auto a = checkpoint_params(*w, p, straight + "/checkpoints/step_00000006.pt");
  const auto b = checkpoint_params(*w, p, split + "/checkpoints/step_00000006.pt");
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) EXPECT_TRUE(torch::equal(a[i], b[i])) << "parameter " << i;
}

TEST(TorchScript, TrainedWeightsGoBackIntoPython) {
  const std::string dir = tu::temp_dir("ts-export");
  auto r =
      tu::run_autotune({"train", "--model", fixtures() + "/contract.pt", "--data",
                        fixtures() + "/data.safetensors", "--device", "cpu", "--micro-batch", "8",
                        "--global-batch", "16", "--steps", "5", "--run-dir", dir, "--json"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const std::string trained = dir + "/model.pt";
  auto py =
      tu::run_python({std::string(AUTOTUNE_SOURCE_DIR) + "/tests/fixtures/torchscript_roundtrip.py",
                      trained, fixtures() + "/contract.pt", fixtures() + "/data.safetensors"});
  ASSERT_EQ(py.exit_code, 0) << py.err;
  const auto j = nlohmann::json::parse(py.out.substr(py.out.find('{')));
  EXPECT_GT(j.at("max_weight_change").get<double>(), 1e-5) << "training moved the weights";
  // The same loss from the C++ side: the trained module on validation sample 0, in eval mode.
  auto module = torch::jit::load(trained);
  module.eval();
  auto w = workload("contract");
  const Batch b = w->val_batch(0, 1, Plan{}, torch::kCPU);
  c10::Dict<std::string, torch::Tensor> dict;
  for (const auto& [name, t] : b.tensors) dict.insert(name, t);
  torch::NoGradGuard no_grad;
  const double loss = module.forward({dict}).toTensor().item<double>();
  EXPECT_NEAR(j.at("val0_loss").get<double>(), loss, 1e-6 * std::abs(loss));
}

TEST(TorchScript, ANameTheForwardNeedsButTheDataLacksIsRefusedWithItsLine) {
  try {
    workload("needs_z");
    ADD_FAILURE() << "a model reading batch['z'] loaded on data without z";
  } catch (const UsageError& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("z"), std::string::npos) << msg;
    EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
  }
  // The binary says it in one line and exits 2.
  auto r = tu::run_autotune({"train", "--model", fixtures() + "/needs_z.pt", "--data",
                             fixtures() + "/data.safetensors", "--device", "cpu", "--steps", "1"});
  EXPECT_EQ(r.exit_code, 2) << r.err;
  // Declared names are checked without running anything.
  auto c = tu::run_autotune({"train", "--model", fixtures() + "/contract.pt", "--device", "cpu"});
  EXPECT_EQ(c.exit_code, 2);
  EXPECT_NE(c.err.find("--data FILE.safetensors"), std::string::npos) << c.err;
}
