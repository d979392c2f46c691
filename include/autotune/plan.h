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

  int64_t global_batch() const { return micro_batch * grad_accum; }
  std::string describe() const;  // "mb=8 ga=4 bf16 ckpt=off T=256 d=384"
  bool operator==(const Plan& o) const;
  bool operator!=(const Plan& o) const { return !(*this == o); }
};

void to_json(nlohmann::json& j, const Plan& p);
void from_json(const nlohmann::json& j, Plan& p);  // throws nlohmann::json::exception on bad types

}  // namespace autotune
