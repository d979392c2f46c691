#include "report.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <sstream>

#include <fmt/format.h>
#include <spdlog/spdlog.h>
#include <cxxopts.hpp>

#include "autotune/errors.h"
#include "autotune/size.h"
#include "util/atomic_file.h"

namespace autotune {

namespace {

constexpr double kMiB = 1048576.0;
// One colour per (precision, checkpointing) pair, the same in every chart.
const char* const kPalette[] = {"#1f77b4", "#d62728", "#2ca02c", "#9467bd",
                                "#ff7f0e", "#8c564b", "#e377c2", "#17becf"};

std::string esc(const std::string& s) {
  std::string o;
  for (char c : s) {
    if (c == '<')
      o += "&lt;";
    else if (c == '>')
      o += "&gt;";
    else if (c == '&')
      o += "&amp;";
    else if (c == '"')
      o += "&quot;";
    else
      o += c;
  }
  return o;
}

std::string pair_name(Precision p, bool ckpt, int64_t seq_len, int64_t d_model,
                      int64_t optimizer_shards) {
  std::string s = to_string(p) + (ckpt ? " / checkpointing" : " / no checkpointing");
  if (optimizer_shards > 1)
    s += " / optimizer states over " + std::to_string(optimizer_shards) + " ranks";
  if (seq_len) s += " / seq " + std::to_string(seq_len);
  if (d_model) s += " / width " + std::to_string(d_model);
  return s;
}
std::string pair_name(const Plan& p) {
  return pair_name(p.precision, p.checkpointing, p.seq_len, p.d_model, p.optimizer_shards);
}

std::string outcome_class(const Trial& t) {
  if (t.fits) return "fits";
  if (t.oom) return "oom";
  if (t.too_slow) return "slow";
  if (t.error) return "error";
  return "over";
}

// A chart's plot area and its scales: x log2 (micro-batches) or linear, y linear from 0.
struct Chart {
  double width = 760, height = 360, left = 70, right = 20, top = 30, bottom = 50;
  double x_lo = 0, x_hi = 1, y_hi = 1;
  bool log_x = true;
  std::string title, x_label, y_label;
  double px(double x) const {
    const double v = log_x ? std::log2(std::max(x, 1e-9)) : x;
    const double lo = log_x ? std::log2(x_lo) : x_lo, hi = log_x ? std::log2(x_hi) : x_hi;
    return left + (v - lo) / (hi - lo) * (width - left - right);
  }
  double py(double y) const { return height - bottom - y / y_hi * (height - top - bottom); }
};

std::string open_chart(const Chart& c, const std::string& id) {
  std::ostringstream o;
  o << fmt::format(
      "<svg id=\"{}\" xmlns=\"http://www.w3.org/2000/svg\" width=\"{:.0f}\" height=\"{:.0f}\" "
      "viewBox=\"0 0 {:.0f} {:.0f}\" font-family=\"sans-serif\" font-size=\"12\">\n",
      id, c.width, c.height, c.width, c.height);
  o << fmt::format(
      "<rect class=\"frame\" x=\"{:.1f}\" y=\"{:.1f}\" width=\"{:.1f}\" "
      "height=\"{:.1f}\" fill=\"#fcfcfc\" stroke=\"#999\"/>\n",
      c.left, c.top, c.width - c.left - c.right, c.height - c.top - c.bottom);
  o << fmt::format("<text x=\"{:.1f}\" y=\"18\" font-size=\"14\" font-weight=\"bold\">{}</text>\n",
                   c.left, esc(c.title));
  o << fmt::format("<text x=\"{:.1f}\" y=\"{:.1f}\" text-anchor=\"middle\">{}</text>\n",
                   (c.left + c.width - c.right) / 2, c.height - 12, esc(c.x_label));
  o << fmt::format(
      "<text transform=\"translate(16,{:.1f}) rotate(-90)\" "
      "text-anchor=\"middle\">{}</text>\n",
      (c.top + c.height - c.bottom) / 2, esc(c.y_label));
  // y ticks: five steps of a round size
  const double raw = c.y_hi / 5, mag = std::pow(10, std::floor(std::log10(raw)));
  const double step = raw / mag < 2 ? 2 * mag : (raw / mag < 5 ? 5 * mag : 10 * mag);
  for (double y = 0; y <= c.y_hi * 1.0001; y += step)
    o << fmt::format(
        "<line class=\"tick\" x1=\"{:.1f}\" x2=\"{:.1f}\" y1=\"{:.1f}\" "
        "y2=\"{:.1f}\" stroke=\"#e4e4e4\"/><text x=\"{:.1f}\" y=\"{:.1f}\" "
        "text-anchor=\"end\">{:g}</text>\n",
        c.left, c.width - c.right, c.py(y), c.py(y), c.left - 6, c.py(y) + 4, y);
  return o.str();
}

std::string x_ticks_micro_batch(const Chart& c, const std::vector<int64_t>& mbs) {
  std::ostringstream o;
  for (int64_t mb : mbs)
    o << fmt::format("<text x=\"{:.1f}\" y=\"{:.1f}\" text-anchor=\"middle\">{}</text>\n",
                     c.px(static_cast<double>(mb)), c.height - c.bottom + 16, mb);
  return o.str();
}

std::string hline(const Chart& c, double y, const std::string& cls, const std::string& label,
                  const char* colour, const char* dash) {
  return fmt::format(
      "<line class=\"{}\" x1=\"{:.1f}\" x2=\"{:.1f}\" y1=\"{:.1f}\" y2=\"{:.1f}\" stroke=\"{}\" "
      "stroke-width=\"1.5\" stroke-dasharray=\"{}\"/><text class=\"{}-label\" x=\"{:.1f}\" "
      "y=\"{:.1f}\" text-anchor=\"end\" fill=\"{}\">{}</text>\n",
      cls, c.left, c.width - c.right, c.py(y), c.py(y), colour, dash, cls, c.width - c.right - 4,
      c.py(y) - 4, colour, esc(label));
}

// A marker for one trial, shaped by its outcome.
std::string marker(const Chart& c, double x, double y, const std::string& cls, const char* colour,
                   const std::string& tooltip) {
  const double X = c.px(x), Y = c.py(y);
  std::string shape;
  if (cls == "fits")
    shape = fmt::format("<circle cx=\"{:.1f}\" cy=\"{:.1f}\" r=\"5\" fill=\"{}\"/>", X, Y, colour);
  else if (cls == "over")
    shape = fmt::format(
        "<circle cx=\"{:.1f}\" cy=\"{:.1f}\" r=\"5\" fill=\"white\" "
        "stroke=\"{}\" stroke-width=\"2\"/>",
        X, Y, colour);
  else if (cls == "oom")
    shape = fmt::format(
        "<path d=\"M{0:.1f} {1:.1f} l10 10 m0 -10 l-10 10\" stroke=\"{2}\" "
        "stroke-width=\"2.5\"/>",
        X - 5, Y - 5, colour);
  else if (cls == "slow")
    shape = fmt::format("<path d=\"M{:.1f} {:.1f} l6 6 l-6 6 l-6 -6 z\" fill=\"{}\"/>", X, Y - 6,
                        colour);
  else
    shape = fmt::format("<path d=\"M{:.1f} {:.1f} l6 10 h-12 z\" fill=\"{}\"/>", X, Y - 6, colour);
  return fmt::format("<g class=\"trial {}\"><title>{}</title>{}</g>\n", cls, esc(tooltip), shape);
}

struct Series {
  std::string name;
  const char* colour;
  std::vector<const Trial*> trials;
  const SearchLine* line = nullptr;
};

// Trials grouped by pair (and task shape), in the order the search met them.
std::vector<Series> series_of(const Profile& p) {
  std::vector<Series> out;
  auto find = [&](const std::string& name) -> Series& {
    for (auto& s : out)
      if (s.name == name) return s;
    out.push_back({name, kPalette[out.size() % std::size(kPalette)], {}, nullptr});
    return out.back();
  };
  for (const auto& t : p.trials) find(pair_name(t.plan)).trials.push_back(&t);
  for (const auto& l : p.search_lines) {
    Series& s =
        find(pair_name(l.precision, l.checkpointing, l.seq_len, l.d_model, l.optimizer_shards));
    if (!s.line || l.measured) s.line = &l;
  }
  return out;
}

std::string legend(const Chart& c, const std::vector<Series>& series) {
  std::ostringstream o;
  double y = c.top + 14;
  for (const auto& s : series) {
    o << fmt::format(
        "<rect x=\"{:.1f}\" y=\"{:.1f}\" width=\"10\" height=\"10\" fill=\"{}\"/>"
        "<text x=\"{:.1f}\" y=\"{:.1f}\">{}</text>\n",
        c.left + 10, y - 9, s.colour, c.left + 26, y, esc(s.name));
    y += 16;
  }
  o << fmt::format(
      "<text x=\"{:.1f}\" y=\"{:.1f}\" fill=\"#555\">● fits   ○ above the usable "
      "budget   ✕ out of memory   ◆ stopped: too slow   ▲ error   ◎ chosen</text>\n",
      c.left + 10, y);
  return o.str();
}

std::string memory_chart(const Profile& p, const std::vector<Series>& series,
                         const std::vector<int64_t>& mbs) {
  Chart c;
  c.title = "Measured peak memory against micro-batch";
  c.x_label = "micro-batch (sequences per forward/backward)";
  c.y_label = "peak (budget figure), MiB";
  c.x_lo = static_cast<double>(mbs.front()) / 1.5;
  c.x_hi = static_cast<double>(mbs.back()) * 1.5;
  const double budget = static_cast<double>(p.fingerprint.budget_bytes) / kMiB;
  const double usable = budget - static_cast<double>(p.fingerprint.margin_bytes) / kMiB;
  double top = budget;
  for (const auto& t : p.trials) top = std::max(top, static_cast<double>(t.peak_bytes) / kMiB);
  c.y_hi = top * 1.15;
  std::ostringstream o;
  o << open_chart(c, "memory") << x_ticks_micro_batch(c, mbs);
  o << hline(c, budget, "budget", "budget " + format_bytes(p.fingerprint.budget_bytes), "#b00",
             "6 3");
  o << hline(c, usable, "usable", "usable (budget - margin)", "#e07000", "2 3");
  for (const auto& s : series) {
    o << fmt::format("<g class=\"series\" data-pair=\"{}\">\n", esc(s.name));
    if (s.line) {
      std::string d;
      for (int i = 0; i <= 40; ++i) {
        const double mb =
            std::exp2(std::log2(c.x_lo) + (std::log2(c.x_hi) - std::log2(c.x_lo)) * i / 40.0);
        const double y = (s.line->a_bytes + s.line->b_bytes * mb) / kMiB;
        if (y < 0 || y > c.y_hi) continue;
        d += fmt::format("{}{:.1f} {:.1f}", d.empty() ? "M" : " L", c.px(mb), c.py(y));
      }
      if (!d.empty())
        o << fmt::format(
            "<path class=\"fit-line{}\" d=\"{}\" fill=\"none\" stroke=\"{}\" "
            "stroke-width=\"1.2\" stroke-dasharray=\"{}\"/>\n",
            s.line->measured ? " measured" : " estimated", d, s.colour,
            s.line->measured ? "none" : "4 3");
    }
    for (const Trial* t : s.trials) {
      if (t->peak_bytes == 0) continue;  // ran out of memory before a phase ended: no figure
      o << marker(c, static_cast<double>(t->plan.micro_batch),
                  static_cast<double>(t->peak_bytes) / kMiB, outcome_class(*t), s.colour,
                  t->plan.describe() + ": " + t->reason + ", peak " + format_bytes(t->peak_bytes));
    }
    // OOM trials with no figure still show where they were: on the budget line.
    for (const Trial* t : s.trials)
      if (t->peak_bytes == 0 && t->oom)
        o << marker(c, static_cast<double>(t->plan.micro_batch), budget, "oom", s.colour,
                    t->plan.describe() + ": " + t->reason);
    o << "</g>\n";
  }
  for (const auto& t : p.trials)
    if (t.plan == p.plan && t.peak_bytes > 0)
      o << fmt::format(
          "<g class=\"chosen\"><circle cx=\"{:.1f}\" cy=\"{:.1f}\" r=\"10\" "
          "fill=\"none\" stroke=\"black\" stroke-width=\"2\"/><text x=\"{:.1f}\" "
          "y=\"{:.1f}\" font-weight=\"bold\">chosen</text></g>\n",
          c.px(static_cast<double>(t.plan.micro_batch)),
          c.py(static_cast<double>(t.peak_bytes) / kMiB),
          c.px(static_cast<double>(t.plan.micro_batch)) + 12,
          c.py(static_cast<double>(t.peak_bytes) / kMiB) + 16);
  o << legend(c, series) << "</svg>\n";
  return o.str();
}

std::string speed_chart(const Profile& p, const std::vector<Series>& series,
                        const std::vector<int64_t>& mbs) {
  Chart c;
  c.title = "Training throughput against micro-batch";
  c.x_label = "micro-batch";
  c.y_label = "tokens/s (measured in the trial)";
  c.x_lo = static_cast<double>(mbs.front()) / 1.5;
  c.x_hi = static_cast<double>(mbs.back()) * 1.5;
  double top = 1;
  for (const auto& t : p.trials) top = std::max(top, t.tokens_per_s);
  c.y_hi = top * 1.15;
  std::ostringstream o;
  o << open_chart(c, "speed") << x_ticks_micro_batch(c, mbs);
  for (const auto& s : series) {
    o << fmt::format("<g class=\"series\" data-pair=\"{}\">\n", esc(s.name));
    std::vector<const Trial*> measured;
    for (const Trial* t : s.trials)
      if (t->tokens_per_s > 0) measured.push_back(t);
    std::sort(measured.begin(), measured.end(),
              [](auto* a, auto* b) { return a->plan.micro_batch < b->plan.micro_batch; });
    std::string d;
    for (const Trial* t : measured)
      d += fmt::format("{}{:.1f} {:.1f}", d.empty() ? "M" : " L",
                       c.px(static_cast<double>(t->plan.micro_batch)), c.py(t->tokens_per_s));
    if (measured.size() > 1)
      o << fmt::format("<path class=\"speed-line\" d=\"{}\" fill=\"none\" stroke=\"{}\"/>\n", d,
                       s.colour);
    for (const Trial* t : measured)
      o << marker(c, static_cast<double>(t->plan.micro_batch), t->tokens_per_s, outcome_class(*t),
                  s.colour,
                  fmt::format("{}: {:.0f} tokens/s", t->plan.describe(), t->tokens_per_s));
    o << "</g>\n";
  }
  for (const auto& t : p.trials)
    if (t.plan == p.plan)
      o << fmt::format(
          "<g class=\"chosen\"><circle cx=\"{:.1f}\" cy=\"{:.1f}\" r=\"10\" "
          "fill=\"none\" stroke=\"black\" stroke-width=\"2\"/></g>\n",
          c.px(static_cast<double>(t.plan.micro_batch)), c.py(t.tokens_per_s));
  o << "</svg>\n";
  return o.str();
}

std::string timeline_chart(const Profile& p, const Timeline& full) {
  const Timeline tl = downsample(full);
  Chart c;
  c.log_x = false;
  c.title = "The run's memory, phase by phase";
  c.x_label = "optimizer step";
  c.y_label = "MiB";
  c.x_lo = 0;
  c.x_hi = std::max<double>(1, static_cast<double>(tl.points.size()));
  const double budget = static_cast<double>(p.fingerprint.budget_bytes) / kMiB;
  double top = budget;
  for (const auto& pt : tl.points)
    top = std::max({top, pt.budget_bytes / kMiB, pt.rss_bytes / kMiB, pt.device_bytes / kMiB});
  c.y_hi = top * 1.15;
  std::ostringstream o;
  o << open_chart(c, "timeline");
  o << hline(c, budget, "budget", "budget " + format_bytes(p.fingerprint.budget_bytes), "#b00",
             "6 3");
  // A label at each of about ten steps.
  const int64_t last_step = tl.points.empty() ? 1 : tl.points.back().step;
  const int64_t every = std::max<int64_t>(1, last_step / 10);
  int64_t labelled = -1;
  for (size_t i = 0; i < tl.points.size(); ++i)
    if (tl.points[i].step % every == 0 && tl.points[i].step != labelled) {
      labelled = tl.points[i].step;
      o << fmt::format("<text x=\"{:.1f}\" y=\"{:.1f}\" text-anchor=\"middle\">{}</text>\n",
                       c.px(static_cast<double>(i)), c.height - c.bottom + 16, labelled);
    }
  struct Meter {
    const char* name;
    const char* colour;
    uint64_t TimelinePoint::*field;
  };
  const Meter meters[] = {{"budget figure", "#000000", &TimelinePoint::budget_bytes},
                          {"rss", "#1f77b4", &TimelinePoint::rss_bytes},
                          {"tensors", "#2ca02c", &TimelinePoint::tensor_bytes},
                          {"device", "#9467bd", &TimelinePoint::device_bytes}};
  double ly = c.top + 14;
  for (const auto& m : meters) {
    bool any = false;
    std::string d;
    for (size_t i = 0; i < tl.points.size(); ++i) {
      const double v = static_cast<double>(tl.points[i].*m.field) / kMiB;
      any = any || v > 0;
      d += fmt::format("{}{:.1f} {:.1f}", d.empty() ? "M" : " L", c.px(static_cast<double>(i)),
                       c.py(v));
    }
    if (!any) continue;
    o << fmt::format(
        "<path class=\"meter\" data-meter=\"{}\" d=\"{}\" fill=\"none\" "
        "stroke=\"{}\" stroke-width=\"1.2\"/>\n",
        m.name, d, m.colour);
    o << fmt::format(
        "<rect x=\"{:.1f}\" y=\"{:.1f}\" width=\"10\" height=\"3\" fill=\"{}\"/>"
        "<text x=\"{:.1f}\" y=\"{:.1f}\">{}</text>\n",
        c.left + 10, ly - 5, m.colour, c.left + 26, ly, m.name);
    ly += 16;
  }
  for (const auto& r : tl.recoveries) {
    const double x = c.px(static_cast<double>(r.at_point));
    o << fmt::format(
        "<g class=\"recovery\"><title>OOM in {} at step {}: {} -> {}</title>"
        "<line class=\"recovery\" x1=\"{:.1f}\" x2=\"{:.1f}\" y1=\"{:.1f}\" "
        "y2=\"{:.1f}\" stroke=\"#d62728\" stroke-width=\"2\"/><text x=\"{:.1f}\" "
        "y=\"{:.1f}\" fill=\"#d62728\">OOM, step {}: recovered</text></g>\n",
        esc(r.phase), r.step, esc(r.before), esc(r.after), x, x, c.top, c.py(0), x + 4, c.top + 14,
        r.step);
  }
  o << "</svg>\n";
  return o.str();
}

// Why this plan, in a few sentences from the trials.
std::string why(const Profile& p) {
  int over = 0, oom = 0, slow = 0, slower = 0;
  for (const auto& t : p.trials) {
    if (t.plan == p.plan) continue;
    if (t.fits)
      ++slower;
    else if (t.oom)
      ++oom;
    else if (t.too_slow)
      ++slow;
    else if (!t.error)
      ++over;
  }
  std::string s = fmt::format(
      "{} trials: {} did not fit (above the usable budget), {} ran out of memory, {} were stopped "
      "as too slow, {} fitted but were slower. The chosen plan is the fastest that fits.",
      p.trials.size(), over, oom, slow, slower);
  if (p.task_changed) s += " THE TASK WAS CHANGED: " + p.task_change_note;
  return s;
}

}  // namespace

Timeline downsample(const Timeline& tl, size_t max_points) {
  const size_t n = tl.points.size();
  if (n <= max_points || max_points < 2) return tl;
  const size_t buckets = max_points / 2;
  const size_t per_bucket = (n + buckets - 1) / buckets;  // ceil: at most `buckets` buckets
  Timeline out;
  for (size_t first = 0; first < n; first += per_bucket) {
    const size_t last = std::min(n, first + per_bucket);
    TimelinePoint hi = tl.points[first], lo = tl.points[first];
    for (size_t i = first + 1; i < last; ++i) {
      const TimelinePoint& q = tl.points[i];
      for (auto field : {&TimelinePoint::budget_bytes, &TimelinePoint::tensor_bytes,
                         &TimelinePoint::device_bytes, &TimelinePoint::rss_bytes}) {
        hi.*field = std::max(hi.*field, q.*field);
        lo.*field = std::min(lo.*field, q.*field);
      }
    }
    hi.phase = lo.phase = "steps " + std::to_string(tl.points[first].step) + "-" +
                          std::to_string(tl.points[last - 1].step);
    out.points.push_back(hi);
    out.points.push_back(lo);
  }
  for (TimelineRecovery r : tl.recoveries) {
    r.at_point = 2 * (r.at_point / per_bucket);
    out.recoveries.push_back(r);
  }
  return out;
}

Timeline read_timeline(const std::string& run_dir) {
  const std::string path = run_dir + "/memory.jsonl";
  std::ifstream f(path);
  if (!f)
    throw UsageError("--run " + run_dir + ": no memory.jsonl there; give the --run-dir of a run");
  Timeline tl;
  std::string line;
  int64_t n = 0;
  while (std::getline(f, line)) {
    ++n;
    const auto j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded() || !j.is_object()) continue;  // a line cut by a kill: skip it
    if (j.value("event", std::string()) == "oom_recovery") {
      tl.recoveries.push_back({j.value("step", int64_t{0}), j.value("phase", std::string()),
                               j.value("before", std::string()), j.value("after", std::string()),
                               tl.points.size()});
      continue;
    }
    tl.points.push_back({j.value("step", int64_t{0}), j.value("phase", std::string()),
                         j.value("budget_bytes", uint64_t{0}), j.value("tensor_bytes", uint64_t{0}),
                         j.value("device_bytes", uint64_t{0}), j.value("rss_bytes", uint64_t{0})});
  }
  if (tl.points.empty())
    throw UsageError("--run " + run_dir + ": memory.jsonl holds no phases (" + std::to_string(n) +
                     " lines)");
  return tl;
}

