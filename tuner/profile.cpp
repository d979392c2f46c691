#include "autotune/profile.h"

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "autotune/errors.h"
#include "autotune/size.h"
#include "util/atomic_file.h"
#include "util/hash.h"

namespace fs = std::filesystem;

namespace autotune {

std::string now_iso8601() {
  std::time_t t = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&t, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

nlohmann::json Fingerprint::to_json() const {
  nlohmann::json j = {{"workload", workload},
                      {"model_name", model_name},
                      {"device_kind", device_kind},
                      {"device_name", device_name},
                      {"device_total_bytes", device_total_bytes},
                      {"libtorch_version", libtorch_version},
                      {"tool_version", tool_version},
                      {"budget_bytes", budget_bytes},
                      {"margin_bytes", margin_bytes},
                      {"global_batch", global_batch},
                      {"pins", pins}};
  // Only beside one rank: profiles (and their hashes) of one process stay as they were.
  if (world_size != 1) j["world_size"] = world_size;
  return j;
}

Fingerprint Fingerprint::from_json(const nlohmann::json& j) {
  Fingerprint f;
  f.workload = j.at("workload");
  f.model_name = j.at("model_name").get<std::string>();
  f.device_kind = j.at("device_kind").get<std::string>();
  f.device_name = j.at("device_name").get<std::string>();
  f.device_total_bytes = j.at("device_total_bytes").get<uint64_t>();
  f.libtorch_version = j.at("libtorch_version").get<std::string>();
  f.tool_version = j.at("tool_version").get<std::string>();
  f.budget_bytes = j.at("budget_bytes").get<uint64_t>();
  f.margin_bytes = j.at("margin_bytes").get<uint64_t>();
  f.global_batch = j.at("global_batch").get<int64_t>();
  f.pins = j.at("pins");
  f.world_size = j.value("world_size", 1);
  return f;
}

std::string Fingerprint::hash() const {
  const std::string canonical = to_json().dump();
  return hex16(fnv1a64(canonical.data(), canonical.size()));
}

nlohmann::json Profile::to_json() const {
  return {{"schema", schema},
          {"fingerprint", fingerprint.to_json()},
          {"fingerprint_hash", fingerprint.hash()},
          {"plan", plan},
          {"trials", trials},
          {"search_lines", search_lines},
          {"probe_seconds", probe_seconds},
          {"task_changed", task_changed},
          {"task_change_note", task_change_note},
          {"full_run_peak_bytes",
           full_run_peak_bytes ? nlohmann::json(*full_run_peak_bytes) : nlohmann::json()},
          {"full_run_at", full_run_at},
          {"oom_recoveries", oom_recoveries},
          {"recoveries", recoveries},
          {"full_run_allocator", full_run_allocator},
          {"created_at", created_at},
          {"tool_version", tool_version}};
}

Profile Profile::from_json(const nlohmann::json& j) {
  if (!j.is_object()) throw UsageError("not a JSON object");
  if (!j.contains("schema") || !j.at("schema").is_number_integer())
    throw UsageError("field 'schema' is missing or not an integer");
  const int schema = j.at("schema").get<int>();
  if (schema > kProfileSchema)
    throw UsageError("schema " + std::to_string(schema) + " is newer than this autotune (" +
                     std::to_string(kProfileSchema) + "); upgrade autotune or re-probe");
  if (schema < 1) throw UsageError("schema " + std::to_string(schema) + " is not valid");
  Profile p;
  const char* field = "fingerprint";
  try {
    p.schema = schema;
    p.fingerprint = Fingerprint::from_json(j.at("fingerprint"));
    field = "plan";
    p.plan = j.at("plan").get<Plan>();
    field = "trials";
    p.trials = j.at("trials").get<std::vector<Trial>>();
    field = "search_lines";
    if (j.contains("search_lines"))
      p.search_lines = j.at("search_lines").get<std::vector<SearchLine>>();
    field = "probe_seconds";
    p.probe_seconds = j.value("probe_seconds", 0.0);
    field = "task_changed";
    p.task_changed = j.value("task_changed", false);
    p.task_change_note = j.value("task_change_note", std::string());
    field = "full_run_peak_bytes";
    if (j.contains("full_run_peak_bytes") && !j.at("full_run_peak_bytes").is_null())
      p.full_run_peak_bytes = j.at("full_run_peak_bytes").get<uint64_t>();
    p.full_run_at = j.value("full_run_at", std::string());
    field = "oom_recoveries";
    p.oom_recoveries = j.value("oom_recoveries", int64_t{0});
    p.recoveries = j.value("recoveries", nlohmann::json::array());
    field = "full_run_allocator";
    p.full_run_allocator = j.value("full_run_allocator", nlohmann::json::object());
    field = "created_at";
    p.created_at = j.value("created_at", std::string());
    p.tool_version = j.value("tool_version", std::string());
  } catch (const nlohmann::json::exception& e) {
    throw UsageError(std::string("field '") + field + "' is missing or has the wrong type (" +
                     e.what() + ")");
  }
  if (p.plan.global_batch() * p.fingerprint.world_size != p.fingerprint.global_batch)
    throw UsageError(
        "plan micro_batch x grad_accum x world_size does not equal the fingerprint's global "
        "batch");
  return p;
}

std::string ProfileStore::path_for(const Fingerprint& fp) const {
  auto clean = [](std::string s) {
    for (auto& c : s)
      if (!std::isalnum(static_cast<unsigned char>(c)) && c != '-' && c != '.') c = '_';
    return s;
  };
  std::string budget = format_bytes(fp.budget_bytes);
  budget.erase(std::remove(budget.begin(), budget.end(), ' '), budget.end());
  return dir_ + "/" + clean(fp.model_name) + "-" + clean(fp.device_kind) + "-" + clean(budget) +
         "-" + fp.hash().substr(0, 8) + ".json";
}

std::optional<Profile> ProfileStore::load(const std::string& path) const {
  std::ifstream f(path, std::ios::binary);
  if (!f) {
    if (!fs::exists(path)) return std::nullopt;
    throw UsageError("profile " + path + " is unreadable: " + std::strerror(errno));
  }
  std::stringstream ss;
  ss << f.rdbuf();
  nlohmann::json j = nlohmann::json::parse(ss.str(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded())
    throw UsageError("profile " + path + " is not valid JSON (corrupt or truncated)");
  try {
    return Profile::from_json(j);
  } catch (const UsageError& e) {
    throw UsageError("profile " + path + ": " + e.what());
  }
}

namespace {
// flock on dir/.lock: writers of the same store serialise; released when the fd closes.
class StoreLock {
 public:
  explicit StoreLock(const std::string& dir) {
    fd_ = ::open((dir + "/.lock").c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (fd_ < 0)
      throw RuntimeError("cannot lock the profile store " + dir + ": " + std::strerror(errno) +
                         "; use a writable --profile-dir");
    while (::flock(fd_, LOCK_EX) != 0 && errno == EINTR) {
    }
  }
  ~StoreLock() { ::close(fd_); }

 private:
  int fd_ = -1;
};
}  // namespace

namespace {
void create_store_dir(const std::string& dir) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec)
    throw RuntimeError("cannot create the profile store " + dir + ": " + ec.message() +
                       "; use a writable --profile-dir");
}
}  // namespace

void ProfileStore::save(const Profile& profile, const std::string& path) const {
  create_store_dir(dir_);
  StoreLock lock(dir_);
  atomic_write(path, profile.to_json().dump(2) + "\n");
}

void ProfileStore::check_writable() const {
  create_store_dir(dir_);
  StoreLock lock(dir_);
}

std::vector<std::string> ProfileStore::list() const {
  std::vector<std::string> out;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir_, ec))
    if (e.is_regular_file() && e.path().extension() == ".json") out.push_back(e.path());
  std::sort(out.begin(), out.end());
  return out;
}

}  // namespace autotune
