// RunSpec: everything the user asked for, validated in one place. The first value of the data
// flow: RunSpec -> tuner -> Plan -> trainer -> RunSummary / Profile.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "autotune/plan.h"

namespace autotune {

enum class Mode { auto_, normal, low, ultra_low };
std::string to_string(Mode m);
// The inverse of to_string; nullopt for anything else (callers name their flag or field).
std::optional<Mode> parse_mode(const std::string& s);

inline constexpr int64_t kDefaultGlobalBatch = 32;  // sequences per optimizer step

// Its pins (micro_batch, precision, ...: the knobs of kKnobs, plan.h) come from Pins.
struct RunSpec : Pins {
  std::string command = "run";     // run | probe | train | estimate | trial
  std::string command_line;        // as typed, for "run it again" hints
  std::vector<std::string> flags;  // as typed after the command: a trial process gets the same
  // Script mode: the user's training command after `--` (empty: a built-in workload or --model).
  std::vector<std::string> script;
  std::string model = "gpt-mini";  // preset name or JSON file
  std::string data;                // token or safetensors file (default: data/corpus.tok)
  bool model_given = false, data_given = false;  // on the command line (train --profile fills them)
  std::string val_data;                          // validation file (default: from `data`)
  std::string device = "auto";          // auto | cpu | cuda[:N] | any accelerator LibTorch knows
  std::string budget_text;              // as given ("10G"); empty: no budget
  std::string host_budget_text;         // --host-budget (accelerator runs); empty: derived
  std::optional<int64_t> global_batch;  // sequences per optimizer step (kDefaultGlobalBatch)
  std::optional<int64_t> batch_tokens;  // alternative to global_batch, in tokens

  int64_t steps = 200;
  uint64_t seed = 1337;
  double lr = 1e-3;
  int64_t eval_every = 0;
  int64_t eval_sequences = 64;
  int64_t log_every = 10;
  std::string run_dir;  // checkpoints and the memory timeline
  int64_t checkpoint_every = 0;
  bool resume = false;
  bool resume_auto = false;  // --resume auto: fresh when the run dir holds no checkpoint
  bool quiet = false, verbose = false;

  std::string profile_dir = "profiles";
  std::string profile_file;  // --profile FILE
  Mode mode = Mode::auto_;
  std::string preset;
  bool preset_start_small = false;     // from --preset: start the search at the smallest batch
  int64_t preset_max_micro_batch = 0;  // from --preset: 0 = no bound
  std::vector<Precision> preset_precisions;  // from --preset: empty = fp32 and bf16
  int64_t log_every_memory = 0;              // memory line every N steps (0: 5 x log_every)
  std::string search = "model";              // model | power | halve
  bool allow_shrink_seq = false, allow_shrink_width = false;
  bool reprobe = false;
  bool require_profile_save = false;
  std::string margin_text = "2%";                 // safety margin below the budget
  bool margin_given = false, mode_given = false;  // given on the command line (beat a preset)
  bool json = false;
  // Data parallel: ranks this command starts on this host (--nproc); a launcher's WORLD_SIZE
  // makes this process one rank instead. The budget is per rank.
  int64_t nproc = 1;
  int64_t dist_timeout_s = 60;  // a collective waiting longer for the other ranks fails
  // Script mode: a command that reports no optimizer step for this long is stopped.
  int64_t step_timeout_s = 600;
};

// The global batch in sequences: --global-batch, or --batch-tokens / seq_len, or
// --micro-batch x --grad-accum, or kDefaultGlobalBatch. Throws UsageError when --batch-tokens does
// not divide.
int64_t resolve_global_batch(const RunSpec& spec, int64_t seq_len);

// Data parallel: each of `ranks` trains an equal share of the global batch. Throws UsageError
// naming the fix when it does not split.
void check_splits_over_ranks(int64_t global_batch, int64_t ranks);

// The effective batch of all `world` ranks together (resolve_global_batch at `seq_len`), checked
// against the flags that split it: it splits over the ranks, --micro-batch divides one rank's
// share, and --shard-optimizer on has ranks to split over. Throws UsageError naming the fix. The
// plan's micro_batch x grad_accum is one rank's share of it.
int64_t checked_global_batch(const RunSpec& spec, int64_t seq_len, int world);

// The batch split of a plan: --micro-batch or --grad-accum (`flag`, `value`) must divide the
// global batch (`batch`, one rank's share), which `batch_text` names ("--global-batch 64"). Throws
// UsageError naming the fix.
void check_divides_batch(const std::string& flag, int64_t value, int64_t batch,
                         const std::string& batch_text);

// Resolves "auto"/"cpu"/"cuda:1"; throws UsageError when the device is not there.
torch::Device resolve_device(const std::string& name);

// The explicit plan of `autotune train`: pins + global batch. Throws UsageError when the pins and
// the global batch disagree (e.g. a micro-batch that does not divide the global batch).
Plan plan_from_pins(const RunSpec& spec, int64_t seq_len, int64_t default_micro_batch);

}  // namespace autotune
