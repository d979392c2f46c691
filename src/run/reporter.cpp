#include "run/reporter.h"

#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <mutex>

#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include "autotune/size.h"
#include "data/data_report.h"

namespace autotune {

namespace live_line {
namespace {
std::mutex g_mu;
bool g_enabled = false;
std::string g_line;  // drawn now (empty: none)
}  // namespace

bool enabled() {
  return g_enabled;
}
void set_enabled(bool on) {
  std::lock_guard<std::mutex> lock(g_mu);
  g_enabled = on;
}
void draw(const std::string& line) {
  std::lock_guard<std::mutex> lock(g_mu);
  if (!g_enabled) return;
  g_line = line;
  std::fprintf(stderr, "\r\x1b[2K%s", line.c_str());
  std::fflush(stderr);
}
void clear() {
  std::lock_guard<std::mutex> lock(g_mu);
  if (!g_line.empty()) std::fputs("\r\x1b[2K", stderr);
  g_line.clear();
}

namespace {
// spdlog's colour sink under the live line: the line is wiped before a message and drawn again
// after it, so log lines scroll above the progress bar instead of through it.
class Sink : public spdlog::sinks::stderr_color_sink_mt {
 public:
  void log(const spdlog::details::log_msg& msg) override {
    std::lock_guard<std::mutex> lock(g_mu);
    if (!g_line.empty()) std::fputs("\r\x1b[2K", stderr);
    spdlog::sinks::stderr_color_sink_mt::log(msg);
    if (!g_line.empty()) std::fputs(g_line.c_str(), stderr);
    std::fflush(stderr);
  }
};
}  // namespace
}  // namespace live_line

void init_logging() {
  // Colours and the live line only on a terminal, and never with NO_COLOR (no-color.org): in a
  // pipe or a file every line is plain text.
  const bool terminal = ::isatty(2) && std::getenv("NO_COLOR") == nullptr;
  auto sink = std::make_shared<live_line::Sink>();
  sink->set_color_mode(terminal ? spdlog::color_mode::automatic : spdlog::color_mode::never);
  auto logger = std::make_shared<spdlog::logger>("autotune", sink);
  logger->set_pattern("%^[%H:%M:%S %L]%$ %v");
  spdlog::set_default_logger(logger);
  live_line::set_enabled(terminal);
}

void print_table(const std::string& title,
                 const std::vector<std::pair<std::string, std::string>>& rows, bool always) {
  size_t w = 0;
  for (const auto& r : rows) w = std::max(w, r.first.size());
  // Under --quiet (level warn) a summary still reaches the user, as plain lines.
  auto line = [&](const std::string& text) {
    if (spdlog::should_log(spdlog::level::info)) {
      spdlog::info("{}", text);
    } else if (always) {
      live_line::clear();
      std::fprintf(stderr, "%s\n", text.c_str());
    }
  };
  line("+-- " + title + " ");
  for (const auto& r : rows) line(fmt::format("| {:<{}} | {}", r.first, w, r.second));
  line("+--");
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
  if (opt_.quiet) return;
  const double per_step = elapsed_s_ / static_cast<double>(s.step - first_step_);
  const std::string eta = duration(per_step * static_cast<double>(s.steps - s.step));
  const std::string unit = opt_.unit == "tokens" ? "tok/s" : opt_.unit + "/s";
  if (live_line::enabled()) {
    // Redrawn in place, at most ~5 times a second (reading the loss waits for an accelerator).
    if (elapsed_s_ - last_draw_s_ < 0.2 && s.step != s.steps) return;
    last_draw_s_ = elapsed_s_;
    constexpr int kWidth = 24;
    const int done = static_cast<int>(kWidth * s.step / std::max<int64_t>(1, s.steps));
    std::string mem;
    if (opt_.memory_now)
      mem = " | mem " + format_bytes(opt_.memory_now()) +
            (opt_.budget_bytes ? " / " + format_bytes(*opt_.budget_bytes) : "");
    live_line::draw(
        fmt::format("step {:>5}/{} [{}{}] {:3.0f}% | loss {:.4f} | {:.0f} {}{} | ETA {}", s.step,
                    s.steps, std::string(done, '#'), std::string(kWidth - done, '-'),
                    100.0 * s.step / std::max<int64_t>(1, s.steps), s.loss_value(),
                    tokens_ / elapsed_s_, unit, mem, eta));
    if (s.step == s.steps) live_line::clear();
    return;
  }
  if (opt_.log_every <= 0 || (s.step % opt_.log_every != 0 && s.step != s.steps && s.step != 1))
    return;
  spdlog::info(
      "step {:>5}/{} | loss {:.4f} | lr {:.2e} | norm {:.2f} | {:.0f} ms | {:.0f} {} | "
      "ETA {}{}",
      s.step, s.steps, s.loss_value(), s.lr, s.grad_norm_value(), s.step_ms, tokens_ / elapsed_s_,
      unit, eta, s.skipped ? " | fp16 overflow: step skipped" : "");
}

void ConsoleReporter::on_eval(int64_t step, double val_loss) {
  if (!opt_.quiet) spdlog::info("eval  step {:>5} | val loss {:.4f}", step, val_loss);
}

void ConsoleReporter::on_recovery(const Recovery& r) {
  spdlog::warn("out of memory in {} at step {}: {} -> {} ({})", to_string(r.phase), r.step + 1,
               r.before.describe(), r.after.describe(),
               r.eval_only ? "eval batch lowered, training plan unchanged"
                           : "re-running the same step on the same samples");
}

void ConsoleReporter::on_checkpoint(int64_t step, const std::string& path) {
  if (!opt_.quiet) spdlog::info("checkpoint step {} -> {}", step, path);
}

void ConsoleReporter::on_end(const RunSummary& s) {
  live_line::clear();
  std::vector<std::pair<std::string, std::string>> rows = {
      {"steps", fmt::format("{} (from {})", s.steps_done, s.first_step)},
      {"plan", s.plan.describe()},
      {"final train loss", fmt::format("{:.4f}", s.final_loss)},
      {"val loss", std::isnan(s.val_loss) ? "-" : fmt::format("{:.4f}", s.val_loss)},
      {opt_.unit + "/s", fmt::format("{:.0f}", s.tokens_per_s)},
      {"wall", duration(s.wall_s)},
      {"OOM recoveries", std::to_string(s.recoveries.size())},
  };
  if (!s.last_checkpoint.empty()) rows.push_back({"checkpoint", s.last_checkpoint});
  if (opt_.data_report)
    if (std::string d = describe_data_report(opt_.data_report()); !d.empty())
      rows.push_back({"data", d});
  print_table("summary", rows, /*always=*/true);
}

}  // namespace autotune
