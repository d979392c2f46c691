// Plan: the single value handed from the tuner to the trainer, and the table of its knobs.
// Invariant: micro_batch * grad_accum == the global batch the user asked for.
//
// Every knob of the plan is declared once, in kKnobs below: its flag and help, its pin, its plan
// field and JSON key, its validation and whether it is part of a profile's fingerprint. The CLI,
// RunSpec and TunerRequest (through Pins), the fingerprint, the plan's JSON and description, the
// settings table and the report read that declaration; docs/ARCHITECTURE.md says how to add one.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

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
  // Data parallel, ZeRO stage 1: the AdamW states are split over this many ranks (1: every rank
  // keeps all of them). Each rank updates the parameters whose states it holds, then sends them
  // to the others. 1 or the world size.
  int64_t optimizer_shards = 1;
  int64_t eval_batch = 0;  // sequences per eval forward (0: micro_batch)
  int64_t eval_batch_or_micro_batch() const { return eval_batch ? eval_batch : micro_batch; }
  // Script mode: the command's DataLoader workers (-1: the script's own number). Lowered only
  // where memory refuses a plan with more: they change no math.
  int64_t num_workers = -1;

  int64_t global_batch() const { return micro_batch * grad_accum; }
  std::string describe() const;  // "micro_batch=8 grad_accum=4 bf16 checkpointing=off ..."
  bool operator==(const Plan& o) const;
  bool operator!=(const Plan& o) const { return !(*this == o); }
};

// The knobs a user fixed (flags, a preset); the tuner keeps them. nullopt: free.
struct Pins {
  std::optional<int64_t> micro_batch, grad_accum;
  std::optional<Precision> precision;
  std::optional<bool> checkpointing;
  std::optional<int64_t> seq_len, d_model;
  std::optional<bool> shard_optimizer;  // ZeRO-1 over the ranks: Plan::optimizer_shards = world
  std::optional<int64_t> eval_batch;
  std::optional<int64_t> num_workers;  // no flag: the script declares it (autotune.plan)
};

// How Plan::describe shows a knob: `key=value`, the value alone, only when it differs from
// Plan{}'s, or not at all.
enum class Shown { always, bare, unless_default, never };

// One knob: a pin of type P in Pins and a field of type F in Plan (the same type, except where
// the pin is a switch whose effect sets the field, as --shard-optimizer sets optimizer_shards).
template <typename P, typename F>
struct Knob {
  const char* key;  // the pin's JSON key in the fingerprint; the plan field's too, unless field_key
  std::optional<P> Pins::*pin;
  F Plan::*field;
  const char* flag = "";  // on the command line, without "--"
  const char* help = "";  // for --help, with the default
  const char* field_key = nullptr;
  int64_t min_value = 0;           // counts: the smallest valid plan value (pins: 1)
  bool required_in_json = false;   // else a file without it reads Plan{}'s value
  bool written_at_default = true;  // else left out of the plan's JSON at Plan{}'s value
  bool batch_split = false;        // micro_batch/grad_accum: set together, keeping the batch
  bool in_fingerprint = true;      // a pin of it is part of a profile's fingerprint
  Shown shown = Shown::unless_default;

  const char* json_key() const { return field_key ? field_key : key; }
  // The pin sets the field directly (not a batch split, not a switch with its own effect).
  static constexpr bool kDirect = std::is_same_v<P, F>;

  // Builders, so each row of kKnobs names what it sets.
  constexpr Knob cli(const char* f, const char* h) const {
    Knob k = *this;
    k.flag = f;
    k.help = h;
    return k;
  }
  constexpr Knob json_as(const char* name) const {
    Knob k = *this;
    k.field_key = name;
    return k;
  }
  constexpr Knob at_least(int64_t v) const {
    Knob k = *this;
    k.min_value = v;
    return k;
  }
  constexpr Knob required() const {
    Knob k = *this;
    k.required_in_json = true;
    return k;
  }
  constexpr Knob omitted_at_default() const {
    Knob k = *this;
    k.written_at_default = false;
    return k;
  }
  constexpr Knob splits_batch() const {
    Knob k = *this;
    k.batch_split = true;
    return k;
  }
  constexpr Knob not_in_fingerprint() const {
    Knob k = *this;
    k.in_fingerprint = false;
    return k;
  }
  constexpr Knob show(Shown s) const {
    Knob k = *this;
    k.shown = s;
    return k;
  }
};

