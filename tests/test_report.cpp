// `autotune report`: a profile and a run drawn as one self-contained HTML file, checked the way a
// person sees it: rendered by headless Chromium to a PNG that is not blank, and its SVG DOM, as
// Chromium parsed it, holding the expected series and marks. The fixture (tests/fixtures/report)
// is a real gpt-mini profile and run: a binding budget, trials that did not fit, an OOM recovery.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <set>

#include <nlohmann/json.hpp>

#include "autotune/profile.h"
#include "report.h"
#include "test_support.h"

namespace tu = autotune::testing;
namespace fs = std::filesystem;
using namespace autotune;

namespace {
const std::string kFixture = std::string(AUTOTUNE_SOURCE_DIR) + "/tests/fixtures/report";
const char* const kChromium = "/usr/bin/chromium";

Profile fixture_profile() {
  return Profile::from_json(nlohmann::json::parse(tu::read_file(kFixture + "/profile.json")));
}

size_t count(const std::string& text, const std::string& what) {
  size_t n = 0;
  for (size_t at = text.find(what); at != std::string::npos; at = text.find(what, at + 1)) ++n;
  return n;
}

// Runs headless Chromium (the flags a closed network needs) and returns its stdout.
tu::ProcessResult chromium(const std::vector<std::string>& args) {
  std::vector<std::string> all = {"-c",
                                  "exec \"$0\" --headless --no-sandbox --disable-gpu "
                                  "--no-first-run --disable-background-networking "
                                  "--disable-component-update --disable-sync --disable-quic "
                                  "--user-data-dir=\"$1\" \"${@:2}\"",
                                  kChromium, tu::temp_dir("chromium-profile")};
  all.insert(all.end(), args.begin(), args.end());
  return tu::run_program("/bin/bash", all);
}
}  // namespace

TEST(Report, TheFixtureProfileDrawsEverySeriesAndMark) {
  const Profile p = fixture_profile();
  const Timeline tl = read_timeline(kFixture);
  const std::string html = render_report(p, &tl);
  // Header: the model, the device, the budget, the chosen plan.
  EXPECT_NE(html.find("<h1>autotune: gpt-mini</h1>"), std::string::npos);
  EXPECT_NE(html.find(p.plan.describe()), std::string::npos);
  // One series per (precision, checkpointing) pair in both charts, each pair's fitted line.
  std::set<std::string> pairs;
  for (const auto& t : p.trials)
    pairs.insert(to_string(t.plan.precision) +
                 (t.plan.checkpointing ? " / checkpointing" : " / no checkpointing"));
  for (const auto& pair : pairs) EXPECT_EQ(count(html, "data-pair=\"" + pair + "\""), 2u) << pair;
  EXPECT_EQ(count(html, "class=\"fit-line"), p.search_lines.empty() ? 0u : pairs.size());
  // Every trial marked by its outcome; the budget and usable lines; the chosen plan.
  int fits = 0, not_fit = 0;
  for (const auto& t : p.trials) (t.fits ? fits : not_fit)++;
  ASSERT_GT(not_fit, 0) << "the fixture's budget must bind";
  EXPECT_GE(count(html, "class=\"trial fits\""), static_cast<size_t>(fits));
  EXPECT_GE(count(html, "class=\"trial over\"") + count(html, "class=\"trial oom\""),
            static_cast<size_t>(not_fit));
  EXPECT_EQ(count(html, "<line class=\"budget\""), 2u) << "memory chart and timeline";
  EXPECT_EQ(count(html, "<line class=\"usable\""), 1u);
  EXPECT_EQ(count(html, "<g class=\"chosen\">"), 2u);
  // The run's timeline: a path per meter, the OOM recovery marked.
  for (const char* meter : {"budget figure", "rss", "tensors"})
    EXPECT_EQ(count(html, std::string("data-meter=\"") + meter + "\""), 1u) << meter;
  EXPECT_EQ(count(html, "<g class=\"recovery\">"), tl.recoveries.size());
  ASSERT_FALSE(tl.recoveries.empty()) << "the fixture run has an OOM recovery";
  // Self-contained: no script, no external resource.
  EXPECT_EQ(html.find("<script"), std::string::npos);
  EXPECT_EQ(html.find("http://"), html.find("http://www.w3.org/2000/svg"));
  EXPECT_EQ(html.find("https://"), std::string::npos);
}

