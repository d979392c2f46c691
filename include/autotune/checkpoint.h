// Training checkpoints: model, optimizer, step, RNG, loss scale and plan in one torch archive,
// written atomically as run_dir/checkpoints/step_NNNNNNNN.pt; the newest K are kept.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "autotune/plan.h"

namespace autotune {

struct CheckpointMeta {
  int64_t step = 0;  // optimizer steps completed
  Plan plan;
  uint64_t seed = 0;
  nlohmann::json workload;  // workload config, to refuse resuming a different model
  // The training device: an accelerator's generator (its dropout masks) is saved beside the
  // CPU's, so a resume there is exact too.
  torch::Device device = torch::kCPU;
};

std::string checkpoint_dir(const std::string& run_dir);

// Throws RuntimeError (the previous checkpoints stay intact) on any failure.
std::string save_checkpoint(const std::string& run_dir, const CheckpointMeta& meta,
                            torch::nn::Module& model, torch::optim::Optimizer& optimizer,
                            const torch::Tensor& loss_scaler_state, int keep);

// Checkpoint files of run_dir, oldest first.
std::vector<std::string> list_checkpoints(const std::string& run_dir);

// Reads only the metadata (for --resume planning); nullopt if the file is unreadable.
std::optional<CheckpointMeta> read_checkpoint_meta(const std::string& path);

// Loads state into `model`/`optimizer` and returns the metadata plus the loss scaler state; the
// RNG of the CPU and, when it is an accelerator, of `device` are restored.
CheckpointMeta load_checkpoint(const std::string& path, torch::nn::Module& model,
                               torch::optim::Optimizer& optimizer, torch::Tensor* loss_scaler_state,
                               torch::Device device = torch::kCPU);

}  // namespace autotune
