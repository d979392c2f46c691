// `autotune profiles list | show FILE | diff A B`.
#include <ctime>
#include <iostream>

#include <spdlog/spdlog.h>

#include "autotune/errors.h"
#include "autotune/profile.h"
#include "autotune/size.h"
#include "commands.h"

namespace autotune {

namespace {
std::string age_of(const std::string& iso) {
  std::tm tm{};
  if (iso.empty() || !strptime(iso.c_str(), "%Y-%m-%dT%H:%M:%SZ", &tm)) return "?";
  const double s = std::difftime(std::time(nullptr), timegm(&tm));
  if (s < 3600) return std::to_string(static_cast<int>(s / 60)) + "m";
  if (s < 86400) return std::to_string(static_cast<int>(s / 3600)) + "h";
  return std::to_string(static_cast<int>(s / 86400)) + "d";
}

void diff_json(const nlohmann::json& a, const nlohmann::json& b, const std::string& at) {
  if (a.is_object() && b.is_object()) {
    for (auto it = a.begin(); it != a.end(); ++it)
      diff_json(it.value(), b.contains(it.key()) ? b.at(it.key()) : nlohmann::json(),
                at + "/" + it.key());
    for (auto it = b.begin(); it != b.end(); ++it)
      if (!a.contains(it.key())) diff_json(nlohmann::json(), it.value(), at + "/" + it.key());
    return;
  }
  if (a != b) std::cout << at << ": " << a.dump() << " -> " << b.dump() << "\n";
}
}  // namespace

int profiles_command(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  std::string dir = "profiles";
  for (size_t i = 0; i + 1 < args.size(); ++i)
    if (args[i] == "--profile-dir") {
      dir = args[i + 1];
      args.erase(args.begin() + static_cast<long>(i), args.begin() + static_cast<long>(i) + 2);
      break;
    }
  ProfileStore store(dir);
  const std::string sub = args.empty() ? "list" : args[0];
  if (sub == "list" && args.size() <= 1) {
    std::printf("%-52s %-10s %-6s %-11s %-44s %-11s %s\n", "file", "model", "device", "budget",
                "plan", "peak", "age");
    for (const auto& path : store.list()) {
      try {
        auto p = store.load(path);
        std::printf("%-52s %-10s %-6s %-11s %-44s %-11s %s\n",
                    std::filesystem::path(path).filename().c_str(),
                    p->fingerprint.model_name.c_str(), p->fingerprint.device_kind.c_str(),
                    format_bytes(p->fingerprint.budget_bytes).c_str(), p->plan.describe().c_str(),
                    p->full_run_peak_bytes ? format_bytes(*p->full_run_peak_bytes).c_str() : "-",
                    age_of(p->created_at).c_str());
      } catch (const UsageError& e) {
        std::printf("%-52s invalid: %s\n", std::filesystem::path(path).filename().c_str(),
                    e.what());
      }
    }
    return kExitOk;
  }
  if (sub == "show" && args.size() == 2) {
    auto p = store.load(args[1]);
    if (!p) throw UsageError("no profile " + args[1]);
    std::cout << p->to_json().dump(2) << std::endl;
    return kExitOk;
  }
  if (sub == "diff" && args.size() == 3) {
    auto a = store.load(args[1]), b = store.load(args[2]);
    if (!a) throw UsageError("no profile " + args[1]);
    if (!b) throw UsageError("no profile " + args[2]);
    diff_json(a->to_json(), b->to_json(), "");
    return kExitOk;
  }
  throw UsageError("usage: autotune profiles list | show FILE | diff A B [--profile-dir DIR]");
}

}  // namespace autotune
