// Training checkpoints: model, optimizer, step, RNG, loss scale and plan in one torch archive,
// written atomically as run_dir/checkpoints/step_NNNNNNNN.pt; the newest K are kept.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "autotune/errors.h"
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
  // Ranks of the run that wrote it. With plan.optimizer_shards > 1 each rank r > 0 keeps its
  // AdamW states in optimizer_shard_path(run_dir, step, r), written before this file.
  int world_size = 1;
};

std::string checkpoint_dir(const std::string& run_dir);

// The lines of a --resume that cannot start: no run directory, or none of its checkpoints is
// complete. The command line's checks and the trainer's (a library caller's) throw the same.
UsageError resume_needs_run_dir();
UsageError no_complete_checkpoint(const std::string& run_dir);

// Throws RuntimeError (the previous checkpoints stay intact) on any failure.
std::string save_checkpoint(const std::string& run_dir, const CheckpointMeta& meta,
                            torch::nn::Module& model, torch::optim::Optimizer& optimizer,
                            const torch::Tensor& loss_scaler_state, int keep);

// ZeRO-1: rank `rank`'s optimizer states at `step`, beside the checkpoint of that step.
std::string optimizer_shard_path(const std::string& run_dir, int64_t step, int rank);
// Written atomically by every rank but the checkpoint's writer, before the writer's checkpoint
// (a checkpoint whose shards are not all there is not resumed). Throws RuntimeError.
void save_optimizer_shard(const std::string& run_dir, int64_t step, int rank,
                          torch::optim::Optimizer& optimizer);

// Checkpoint files of run_dir, oldest first.
std::vector<std::string> list_checkpoints(const std::string& run_dir);

// Reads only the metadata (for --resume planning); nullopt if the file is unreadable, with the
// reason in *why when given.
std::optional<CheckpointMeta> read_checkpoint_meta(const std::string& path,
                                                   std::string* why = nullptr);

// Loads state into `model`/`optimizer` and returns the metadata plus the loss scaler state; the
// RNG of the CPU and, when it is an accelerator, of `device` are restored. `optimizer_path`: the
// optimizer states come from that shard file instead (ZeRO-1, ranks > 0).
CheckpointMeta load_checkpoint(const std::string& path, torch::nn::Module& model,
                               torch::optim::Optimizer& optimizer, torch::Tensor* loss_scaler_state,
                               torch::Device device = torch::kCPU,
                               const std::string& optimizer_path = "");

}  // namespace autotune