std::string render_report(const Profile& p, const Timeline* timeline) {
  const auto series = series_of(p);
  std::vector<int64_t> mbs;
  for (const auto& t : p.trials) mbs.push_back(t.plan.micro_batch);
  mbs.push_back(p.plan.micro_batch);
  std::sort(mbs.begin(), mbs.end());
  mbs.erase(std::unique(mbs.begin(), mbs.end()), mbs.end());

  std::ostringstream o;
  o << "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>autotune report: "
    << esc(p.fingerprint.model_name) << "</title>\n"
    << "<style>body{font-family:sans-serif;margin:24px;color:#222}"
       "table{border-collapse:collapse}td{padding:2px 12px 2px 0;vertical-align:top}"
       "td:first-child{color:#666}svg{display:block;margin:18px 0}</style></head><body>\n";
  o << "<h1>autotune: " << esc(p.fingerprint.model_name) << "</h1>\n<table id=\"header\">\n";
  auto row = [&](const std::string& k, const std::string& v) {
    o << "<tr><td>" << esc(k) << "</td><td>" << esc(v) << "</td></tr>\n";
  };
  row("device",
      p.fingerprint.device_name + " (" + format_bytes(p.fingerprint.device_total_bytes) + ")");
  row("budget", format_bytes(p.fingerprint.budget_bytes) + " (margin " +
                    format_bytes(p.fingerprint.margin_bytes) + ")");
  row("global batch", std::to_string(p.fingerprint.global_batch) + " sequences");
  row("chosen plan", p.plan.describe());
  row("probe", fmt::format("{} trials in {:.1f} s", p.trials.size(), p.probe_seconds));
  if (p.full_run_peak_bytes)
    row("full run peak", format_bytes(*p.full_run_peak_bytes) +
                             fmt::format(" ({:.1f}% of the budget)",
                                         100.0 * static_cast<double>(*p.full_run_peak_bytes) /
                                             static_cast<double>(p.fingerprint.budget_bytes)));
  row("LibTorch / autotune", p.fingerprint.libtorch_version + " / " + p.tool_version);
  row("profile made", p.created_at);
  o << "</table>\n<p id=\"why\">" << esc(why(p)) << "</p>\n";
  if (!p.trials.empty()) {
    o << memory_chart(p, series, mbs);
    o << speed_chart(p, series, mbs);
  } else {
    o << "<p>This profile holds no trials (it was made without probing).</p>\n";
  }
  if (timeline) o << timeline_chart(p, *timeline);
  o << "</body></html>\n";
  return o.str();
}

