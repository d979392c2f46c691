#include "train/memory_monitor.h"

#include <spdlog/spdlog.h>

#include "autotune/size.h"
#include "data/data_report.h"
#include "memory/cpu_allocator.h"

namespace autotune {

MemoryMonitor::MemoryMonitor(MemoryMeter& meter, MemoryMonitorOptions options)
    : meter_(meter), opt_(std::move(options)) {
  const MemorySample s = meter_.sample();
  start_ = {static_cast<uint64_t>(cpu_alloc::num_ooms()), s.device_num_ooms,
            s.device_num_alloc_retries};
  if (!opt_.timeline_path.empty()) timeline_ = JsonlLog(opt_.timeline_path);
}

void MemoryMonitor::on_start(const Plan&, const TrainOptions&, int64_t first_step) {
  if (first_step > 0) timeline_.drop_after_step(first_step);
}

void MemoryMonitor::on_phase_begin(Phase) {
  meter_.reset_peaks();
  tensor_at_begin_ = meter_.sample().tensor_bytes;
}

void MemoryMonitor::on_phase_end(Phase phase, int64_t step) {
  const MemorySample s = meter_.sample();
  PhasePeak p{step,
              phase,
              meter_.budget_figure_peak(s),
              s.peak_tensor_bytes,
              s.peak_tensor_bytes - std::min(s.peak_tensor_bytes, tensor_at_begin_),
              s.device_peak_allocated_bytes,
              s.peak_rss_bytes,
              s.peak_reserved_bytes};
  auto& agg = by_phase_[phase];
  agg.phase = phase;
  if (p.budget_bytes > agg.budget_bytes) agg.step = step;
  agg.budget_bytes = std::max(agg.budget_bytes, p.budget_bytes);
  agg.tensor_bytes = std::max(agg.tensor_bytes, p.tensor_bytes);
  agg.device_bytes = std::max(agg.device_bytes, p.device_bytes);
  agg.rss_bytes = std::max(agg.rss_bytes, p.rss_bytes);
  agg.reserved_bytes = std::max(agg.reserved_bytes, p.reserved_bytes);
  if (p.budget_bytes > peak_.budget_bytes) peak_ = p;
  if (opt_.keep_history) history_.push_back(p);
  timeline_.append({{"step", step + 1},
                    {"phase", to_string(phase)},
                    {"budget_bytes", p.budget_bytes},
                    {"tensor_bytes", p.tensor_bytes},
                    {"device_bytes", p.device_bytes},
                    {"rss_bytes", p.rss_bytes}});
  check_thresholds(s, p.budget_bytes);
}

void MemoryMonitor::check_thresholds(const MemorySample& s, uint64_t budget_figure) {
  if (warned_) return;
  if (opt_.budget_bytes && static_cast<double>(budget_figure) >
                               opt_.warn_fraction * static_cast<double>(*opt_.budget_bytes)) {
    warned_ = true;
    spdlog::warn(
        "memory at {:.0f}% of the budget ({} of {}): a longer batch may not fit; lower "
        "--micro-batch, use --precision bf16 or --checkpointing on, or raise --budget",
        100.0 * static_cast<double>(budget_figure) / static_cast<double>(*opt_.budget_bytes),
        format_bytes(budget_figure), format_bytes(*opt_.budget_bytes));
    return;
  }
  const SystemMemory sys = read_system_memory();
  const uint64_t total = sys.effective_total_bytes(), avail = sys.effective_available_bytes();
  if (total > 0 && static_cast<double>(total - std::min(total, avail)) >
                       opt_.warn_fraction * static_cast<double>(total)) {
    warned_ = true;
    spdlog::warn(
        "system memory at {:.0f}% ({} available of {}): other processes or this run may "
        "be killed; close other programs or give autotune a smaller --budget",
        100.0 * static_cast<double>(total - avail) / static_cast<double>(total),
        format_bytes(avail), format_bytes(total));
  }
}

void MemoryMonitor::on_recovery(const Recovery& r) {
  timeline_.append({{"event", "oom_recovery"},
                    {"step", r.step + 1},
                    {"phase", to_string(r.phase)},
                    {"before", r.before.describe()},
                    {"after", r.after.describe()},
                    {"eval_only", r.eval_only}});
}

MemoryMonitor::AllocatorEvents MemoryMonitor::allocator_events() const {
  const MemorySample s = meter_.sample();
  return {static_cast<uint64_t>(cpu_alloc::num_ooms()) - start_.host_ooms,
          s.device_num_ooms - std::min(s.device_num_ooms, start_.device_ooms),
          s.device_num_alloc_retries -
              std::min(s.device_num_alloc_retries, start_.device_alloc_retries)};
}

void MemoryMonitor::on_step(const StepStats& st) {
  // The budget names RSS, and the cap sees only the allocator: heap the C library keeps grows
  // RSS with no allocation to refuse. Bounded here, once a step, at the slack the memory-truth
  // test states (8 MiB).
  if (const uint64_t released = meter_.trim_heap_above(8u << 20)) {
    ++heap_trims_;
    heap_trimmed_bytes_ += released;
  }
  if (opt_.every_steps <= 0 || (st.step % opt_.every_steps != 0 && st.step != 1)) return;
  const MemorySample s = meter_.sample();
  const SystemMemory sys = read_system_memory();
  const uint64_t total = sys.effective_total_bytes();
  const uint64_t used = total - std::min(total, sys.effective_available_bytes());
  std::string budget = "-";
  if (opt_.budget_bytes)
    budget = fmt::format(
        "{:.0f}% of {}",
        100.0 * static_cast<double>(peak_.budget_bytes) / static_cast<double>(*opt_.budget_bytes),
        format_bytes(*opt_.budget_bytes));
  std::string data;
  if (opt_.data_report)
    if (std::string d = describe_data_report(opt_.data_report()); !d.empty()) data = " | data " + d;
  spdlog::info(
      "mem   step {:>5} | rss {} | tensors {}, reserved {} | system {}/{} | device {}/{} | peak {} "
      "({}){}",
      st.step, format_bytes(s.rss_bytes), format_bytes(s.tensor_bytes),
      format_bytes(s.reserved_bytes), format_bytes(used), format_bytes(total),
      format_bytes(s.device_allocated_bytes), format_bytes(s.device_reserved_bytes),
      format_bytes(peak_.budget_bytes), budget, data);
}

void MemoryMonitor::on_end(const RunSummary&) {
  if (peak_.budget_bytes == 0 || !opt_.log_summary) return;
  const AllocatorEvents ev = allocator_events();
  spdlog::info(
      "memory peak {} at step {} ({}){}; allocations refused: host {}, device {}; "
      "device allocator retries {}",
      format_bytes(peak_.budget_bytes), peak_.step + 1, to_string(peak_.phase),
      opt_.budget_bytes ? fmt::format(", {:.1f}% of the budget {}",
                                      100.0 * static_cast<double>(peak_.budget_bytes) /
                                          static_cast<double>(*opt_.budget_bytes),
                                      format_bytes(*opt_.budget_bytes))
                        : "",
      ev.host_ooms, ev.device_ooms, ev.device_alloc_retries);
}

nlohmann::json MemoryMonitor::to_json() const {
  const AllocatorEvents events = allocator_events();
  nlohmann::json phases = nlohmann::json::object();
  for (const auto& [phase, p] : by_phase_)
    phases[to_string(phase)] = {{"budget_bytes", p.budget_bytes},
                                {"tensor_bytes", p.tensor_bytes},
                                {"device_bytes", p.device_bytes},
                                {"rss_bytes", p.rss_bytes},
                                {"reserved_bytes", p.reserved_bytes}};
  uint64_t tensor = 0, device = 0, rss = 0, reserved = 0;
  for (const auto& [phase, p] : by_phase_) {
    tensor = std::max(tensor, p.tensor_bytes);
    device = std::max(device, p.device_bytes);
    rss = std::max(rss, p.rss_bytes);
    reserved = std::max(reserved, p.reserved_bytes);
  }
  return {
      {"peak_bytes", peak_.budget_bytes},
      {"peak_step", peak_.step + 1},
      {"peak_phase", to_string(peak_.phase)},
      {"phases", phases},
      {"host",
       {{"peak_tensor_bytes", tensor},
        {"peak_rss_bytes", rss},
        {"peak_reserved_bytes", reserved},
        {"baseline_bytes", meter_.baseline_bytes()}}},
      {"device", {{"peak_allocated_bytes", device}}},
      {"allocator",
       {{"host_num_ooms", events.host_ooms},
        {"heap_trims", heap_trims_},
        {"heap_trimmed_bytes", heap_trimmed_bytes_},
        {"device_num_ooms", events.device_ooms},
        {"device_num_alloc_retries", events.device_alloc_retries}}},
      {"budget_bytes", opt_.budget_bytes ? nlohmann::json(*opt_.budget_bytes) : nlohmann::json()}};
}

}  // namespace autotune
