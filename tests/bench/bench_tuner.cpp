// Tuner benchmark (issue 4): for each workload, an exhaustive grid (micro-batch x precision x
// checkpointing, every plan measured with the same trial the tuner uses) gives the oracle; then
// for tight / medium / loose budgets each strategy (model, power, halve) is run under the CPU cap
// and scored: trials, seconds, plan quality (grid tokens/s of its plan / oracle's), and the full
// run's measured peak / budget. Prints a table and writes JSON.
//
//   build/tests/bench/bench_tuner --data data/corpus.tok [--models gpt-mini,gpt-10m,lstm-small]
//                                 [--steps 20] [--out docs/bench_tuner.json]
#include <cstdio>
#include <fstream>
#include <map>
#include <sstream>

#include <nlohmann/json.hpp>

#include "autotune/gpt_workload.h"
#include "autotune/lstm_workload.h"
#include "autotune/memory.h"
#include "autotune/memory_monitor.h"
#include "autotune/trainer.h"
#include "autotune/tuner.h"

using namespace autotune;

namespace {
constexpr double kMiB = 1048576.0;

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) out.push_back(item);
  return out;
}

// RssAnon / RssFile of this process in MiB, to tell heap growth from mapped-file pages.
std::string rss_parts() {
  std::ifstream f("/proc/self/status");
  std::string line, out;
  while (std::getline(f, line))
    if (line.rfind("RssAnon:", 0) == 0 || line.rfind("RssFile:", 0) == 0)
      out += line.substr(0, 8) + std::to_string(std::stoll(line.substr(8)) / 1024) + " ";
  return out;
}

std::unique_ptr<Workload> make(const std::string& name, const std::string& data) {
  if (name.rfind("lstm", 0) == 0) return std::make_unique<LstmWorkload>(load_lstm_config(name), 1);
  return std::make_unique<GptWorkload>(load_gpt_config(name), TokenFile::open(data), 1);
}
}  // namespace

