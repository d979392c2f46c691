// Plan: the single value handed from the tuner to the trainer.
// Invariant: micro_batch * grad_accum == the global batch the user asked for.
#pragma once
#include <cstdint>
#include <string>

#include <nlohmann/json.hpp>

namespace autotune {

enum class Precision { fp32, bf16, fp16 };

std::string to_string(Precision p);
Precision parse_precision(const std::string& s);  // throws UsageError

struct Plan {
  int64_t micro_batch = 1;  // sequences per forward/backward
  int64_t grad_accum = 1;   // micro-batches per optimizer step
  Precision precision = Precision::fp32;
  bool checkpointing = false;  // recompute each block in backward
  int64_t seq_len = 0;         // tokens per sequence (0: the workload's default)
  int64_t d_model = 0;         // model width (0: the workload's default)
  int64_t eval_batch = 0;      // sequences per eval forward (0: micro_batch)
  int64_t eval_batch_or_micro_batch() const { return eval_batch ? eval_batch : micro_batch; }
  // Data parallel, ZeRO stage 1: the AdamW states are split over this many ranks (1: every rank
  // keeps all of them). Each rank updates the parameters whose states it holds, then sends them
  // to the others. 1 or the world size.
  int64_t optimizer_shards = 1;

  int64_t global_batch() const { return micro_batch * grad_accum; }
  std::string describe() const;  // "micro_batch=8 grad_accum=4 bf16 checkpointing=off ..."
  bool operator==(const Plan& o) const;
  bool operator!=(const Plan& o) const { return !(*this == o); }
};

void to_json(nlohmann::json& j, const Plan& p);
void from_json(const nlohmann::json& j, Plan& p);  // throws nlohmann::json::exception on bad types

}  // namespace autotune
