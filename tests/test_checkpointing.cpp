// Activation checkpointing recomputes each block in backward: same loss and gradients as without,
// also with dropout (the RNG state of the forward is replayed).
#include <gtest/gtest.h>

#include "autotune/gpt.h"
#include "models/precision.h"

using namespace autotune;

namespace {
struct Result {
  double loss;
  std::vector<torch::Tensor> grads;
};

Result run(bool checkpointing, double dropout, Precision precision = Precision::fp32) {
  GptConfig c = load_gpt_config("gpt-tiny");
  c.dropout = dropout;
  torch::manual_seed(5);
  GptModel model(c, checkpointing);
  model.train();
  torch::manual_seed(11);
  auto idx = torch::randint(0, c.vocab_size, {4, c.seq_len}, torch::kInt64);
  auto tgt = torch::randint(0, c.vocab_size, {4, c.seq_len}, torch::kInt64);
  torch::manual_seed(123);  // dropout masks start from here in both runs
  torch::Tensor loss;
  {
    AutocastScope autocast(torch::kCPU, precision);
    loss = model.loss({idx, tgt});
  }
  loss.backward();
  Result r{loss.item<double>(), {}};
  for (auto& p : model.parameters()) r.grads.push_back(p.grad().clone());
  return r;
}

void expect_same(const Result& a, const Result& b, double tol) {
  EXPECT_NEAR(a.loss, b.loss, tol * std::abs(a.loss));
  ASSERT_EQ(a.grads.size(), b.grads.size());
  double worst = 0;
  for (size_t i = 0; i < a.grads.size(); ++i) {
    double rel = (a.grads[i] - b.grads[i]).norm().item<double>() /
                 std::max(a.grads[i].norm().item<double>(), 1e-12);
    worst = std::max(worst, rel);
  }
  std::printf("loss %.6f vs %.6f, max relative gradient error %.2e\n", a.loss, b.loss, worst);
  EXPECT_LE(worst, tol);
}
}  // namespace

TEST(Checkpointing, SameLossAndGradients) {
  expect_same(run(false, 0.0), run(true, 0.0), 1e-5);
}

TEST(Checkpointing, SameWithDropout) {
  expect_same(run(false, 0.2), run(true, 0.2), 1e-5);
}

TEST(Checkpointing, DropoutReallyActs) {
  // Guards the test above: with dropout the loss differs from the no-dropout loss.
  EXPECT_GT(std::abs(run(false, 0.2).loss - run(false, 0.0).loss), 1e-4);
}

TEST(Checkpointing, SameUnderBf16Autocast) {
  // Recomputation re-enters the forward's autocast state: bf16 results match bf16 results.
  expect_same(run(false, 0.0, Precision::bf16), run(true, 0.0, Precision::bf16), 1e-5);
}
