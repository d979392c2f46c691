#include "autotune/plan.h"

#include <sstream>

#include "autotune/errors.h"

namespace autotune {

std::string to_string(Precision p) {
  switch (p) {
    case Precision::fp32:
      return "fp32";
    case Precision::bf16:
      return "bf16";
    case Precision::fp16:
      return "fp16";
  }
  return "?";
}

Precision parse_precision(const std::string& s) {
  if (s == "fp32") return Precision::fp32;
  if (s == "bf16") return Precision::bf16;
  if (s == "fp16") return Precision::fp16;
  throw UsageError("invalid precision '" + s + "': use fp32, bf16 or fp16");
}

std::string Plan::describe() const {
  std::ostringstream o;
  o << "micro_batch=" << micro_batch << " grad_accum=" << grad_accum << " " << to_string(precision)
    << " checkpointing=" << (checkpointing ? "on" : "off");
  if (seq_len) o << " seq_len=" << seq_len;
  if (d_model) o << " d_model=" << d_model;
  if (optimizer_shards > 1) o << " optimizer_shards=" << optimizer_shards;
  return o.str();
}

bool Plan::operator==(const Plan& o) const {
  return micro_batch == o.micro_batch && grad_accum == o.grad_accum && precision == o.precision &&
         checkpointing == o.checkpointing && seq_len == o.seq_len && d_model == o.d_model &&
         eval_batch == o.eval_batch && optimizer_shards == o.optimizer_shards;
}

void to_json(nlohmann::json& j, const Plan& p) {
  j = nlohmann::json{{"micro_batch", p.micro_batch},
                     {"grad_accum", p.grad_accum},
                     {"precision", to_string(p.precision)},
                     {"checkpointing", p.checkpointing},
                     {"seq_len", p.seq_len},
                     {"d_model", p.d_model},
                     {"eval_batch", p.eval_batch}};
  if (p.optimizer_shards != 1) j["optimizer_shards"] = p.optimizer_shards;  // older files lack it
}

void from_json(const nlohmann::json& j, Plan& p) {
  p.micro_batch = j.at("micro_batch").get<int64_t>();
  p.grad_accum = j.at("grad_accum").get<int64_t>();
  p.precision = parse_precision(j.at("precision").get<std::string>());
  p.checkpointing = j.at("checkpointing").get<bool>();
  p.seq_len = j.value("seq_len", int64_t{0});
  p.d_model = j.value("d_model", int64_t{0});
  p.eval_batch = j.value("eval_batch", int64_t{0});
  p.optimizer_shards = j.value("optimizer_shards", int64_t{1});
  if (p.micro_batch < 1 || p.grad_accum < 1 || p.seq_len < 0 || p.d_model < 0 || p.eval_batch < 0 ||
      p.optimizer_shards < 1)
    throw UsageError("plan has a non-positive micro_batch/grad_accum or a negative size");
}

}  // namespace autotune
