// Profiles: the chosen plan and its evidence, one JSON file per fingerprint, reused by later runs
// with the same setup. Written atomically under an advisory lock; validated on every read
// (schema, types, fingerprint) so a corrupt or stale file is reported and re-probed, never
// trusted silently. Every field is documented in profiles/README.md.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "autotune/plan.h"
#include "autotune/tuner.h"

namespace autotune {

constexpr int kProfileSchema = 1;

struct Fingerprint {
  nlohmann::json workload;  // the workload's full config (model + data)
  std::string model_name;
  std::string device_kind;  // "cpu", "cuda"
  std::string device_name;
  uint64_t device_total_bytes = 0;
  std::string libtorch_version;
  std::string tool_version;
  uint64_t budget_bytes = 0;
  uint64_t margin_bytes = 0;
  int64_t global_batch = 0;  // the effective batch: the plan's micro_batch x grad_accum x ranks
  int world_size = 1;        // data-parallel ranks; the budget and the plan are per rank
  nlohmann::json pins;       // pinned knobs, allow-shrink, search strategy, mode
  nlohmann::json to_json() const;
  static Fingerprint from_json(const nlohmann::json& j);
  std::string hash() const;  // 16 hex digits of FNV-1a over the canonical JSON
  bool operator==(const Fingerprint& o) const { return to_json() == o.to_json(); }
};

struct Profile {
  int schema = kProfileSchema;
  Fingerprint fingerprint;
  Plan plan;
  std::vector<Trial> trials;
  std::vector<SearchLine> search_lines;  // the lines the model search fitted, for reports
  double probe_seconds = 0;
  bool task_changed = false;  // --allow-shrink changed seq_len or width
  std::string task_change_note;
  std::optional<uint64_t> full_run_peak_bytes;  // measured peak of the last full run
  std::string full_run_at;                      // ISO 8601 UTC
  int64_t oom_recoveries = 0;                   // seen in runs with this profile
  nlohmann::json recoveries = nlohmann::json::array();
  // The last full run's allocator events: host_num_ooms, device_num_ooms,
  // device_num_alloc_retries (retries are the early sign of thrashing).
  nlohmann::json full_run_allocator = nlohmann::json::object();
  std::string created_at;
  std::string tool_version;
  nlohmann::json to_json() const;
  // Throws UsageError naming the field when the JSON is not a valid profile of this schema.
  static Profile from_json(const nlohmann::json& j);
};

class ProfileStore {
 public:
  explicit ProfileStore(std::string dir) : dir_(std::move(dir)) {}
  const std::string& dir() const { return dir_; }
  // dir/<model>-<device>-<budget>-<hash>.json: readable, unique per fingerprint.
  std::string path_for(const Fingerprint& fp) const;

  // nullopt when the file does not exist. Throws UsageError (one line: the path and what is
  // wrong) for corrupt, truncated, wrong-typed or newer-schema files.
  std::optional<Profile> load(const std::string& path) const;
  // Atomic write (temp + fsync + rename) under flock on dir/.lock. Throws RuntimeError.
  void save(const Profile& profile, const std::string& path) const;
  std::vector<std::string> list() const;  // *.json in dir, sorted
  // Creates the directory and takes the lock once; throws RuntimeError when it cannot (used to
  // fail before probing when --require-profile-save is given).
  void check_writable() const;

 private:
  std::string dir_;
};

std::string now_iso8601();

}  // namespace autotune
