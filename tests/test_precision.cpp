// Mixed precision: bf16 autocast really computes in bf16 and learns like fp32; fp16 with dynamic
// loss scaling runs and skips steps that overflow.
#include <ATen/autocast_mode.h>
#include <gtest/gtest.h>

#include "autotune/gpt_workload.h"
#include "autotune/trainer.h"
#include "models/precision.h"
#include "test_support.h"

namespace tu = autotune::testing;

using namespace autotune;

namespace {
std::unique_ptr<GptWorkload> tiny() {
  return std::make_unique<GptWorkload>(load_gpt_config("gpt-tiny"),
                                       TokenFile::open(tu::corpus_path()), 3);
}

double final_loss(Precision precision, int64_t steps) {
  auto w = tiny();
  Plan p;
  p.micro_batch = 8;
  p.grad_accum = 2;
  p.precision = precision;
  TrainOptions opt;
  opt.steps = steps;
  opt.eval_sequences = 32;
  opt.lr = 3e-3;
  return train(*w, p, opt).val_loss;
}
}  // namespace

TEST(Precision, Bf16ActivationsAreBf16) {
  auto w = tiny();
  Plan p;
  p.micro_batch = 2;
  auto model = std::dynamic_pointer_cast<GptModel>(w->build(p, torch::kCPU, 1));
  ASSERT_TRUE(model);
  auto batch = w->train_batch(0, 0, 2, p, torch::kCPU);
  torch::Tensor logits_fp32 = model->forward(batch.input());
  torch::Tensor logits_bf16;
  {
    AutocastScope autocast(torch::kCPU, Precision::bf16);
    logits_bf16 = model->forward(batch.input());
  }
  EXPECT_EQ(logits_fp32.scalar_type(), torch::kFloat32);
  EXPECT_EQ(logits_bf16.scalar_type(), torch::kBFloat16);
  // Master weights stay fp32.
  for (auto& param : model->parameters()) EXPECT_EQ(param.scalar_type(), torch::kFloat32);
  // Autocast is off again after the scope.
  EXPECT_FALSE(at::autocast::is_autocast_enabled(at::kCPU));
}

TEST(Precision, Bf16LossWithinTwoPercentOfFp32) {
  const double fp32 = final_loss(Precision::fp32, 30);
  const double bf16 = final_loss(Precision::bf16, 30);
  std::printf("val loss after 30 steps: fp32 %.4f, bf16 %.4f (%.2f%%)\n", fp32, bf16,
              100.0 * std::abs(bf16 - fp32) / fp32);
  EXPECT_LE(std::abs(bf16 - fp32) / fp32, 0.02);
}

TEST(Precision, Fp16WithLossScalingTrains) {
  const double fp32 = final_loss(Precision::fp32, 30);
  const double fp16 = final_loss(Precision::fp16, 30);
  std::printf("val loss after 30 steps: fp32 %.4f, fp16 %.4f\n", fp32, fp16);
  EXPECT_TRUE(std::isfinite(fp16));
  EXPECT_LE(std::abs(fp16 - fp32) / fp32, 0.05);
}

TEST(Precision, LossScalerSkipsOverflowAndBacksOff) {
  LossScaler scaler(torch::kCPU, true, 1024.0);
  auto p = torch::ones({3}, torch::requires_grad());
  p.mutable_grad() = torch::tensor({1.0f, std::numeric_limits<float>::infinity(), 2.0f});
  EXPECT_FALSE(scaler.unscale_and_check({p}));
  // The scale changes only when the step is certain (an OOM before it re-runs the step).
  EXPECT_DOUBLE_EQ(scaler.scale(), 1024.0);
  scaler.update();
  EXPECT_DOUBLE_EQ(scaler.scale(), 512.0);
  p.mutable_grad() = torch::tensor({1024.0f, 2048.0f, 0.0f});
  EXPECT_TRUE(scaler.unscale_and_check({p}));
  EXPECT_TRUE(torch::allclose(p.grad(), torch::tensor({2.0f, 4.0f, 0.0f})));
  scaler.update();
  EXPECT_DOUBLE_EQ(scaler.scale(), 512.0) << "one finite step does not grow it";
}
