#include "autotune/reporter.h"

#include <cmath>

#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include "autotune/size.h"

namespace autotune {

void init_logging() {
  auto logger = spdlog::stderr_color_mt("autotune");
  logger->set_pattern("%^[%H:%M:%S %L]%$ %v");
  spdlog::set_default_logger(logger);
}

void print_table(const std::string& title,
                 const std::vector<std::pair<std::string, std::string>>& rows) {
  size_t w = 0;
  for (const auto& r : rows) w = std::max(w, r.first.size());
  spdlog::info("+-- {} ", title);
  for (const auto& r : rows) spdlog::info("| {:<{}} | {}", r.first, w, r.second);
  spdlog::info("+--");
}

namespace {
std::string duration(double s) {
  if (!std::isfinite(s) || s < 0) return "?";
  int64_t t = static_cast<int64_t>(s + 0.5);
  if (t >= 3600) return fmt::format("{}h{:02}m", t / 3600, (t % 3600) / 60);
  if (t >= 60) return fmt::format("{}m{:02}s", t / 60, t % 60);
  return fmt::format("{}s", t);
}
}  // namespace

void ConsoleReporter::on_start(const Plan& plan, const TrainOptions& opt, int64_t first_step) {
  first_step_ = first_step;
  if (first_step > 0) spdlog::info("resuming at step {} of {}", first_step, opt.steps);
}

void ConsoleReporter::on_step(const StepStats& s) {
  elapsed_s_ += s.step_ms / 1e3;
  tokens_ += s.tokens_per_s * s.step_ms / 1e3;
  if (log_every_ <= 0 || (s.step % log_every_ != 0 && s.step != s.steps && s.step != 1)) return;
  const double per_step = elapsed_s_ / static_cast<double>(s.step - first_step_);
  spdlog::info(
      "step {:>5}/{} | loss {:.4f} | lr {:.2e} | norm {:.2f} | {:.0f} ms | {:.0f} tok/s | "
      "ETA {}{}",
      s.step, s.steps, s.loss_value(), s.lr, s.grad_norm_value(), s.step_ms, tokens_ / elapsed_s_,
      duration(per_step * static_cast<double>(s.steps - s.step)),
      s.skipped ? " | fp16 overflow: step skipped" : "");
}

void ConsoleReporter::on_eval(int64_t step, double val_loss) {
  spdlog::info("eval  step {:>5} | val loss {:.4f}", step, val_loss);
}

void ConsoleReporter::on_recovery(const Recovery& r) {
  spdlog::warn("out of memory in {} at step {}: {} -> {} ({})", to_string(r.phase), r.step + 1,
               r.before.describe(), r.after.describe(),
               r.eval_only ? "eval batch lowered, training plan unchanged"
                           : "re-running the same step on the same samples");
}

void ConsoleReporter::on_checkpoint(int64_t step, const std::string& path) {
  spdlog::info("checkpoint step {} -> {}", step, path);
}

void ConsoleReporter::on_end(const RunSummary& s) {
  std::vector<std::pair<std::string, std::string>> rows = {
      {"steps", fmt::format("{} (from {})", s.steps_done, s.first_step)},
      {"plan", s.plan.describe()},
      {"final train loss", fmt::format("{:.4f}", s.final_loss)},
      {"val loss", std::isnan(s.val_loss) ? "-" : fmt::format("{:.4f}", s.val_loss)},
      {"tokens/s", fmt::format("{:.0f}", s.tokens_per_s)},
      {"wall", duration(s.wall_s)},
      {"OOM recoveries", std::to_string(s.recoveries.size())},
  };
  if (!s.last_checkpoint.empty()) rows.push_back({"checkpoint", s.last_checkpoint});
  if (data_report_)
    if (std::string d = describe_data_report(data_report_()); !d.empty())
      rows.push_back({"data", d});
  print_table("summary", rows);
}

std::string describe_data_report(const nlohmann::json& r) {
  if (!r.is_object()) return {};
  auto u = [&](const char* k) { return r.value(k, uint64_t{0}); };
  std::string out = r.value("read_mode", std::string("?"));
  if (u("cache_capacity_bytes") > 0)
    out +=
        fmt::format(", cache {:.1f}% hit ({}/{}), {} of {}", 100.0 * r.value("cache_hit_rate", 0.0),
                    u("cache_hits"), u("cache_hits") + u("cache_misses"),
                    format_bytes(u("cache_bytes_in_use")), format_bytes(u("cache_capacity_bytes")));
  else
    out += ", no cache";
  if (u("prefetch_batches") > 0)
    out += fmt::format(", prefetch {}: {:.1f}% hit", u("prefetch_batches"),
                       100.0 * r.value("prefetch_hit_rate", 0.0));
  return out;
}

}  // namespace autotune