TEST(Report, ChromiumRendersItAndItsDomHoldsTheMarks) {
  ASSERT_TRUE(fs::exists(kChromium))
      << "Debian's chromium is not installed: scripts/setup installs it (apt-get install "
         "chromium)";
  const std::string dir = tu::temp_dir("report");
  const std::string html = dir + "/report.html", png = dir + "/report.png";
  auto r =
      tu::run_autotune({"report", kFixture + "/profile.json", "--run", kFixture, "--output", html});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  auto shot = chromium({"--window-size=1000,1500", "--screenshot=" + png, "file://" + html});
  ASSERT_TRUE(fs::exists(png)) << shot.err;
  auto stats =
      tu::run_python({std::string(AUTOTUNE_SOURCE_DIR) + "/tests/fixtures/png_stats.py", png});
  ASSERT_EQ(stats.exit_code, 0) << stats.err;
  const auto s = nlohmann::json::parse(stats.out);
  std::printf("screenshot %s: %s\n", png.c_str(), stats.out.c_str());
  EXPECT_EQ(s.at("width").get<int>(), 1000);
  EXPECT_GT(s.at("nonwhite_fraction").get<double>(), 0.02) << "a blank page";
  EXPECT_GT(s.at("distinct_colours").get<int>(), 8) << "no coloured series drawn";
  // The DOM as Chromium built it from the file.
  auto dom = chromium({"--dump-dom", "file://" + html});
  ASSERT_EQ(dom.exit_code, 0) << dom.err;
  for (const char* mark :
       {"<svg id=\"memory\"", "<svg id=\"speed\"", "<svg id=\"timeline\"", "class=\"trial fits\"",
        "class=\"fit-line", "<line class=\"budget\"", "<line class=\"usable\"",
        "<g class=\"chosen\">", "data-meter=\"budget figure\"", "<g class=\"recovery\">"})
    EXPECT_NE(dom.out.find(mark), std::string::npos) << mark;
}

TEST(Report, AMissingProfileOrRunIsOneLine) {
  auto r = tu::run_autotune({"report", "/nonexistent/profile.json", "--output", "/tmp/x.html"});
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("no such file"), std::string::npos) << r.err;
  auto no_run =
      tu::run_autotune({"report", kFixture + "/profile.json", "--run", tu::temp_dir("empty-run"),
                        "--output", tu::temp_dir("report-out") + "/r.html"});
  EXPECT_EQ(no_run.exit_code, 2);
  EXPECT_NE(no_run.err.find("memory.jsonl"), std::string::npos) << no_run.err;
}

TEST(Report, ALongTimelineStaysUnderItsBoundAndKeepsEveryPeak) {
  // A synthetic run of `steps` steps, four phases each: a slow ramp with three spikes, one per
  // meter, and an OOM recovery near the end. The report's size must not grow with the steps,
  // and the drawn envelope must still reach every spike.
  const uint64_t MiB = uint64_t{1} << 20;
  auto synthetic = [&](int64_t steps) {
    Timeline tl;
    for (int64_t s = 1; s <= steps; ++s)
      for (const char* phase : {"forward", "backward", "optimizer", "eval"}) {
        const uint64_t ramp = 100 * MiB + static_cast<uint64_t>(s) * 64;
        tl.points.push_back({s, phase, ramp + 10 * MiB, ramp, 0, ramp + 20 * MiB});
      }
    const size_t n = tl.points.size();
    tl.points[n / 3].budget_bytes = 900 * MiB;
    tl.points[n / 2 + 1].rss_bytes = 800 * MiB;
    tl.points[2 * n / 3 + 3].tensor_bytes = 700 * MiB;
    tl.recoveries.push_back({steps - 5, "backward", "a", "b", n - 20});
    return tl;
  };
  const Profile p = fixture_profile();
  size_t sizes[2] = {0, 0};
  int i = 0;
  for (int64_t steps : {25'000, 100'000}) {
    const Timeline tl = synthetic(steps);
    const Timeline drawn = downsample(tl);
    ASSERT_LE(drawn.points.size(), kTimelineMaxPoints);
    uint64_t budget = 0, rss = 0, tensors = 0;
    for (const auto& pt : drawn.points) {
      budget = std::max(budget, pt.budget_bytes);
      rss = std::max(rss, pt.rss_bytes);
      tensors = std::max(tensors, pt.tensor_bytes);
    }
    EXPECT_EQ(budget, 900 * MiB) << "the budget figure's spike was dropped";
    EXPECT_EQ(rss, 800 * MiB) << "the rss spike was dropped";
    EXPECT_EQ(tensors, 700 * MiB) << "the tensors' spike was dropped";
    ASSERT_EQ(drawn.recoveries.size(), 1u);
    EXPECT_LT(drawn.recoveries[0].at_point, drawn.points.size());
    const std::string html = render_report(p, &tl);
    EXPECT_EQ(count(html, "<g class=\"recovery\">"), 1u);
    sizes[i++] = html.size();
    std::printf("%lld steps (%zu phases): report %zu bytes\n", static_cast<long long>(steps),
                tl.points.size(), html.size());
  }
  EXPECT_LT(sizes[1], kReportMaxBytes) << "the stated bound (README: autotune report)";
  EXPECT_LT(static_cast<double>(sizes[1]), 1.05 * static_cast<double>(sizes[0]))
      << "four times the steps made the report grow";
  // A short timeline is drawn point by point, as it was.
  const Timeline fixture = read_timeline(kFixture);
  ASSERT_LE(fixture.points.size(), kTimelineMaxPoints);
  EXPECT_EQ(downsample(fixture).points.size(), fixture.points.size());
}