int report_command(int argc, char** argv) {
  cxxopts::Options o(
      "autotune report",
      "Draw a profile (and a run's memory timeline) as one self-contained HTML file.");
  o.add_options()("run", "the run's --run-dir, for its memory timeline (optional)",
                  cxxopts::value<std::string>())("output", "the HTML file to write",
                                                 cxxopts::value<std::string>())(
      "profile", "the profile JSON file", cxxopts::value<std::string>())("h,help", "show help");
  o.parse_positional({"profile"});
  o.positional_help("PROFILE");
  auto r = o.parse(argc, argv);
  if (r.count("help")) {
    std::cout << o.help() << std::endl;
    return kExitOk;
  }
  if (!r.unmatched().empty())
    throw UsageError("unexpected argument '" + r.unmatched()[0] + "'; see autotune report --help");
  if (!r.count("profile") || !r.count("output"))
    throw UsageError(
        "report needs PROFILE and --output FILE: autotune report PROFILE "
        "[--run DIR] --output report.html");
  const std::string path = r["profile"].as<std::string>();
  if (!std::filesystem::exists(path))
    throw UsageError("profile " + path + ": no such file (`autotune profiles list` shows them)");
  const auto profile = ProfileStore(std::filesystem::path(path).parent_path().string()).load(path);
  if (!profile) throw UsageError("profile " + path + ": no such file");
  std::optional<Timeline> timeline;
  if (r.count("run")) timeline = read_timeline(r["run"].as<std::string>());
  const std::string out = r["output"].as<std::string>();
  atomic_write(out, render_report(*profile, timeline ? &*timeline : nullptr));
  spdlog::info("wrote {} ({} trials{})", out, profile->trials.size(),
               timeline ? ", " + std::to_string(timeline->points.size()) + " timeline phases" : "");
  return kExitOk;
}

}  // namespace autotune