int main(int argc, char** argv) {
  std::string data = "data/corpus.tok", models = "gpt-mini,gpt-10m,lstm-small", out;
  int64_t full_steps = 20, global_batch = 32;
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string k = argv[i], v = argv[i + 1];
    if (k == "--data")
      data = v;
    else if (k == "--models")
      models = v;
    else if (k == "--steps")
      full_steps = std::stoll(v);
    else if (k == "--global-batch")
      global_batch = std::stoll(v);
    else if (k == "--out")
      out = v;
  }
  MemoryMeter meter(torch::kCPU);
  nlohmann::json report = nlohmann::json::array();
  std::printf("%-10s %-7s %-6s %6s %8s %-44s %8s %9s %9s\n", "workload", "budget", "search",
              "trials", "seconds", "plan", "oracle", "peak/bdg", "base MiB");
  for (const auto& name : split(models)) {
    auto w = make(name, data);
    // ---- the oracle grid, measured without a cap ----
    cpu_alloc::set_cap(std::nullopt);
    meter.remeasure_baseline();
    ProbeOptions free_probe;
    free_probe.usable_bytes = UINT64_MAX;
    // fp32 first. A bf16 plan is stopped once it is proven slower than half the slowest fp32
    // plan (bf16 matmuls run ~70x slower on a CPU without AVX-512-BF16/AMX): such a plan could be
    // the oracle only at a budget no fp32 plan fits, which the budgets below never are.
    std::vector<Trial> grid;
    double slowest_fp32 = 0;
    for (Precision prec : {Precision::fp32, Precision::bf16})
      for (bool ckpt : {false, true})
        for (int64_t mb : divisors(global_batch)) {
          if (ckpt && !w->knobs().checkpointing) continue;
          Plan p;
          p.micro_batch = mb;
          p.grad_accum = global_batch / mb;
          p.precision = prec;
          p.checkpointing = ckpt;
          ProbeOptions po = free_probe;
          if (prec != Precision::fp32) po.stop_below_tokens_per_s = 0.5 * slowest_fp32;
          grid.push_back(run_trial(*w, p, po, meter));
          const Trial& t = grid.back();
          std::fprintf(stderr, "grid %s %s: %s, peak %.1f MiB, %.0f tokens/s\n", name.c_str(),
                       p.describe().c_str(), t.reason.c_str(), t.peak_bytes / kMiB, t.tokens_per_s);
          if (prec == Precision::fp32 && t.fits)
            slowest_fp32 =
                slowest_fp32 == 0 ? t.tokens_per_s : std::min(slowest_fp32, t.tokens_per_s);
        }
    uint64_t lo = UINT64_MAX, hi = 0;
    for (const auto& t : grid) {
      if (!t.fits) continue;  // stopped as too slow: its peak is partial
      lo = std::min(lo, t.peak_bytes);
      hi = std::max(hi, t.peak_bytes);
    }
    auto grid_tps = [&](const Plan& p) {
      for (const auto& t : grid)
        if (t.plan.micro_batch == p.micro_batch && t.plan.precision == p.precision &&
            t.plan.checkpointing == p.checkpointing)
          return t.tokens_per_s;
      return 0.0;
    };
    // Budgets between the smallest and the largest plan's peak; usable = 95% of the budget.
    const std::vector<std::pair<std::string, double>> budgets = {
        {"tight", 0.15}, {"medium", 0.45}, {"loose", 1.10}};
    for (const auto& [label, frac] : budgets) {
      const uint64_t budget =
          static_cast<uint64_t>(static_cast<double>(lo) + frac * static_cast<double>(hi - lo)) +
          (4u << 20);
      const uint64_t usable = budget - budget / 20;
      double oracle = 0;
      for (const auto& t : grid)
        if (t.fits && t.peak_bytes <= usable) oracle = std::max(oracle, t.tokens_per_s);
      for (const std::string search : {"model", "power", "halve"}) {
        // Each strategy starts from the same process state: the previous full run's freed heap
        // goes back to the kernel (as every trial does), or the baseline would creep by 30-70 MiB.
        meter.release_cache();
        meter.remeasure_baseline();
        std::fprintf(stderr, "before %s %s: baseline %.1f MiB, %s, tensors %.1f MiB\n",
                     label.c_str(), search.c_str(), meter.baseline_bytes() / kMiB,
                     rss_parts().c_str(), cpu_alloc::current_bytes() / kMiB);
        TunerRequest r;
        r.global_batch = global_batch;
        r.budget_bytes = budget;
        r.usable_bytes = usable;
        r.search = search;
        r.probe.usable_bytes = usable;
        if (search != "model") r.precision = Precision::fp32;
        cpu_alloc::set_cap(static_cast<int64_t>(usable - meter.baseline_bytes()));
        TunerResult res = tune(*w, r, meter);
        nlohmann::json row = {{"workload", name},
                              {"budget", label},
                              {"budget_bytes", budget},
                              {"search", search},
                              {"trials", res.trials.size()},
                              {"baseline_bytes", meter.baseline_bytes()},
                              {"trial_log", res.trials},
                              {"seconds", res.probe_seconds},
                              {"oracle_tokens_per_s", oracle}};
        std::string plan = "infeasible";
        double quality = 0, use = 0;
        if (res.plan) {
          plan = res.plan->describe();
          quality = oracle > 0 ? grid_tps(*res.plan) / oracle : 0;
          // The full run under the same cap: its measured peak against the budget.
          TrainOptions opt;
          opt.steps = full_steps;
          opt.eval_sequences = res.plan->micro_batch;
          MemoryMonitorOptions mo;
          mo.every_steps = 0;
          MemoryMonitor monitor(meter, mo);
          try {
            train(*w, *res.plan, opt, {&monitor});
            use = static_cast<double>(monitor.peak_budget_bytes()) / static_cast<double>(budget);
          } catch (const std::exception& e) {
            use = -1;  // the full run failed
          }
          row["plan"] = *res.plan;
          row["oracle_ratio"] = quality;
          row["peak_over_budget"] = use;
        }
        cpu_alloc::set_cap(std::nullopt);
        std::printf("%-10s %-7s %-6s %6zu %8.1f %-44s %8.3f %9.3f %9.1f\n", name.c_str(),
                    label.c_str(), search.c_str(), res.trials.size(), res.probe_seconds,
                    plan.c_str(), quality, use, meter.baseline_bytes() / kMiB);
        std::fflush(stdout);
        report.push_back(row);
      }
    }
    nlohmann::json grid_json = grid;
    report.push_back({{"workload", name}, {"grid", grid_json}});
  }
  if (!out.empty()) std::ofstream(out) << report.dump(2) << "\n";
  return 0;
}