template <typename P, typename F>
constexpr Knob<P, F> knob(const char* key, std::optional<P> Pins::*pin, F Plan::*field) {
  return Knob<P, F>{key, pin, field};
}

// The table. Its order is the order of Plan::describe, --help and the settings table.
inline const auto kKnobs = std::make_tuple(
    knob("micro_batch", &Pins::micro_batch, &Plan::micro_batch)
        .cli("micro-batch", "sequences per forward/backward; default 8 (train)")
        .at_least(1)
        .required()
        .splits_batch()
        .show(Shown::always),
    knob("grad_accum", &Pins::grad_accum, &Plan::grad_accum)
        .cli("grad-accum", "micro-batches per optimizer step; default global / micro-batch")
        .at_least(1)
        .required()
        .splits_batch()
        .not_in_fingerprint()  // the global batch is: --grad-accum only splits it
        .show(Shown::always),
    knob("precision", &Pins::precision, &Plan::precision)
        .cli("precision", "fp32 | bf16 | fp16; default fp32 (train), searched (run, probe)")
        .required()
        .show(Shown::bare),
    knob("checkpointing", &Pins::checkpointing, &Plan::checkpointing)
        .cli("checkpointing", "on | off: recompute activations in backward; default off")
        .required()
        .show(Shown::always),
    knob("seq_len", &Pins::seq_len, &Plan::seq_len)
        .cli("seq-len", "tokens per sequence; default the model's"),
    knob("d_model", &Pins::d_model, &Plan::d_model)
        .cli(
            "d-model",
            "model width (a plan a profile holds after --allow-shrink width); default the model's"),
    knob("shard_optimizer", &Pins::shard_optimizer, &Plan::optimizer_shards)
        .cli("shard-optimizer",
             "on | off: split the AdamW states over the ranks (ZeRO-1); default searched with "
             "--nproc")
        .json_as("optimizer_shards")
        .at_least(1)
        .omitted_at_default(),  // files of one process stay as they were before ZeRO-1
    knob("eval_batch", &Pins::eval_batch, &Plan::eval_batch)
        .cli("eval-batch", "sequences per evaluation forward; default the micro-batch")
        .show(Shown::never),
    knob("num_workers", &Pins::num_workers, &Plan::num_workers).at_least(-1).omitted_at_default());

// Calls f(knob) for each row of kKnobs, in order.
template <typename Fn>
void for_each_knob(Fn&& f) {
  std::apply([&](const auto&... k) { (f(k), ...); }, kKnobs);
}

// A knob's value as JSON (a precision as its name) and as text (a switch as on/off).
inline nlohmann::json knob_json(int64_t v) {
  return v;
}
inline nlohmann::json knob_json(bool v) {
  return v;
}
inline nlohmann::json knob_json(Precision v) {
  return to_string(v);
}
inline std::string knob_text(int64_t v) {
  return std::to_string(v);
}
inline std::string knob_text(bool v) {
  return v ? "on" : "off";
}
inline std::string knob_text(Precision v) {
  return to_string(v);
}

// The pins as the fingerprint holds them: {"micro_batch": 8, "precision": "bf16", ...}.
nlohmann::json pins_json(const Pins& pins);

// Sets each plan knob a pin fixes, except the batch split (micro_batch x grad_accum, which its
// caller splits keeping the global batch) and switches with an effect of their own
// (shard_optimizer). `overridden`, when given, gets "precision (--precision)" per knob set.
void apply_pins(const Pins& pins, Plan& plan, std::vector<std::string>* overridden = nullptr);

// The plan's knobs as (key, value) rows, in the table's order, for the settings table.
std::vector<std::pair<std::string, std::string>> plan_rows(const Plan& plan);

void to_json(nlohmann::json& j, const Plan& p);
void from_json(const nlohmann::json& j, Plan& p);  // throws nlohmann::json::exception on bad types

}  // namespace autotune
