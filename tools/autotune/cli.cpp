#include "cli.h"

#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <memory>

#include <spdlog/spdlog.h>
#include <cxxopts.hpp>

#include "autotune/checkpoint.h"
#include "autotune/distributed.h"
#include "autotune/errors.h"
#include "autotune/isolated_trials.h"
#include "autotune/run_spec.h"
#include "autotune/size.h"
#include "commands.h"
#include "report.h"
#include "run/reporter.h"

namespace autotune {

namespace {

const char* kUsage =
    "usage: autotune [run] --budget SIZE [options]   probe (or reuse a profile), then train\n"
    "       autotune probe --budget SIZE [options]   probe and write the profile; no training\n"
    "       autotune train [plan flags] [options]    train with an explicit plan\n"
    "       autotune estimate [plan flags] [options] analytic memory breakdown; runs nothing\n"
    "       autotune prepare-data --input PATH... --output FILE\n"
    "       autotune profiles list | show FILE | diff A B\n"
    "       autotune report PROFILE [--run DIR] --output FILE   draw a profile and a run\n"
    "sizes: 10G = 10 GiB (2^30 bytes), 10GB = 10^9 bytes, 512M, 0.5T, bytes, 80% of the device\n";

// Every option with its default and unit: `autotune CMD --help` prints this table.
// The defaults are read from RunSpec{}, so help and behaviour cannot disagree.
void add_common(cxxopts::Options& o) {
  auto text = [] { return cxxopts::value<std::string>(); };
  auto n = [](auto v) { return std::to_string(v); };
  const RunSpec d;
  o.add_options("common")(
      "model",
      "GPT preset (gpt-tiny, gpt-mini, gpt-10m, gpt2-small), LSTM preset (lstm-small, "
      "lstm-medium, lstm-large), a JSON config, or a TorchScript FILE.pt (docs/MODELS.md); "
      "default gpt-mini",
      text())("data",
              "token file (.tok from prepare-data, nanoGPT or llm.c .bin), or FILE.safetensors "
              "for a TorchScript model; default data/corpus.tok",
              text())("val-data",
                      "validation file; default: the data file's own split, val.bin beside a "
                      ".bin, else its last 10%",
                      text())("device", "auto | cpu | cuda[:N]; default auto", text())(
      "global-batch", "sequences per optimizer step; default " + n(kDefaultGlobalBatch), text())(
      "batch-tokens", "tokens per optimizer step, instead of --global-batch", text())(
      "steps", "optimizer steps; default " + n(d.steps), text())(
      "seed", "random seed; default " + n(d.seed), text())(
      "lr",
      "peak learning rate (warmup, then cosine to lr/10); default " + fmt::format("{:g}", d.lr),
      text())("eval-every",
              "evaluate every N steps; default " + n(d.eval_every) + " (at the end only)", text())(
      "eval-sequences", "validation sequences per evaluation; default " + n(d.eval_sequences),
      text())("log-every", "a progress line every N steps; default " + n(d.log_every), text())(
      "run-dir", "checkpoints, the memory timeline and the step log go here; default none", text())(
      "checkpoint-every",
      "checkpoint every N steps; default " + n(d.checkpoint_every) + " (at the end)", text())(
      "resume",
      "continue from the newest complete checkpoint in --run-dir; `--resume auto` starts fresh "
      "when there is none",
      cxxopts::value<std::string>()->implicit_value("yes"))(
      "budget", "memory budget: 10G = 10 GiB, 10GB = 10^9 bytes, 512M, 80% of the device", text())(
      "host-budget", "host RAM budget of an accelerator run (size); default: available RAM - 2 GiB",
      text())("margin",
              "safety margin below the budget, bytes or % of it; default " + d.margin_text,
              text())("profile-dir", "profile store; default " + d.profile_dir + "/", text())(
      "profile", "use this profile file (train: its plan; run/probe: verify and reuse it)", text())(
      "mode",
      "auto | normal | low | ultra-low; default " + to_string(d.mode) + " (from memory and budget)",
      text())("preset", "tuner policy from profiles/presets (NAME or FILE.json)", text())(
      "search", "model | power | halve; default " + d.search, text())(
      "allow-shrink", "seq,width: knobs that may change the task or the model; default none",
      text())("reprobe", "probe even if a profile matches")(
      "require-profile-save", "fail when the profile cannot be saved")(
      "json", "print one JSON summary on stdout (logs stay on stderr)")(
      "nproc",
      "data-parallel ranks to start on this host (the budget is per rank; torchrun or a "
      "cluster launcher sets WORLD_SIZE instead); default " +
          n(d.nproc),
      text())("dist-timeout",
              "seconds a collective waits for the other ranks before the run stops; default " +
                  n(d.dist_timeout_s),
              text())("step-timeout",
                      "script mode: seconds the command may run without reporting an "
                      "optimizer step (autotune.step) before it is stopped; default " +
                          n(d.step_timeout_s),
                      text())("quiet", "warnings, errors and the final summary only")(
      "verbose", "also debug lines, and the memory line at every log line")("h,help", "show help");
  auto plan = o.add_options("plan");
  for_each_knob([&](const auto& k) {
    if (*k.flag) plan(k.flag, k.help, text());  // a knob without a flag is set by its source
  });
}

// Levenshtein distance, for "did you mean".
size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<size_t> row(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    size_t diag = row[0];
    row[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      const size_t up = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diag + (a[i - 1] == b[j - 1] ? 0 : 1)});
      diag = up;
    }
  }
  return row[b.size()];
}

// The closest of `options` to `word`, or "" when none is close (at most a third of its letters
// off, at least two).
std::string closest(const std::string& word, const std::vector<std::string>& options) {
  std::string best;
  size_t best_d = std::max<size_t>(2, word.size() / 3) + 1;
  for (const auto& o : options) {
    const size_t d = edit_distance(word, o);
    if (d < best_d) {
      best_d = d;
      best = o;
    }
  }
  return best;
}

const std::vector<std::string> kCommands = {"run",          "probe",    "train",  "estimate",
                                            "prepare-data", "profiles", "report", "help"};

// Numbers are taken as text and converted here, so a bad value names its flag.
template <typename T>
T convert(const char* name, const std::string& text) {
  if constexpr (std::is_same_v<T, std::string>) {
    return text;
  } else {
    size_t used = 0;
    T v{};
    bool ok = !text.empty();
    try {
      if constexpr (std::is_same_v<T, double>)
        v = std::stod(text, &used);
      else if constexpr (std::is_same_v<T, uint64_t>)
        v = std::stoull(text, &used);
      else
        v = static_cast<T>(std::stoll(text, &used));
    } catch (const std::exception&) {
      ok = false;
    }
    if (!ok || used != text.size() || (std::is_same_v<T, uint64_t> && text[0] == '-'))
      throw UsageError(std::string("invalid --") + name + " '" + text + "': expected " +
                       (std::is_same_v<T, double> ? "a number" : "an integer"));
    return v;
  }
}
template <typename T>
void take(const cxxopts::ParseResult& r, const char* name, T& out) {
  if (r.count(name)) out = convert<T>(name, r[name].as<std::string>());
}
template <typename T>
void take(const cxxopts::ParseResult& r, const char* name, std::optional<T>& out) {
  if (r.count(name)) out = convert<T>(name, r[name].as<std::string>());
}

int64_t positive(const char* flag, int64_t v) {
  if (v < 1)
    throw UsageError(std::string("--") + flag + " must be a positive integer, got " +
                     std::to_string(v));
  return v;
}

// Script mode tunes the command's own model on its own data: the flags of a built-in workload,
// and the ones autotune does not carry to a command yet, are refused by name.
void check_script_flags(const RunSpec& s, const cxxopts::ParseResult& r) {
  if (s.command != "run" && s.command != "probe")
    throw UsageError("a command after -- works with autotune run and probe, not " + s.command);
  for (const char* flag : {"model", "data", "val-data", "batch-tokens", "seq-len", "d-model",
                           "allow-shrink", "resume", "run-dir", "checkpoint-every", "eval-every",
                           "eval-sequences", "shard-optimizer", "eval-batch", "steps", "lr"})
    if (r.count(flag))
      throw UsageError(std::string("--") + flag +
                       " is the command's own business in script mode; drop it (the command "
                       "after -- sets it itself)");
  if (s.nproc > 1)
    throw UsageError("--nproc with a command after -- is not supported yet; run one process");
}

// A pin's value from its flag's text: a count is a positive integer, a switch on or off.
void read_pin(const char* flag, const std::string& text, int64_t& v) {
  v = positive(flag, convert<int64_t>(flag, text));
}
void read_pin(const char* flag, const std::string& text, bool& v) {
  if (text != "on" && text != "off")
    throw UsageError("invalid --" + std::string(flag) + " '" + text + "': use on or off");
  v = text == "on";
}
void read_pin(const char* flag, const std::string& text, Precision& v) {
  v = parse_precision(text);
}

// Value checks of the flags, all here.
void check_values(const RunSpec& s, const std::string& command, const cxxopts::ParseResult& r) {
  if (s.global_batch) positive("global-batch", *s.global_batch);
  positive("steps", s.steps);
  if (s.batch_tokens) positive("batch-tokens", *s.batch_tokens);
  positive("nproc", s.nproc);
  positive("dist-timeout", s.dist_timeout_s);
  positive("step-timeout", s.step_timeout_s);
  if (r.count("step-timeout") && s.script.empty())
    throw UsageError("--step-timeout is for a command after --; drop it");
  if (s.nproc > 1 && command != "run" && command != "probe" && command != "train")
    throw UsageError("--nproc works with autotune run, probe and train; drop it from " + command);
  if (s.shard_optimizer && command != "run" && command != "probe" && command != "trial" &&
      command != "train")
    throw UsageError(
        "--shard-optimizer works with autotune run, probe and train (with --nproc); drop it "
        "from " +
        command);
  if (s.eval_every < 0 || s.checkpoint_every < 0 || s.eval_sequences < 0)
    throw UsageError("--eval-every, --checkpoint-every and --eval-sequences must be >= 0");
  if (!(s.lr > 0 && s.lr < 10)) throw UsageError("--lr must be in (0, 10)");
  if (s.global_batch && s.batch_tokens)
    throw UsageError("give --global-batch or --batch-tokens, not both");
  if (s.resume && s.run_dir.empty()) throw resume_needs_run_dir();
}

RunSpec spec_from(const std::string& command, const cxxopts::ParseResult& r,
                  std::vector<std::string> script) {
  RunSpec s;
  s.command = command;
  s.script = std::move(script);
  take(r, "model", s.model);
  take(r, "data", s.data);
  s.model_given = r.count("model") > 0;
  s.data_given = r.count("data") > 0;
  take(r, "val-data", s.val_data);
  take(r, "device", s.device);
  take(r, "global-batch", s.global_batch);
  take(r, "batch-tokens", s.batch_tokens);
  take(r, "steps", s.steps);
  take(r, "seed", s.seed);
  take(r, "lr", s.lr);
  take(r, "eval-every", s.eval_every);
  take(r, "eval-sequences", s.eval_sequences);
  take(r, "log-every", s.log_every);
  take(r, "run-dir", s.run_dir);
  take(r, "checkpoint-every", s.checkpoint_every);
  if (r.count("resume")) {
    const std::string v = r["resume"].as<std::string>();
    if (v != "yes" && v != "auto")
      throw UsageError("invalid --resume '" + v + "': give --resume alone, or --resume auto");
    s.resume = true;
    s.resume_auto = v == "auto";
  }
  s.quiet = r.count("quiet") > 0;
  s.verbose = r.count("verbose") > 0;
  if (s.quiet && s.verbose) throw UsageError("give --quiet or --verbose, not both");
  take(r, "budget", s.budget_text);
  take(r, "host-budget", s.host_budget_text);
  take(r, "margin", s.margin_text);
  s.margin_given = r.count("margin") > 0;
  s.mode_given = r.count("mode") > 0;
  take(r, "profile-dir", s.profile_dir);
  take(r, "profile", s.profile_file);
  take(r, "preset", s.preset);
  take(r, "search", s.search);
  s.reprobe = r.count("reprobe") > 0;
  s.require_profile_save = r.count("require-profile-save") > 0;
  s.json = r.count("json") > 0;
  take(r, "nproc", s.nproc);
  take(r, "dist-timeout", s.dist_timeout_s);
  take(r, "step-timeout", s.step_timeout_s);
  for_each_knob([&](const auto& k) {
    if (*k.flag && r.count(k.flag))
      read_pin(k.flag, r[k.flag].template as<std::string>(), (s.*k.pin).emplace());
  });
  if (r.count("mode")) {
    auto m = r["mode"].as<std::string>();
    const auto mode = parse_mode(m);
    if (!mode) throw UsageError("invalid --mode '" + m + "': use auto, normal, low or ultra-low");
    s.mode = *mode;
  }
  if (s.search != "model" && s.search != "power" && s.search != "halve")
    throw UsageError("invalid --search '" + s.search + "': use model, power or halve");
  if (r.count("allow-shrink")) {
    std::string list = r["allow-shrink"].as<std::string>();
    size_t start = 0;
    while (start <= list.size()) {
      size_t comma = list.find(',', start);
      std::string item =
          list.substr(start, comma == std::string::npos ? std::string::npos : comma - start);
      if (item == "seq")
        s.allow_shrink_seq = true;
      else if (item == "width")
        s.allow_shrink_width = true;
      else
        throw UsageError("invalid --allow-shrink item '" + item + "': use seq, width or seq,width");
      if (comma == std::string::npos) break;
      start = comma + 1;
    }
  }
  check_values(s, command, r);
  if (!s.script.empty()) check_script_flags(s, r);
  if (s.budget_text.empty() && (command == "run" || command == "probe"))
    throw UsageError("autotune " + command + " needs --budget SIZE, e.g. --budget 8G");
  if (!s.budget_text.empty()) parse_size(s.budget_text, uint64_t{1} << 40);  // syntax check
  if (!s.host_budget_text.empty()) parse_size(s.host_budget_text, uint64_t{1} << 40);
  parse_margin(s.margin_text, std::nullopt);  // its form; RunContext sets it against the budget
  return s;
}

// Script mode: everything after `--` is the user's command, not ours to parse. Returns where
// autotune's own arguments end (argc without `--`).
int split_at_dashes(int argc, char** argv, int first, std::vector<std::string>* script) {
  for (int i = first; i < argc; ++i)
    if (std::strcmp(argv[i], "--") == 0) {
      script->assign(argv + i + 1, argv + argc);
      if (script->empty())
        throw UsageError("nothing after --: give the training command, e.g. -- python train.py");
      return i;
    }
  return argc;
}

// argv[first, end) parsed by `options`, with `--resume auto` joined (cxxopts takes an optional
// value only as --resume=auto) and an unknown flag named with the closest real one.
cxxopts::ParseResult parse_flags(cxxopts::Options& options, const std::string& command, char** argv,
                                 int first, int end) {
  std::vector<char*> args = {argv[0]};
  // cxxopts takes an optional value only as --resume=auto; `--resume auto` is what people type.
  static char resume_auto[] = "--resume=auto";
  for (int i = first; i < end; ++i) {
    if (std::strcmp(argv[i], "--resume") == 0 && i + 1 < end &&
        std::strcmp(argv[i + 1], "auto") == 0) {
      args.push_back(resume_auto);
      ++i;
      continue;
    }
    args.push_back(argv[i]);
  }
  try {
    return options.parse(static_cast<int>(args.size()), args.data());
  } catch (const cxxopts::exceptions::no_such_option& e) {
    // "Option ‘xyz’ does not exist": name the closest real one.
    std::string what = e.what(), flag;
    auto a = what.find("\xe2\x80\x98"), b = what.find("\xe2\x80\x99");
    size_t quote = 3;
    if (a == std::string::npos) {  // cxxopts' plain quotes where it has no Unicode ones
      a = what.find('\'');
      b = what.find('\'', a + 1);
      quote = 1;
    }
    if (a != std::string::npos && b != std::string::npos && b > a)
      flag = what.substr(a + quote, b - a - quote);
    std::vector<std::string> names;
    for (const auto& g : options.groups())
      for (const auto& o : options.group_help(g).options)
        for (const auto& l : o.l) names.push_back(l);
    const std::string near = closest(flag, names);
    throw UsageError("unknown option --" + flag +
                     (near.empty() ? "" : ": did you mean --" + near + "?") + " (see autotune " +
                     command + " --help)");
  }
}

// --nproc N: N local ranks, each this command again without --nproc (in a launcher's
// environment instead).
int launch_nproc(const RunSpec& spec, int argc, char** argv) {
  if (std::getenv("WORLD_SIZE"))
    throw UsageError("--nproc " + std::to_string(spec.nproc) +
                     " inside a launcher that set WORLD_SIZE: give one of them");
  // Checked once here, not once per rank.
  if (spec.global_batch) check_splits_over_ranks(*spec.global_batch, spec.nproc);
  std::vector<std::string> rank_argv;
  for (int i = 0; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--nproc") {
      ++i;
      continue;
    }
    if (a.rfind("--nproc=", 0) == 0) continue;
    rank_argv.push_back(a);
  }
  setenv("AUTOTUNE_LAUNCH_COMMAND", spec.command_line.c_str(), 1);
  return launch_local_ranks(static_cast<int>(spec.nproc), rank_argv,
                            std::chrono::seconds(spec.dist_timeout_s));
}

int dispatch(int argc, char** argv) {
  std::string command = "run";
  int first = 1;
  if (argc > 1 && argv[1][0] != '-') {
    command = argv[1];
    first = 2;
  }
  if (command == "help") {
    std::fputs(kUsage, stdout);
    return kExitOk;
  }
  if (command == "prepare-data") return prepare_data_command(argc - first + 1, argv + first - 1);
  if (command == "profiles") return profiles_command(argc - first + 1, argv + first - 1);
  if (command == "report") return report_command(argc - first + 1, argv + first - 1);
  // `trial` is not for people: autotune run and probe start it for each trial (isolated_trials.h).
  if (command != "run" && command != "probe" && command != "train" && command != "estimate" &&
      command != "trial") {
    const std::string near = closest(command, kCommands);
    throw UsageError("unknown command '" + command + "'" +
                     (near.empty() ? "" : ": did you mean " + near + "?") +
                     " (commands: run, probe, train, estimate, prepare-data, profiles, report)");
  }

  cxxopts::Options options("autotune " + command, kUsage);
  add_common(options);
  std::vector<std::string> script;
  const int end = split_at_dashes(argc, argv, first, &script);
  const cxxopts::ParseResult result = parse_flags(options, command, argv, first, end);
  if (!result.unmatched().empty())
    throw UsageError("unexpected argument '" + result.unmatched()[0] + "'; see autotune --help");
  if (result.count("help")) {
    std::cout << options.help() << std::endl;
    return kExitOk;
  }
  RunSpec spec = spec_from(command, result, script);
  spec.command_line = "autotune";
  for (int i = 1; i < argc; ++i) spec.command_line += std::string(" ") + argv[i];
  // A rank started by --nproc says the launcher's command in its "run again" hint.
  if (const char* launched = std::getenv("AUTOTUNE_LAUNCH_COMMAND"); launched && *launched)
    spec.command_line = launched;
  spec.flags.assign(argv + first, argv + argc);
  if (spec.json) live_line::set_enabled(false);  // plain lines beside a machine-read stdout
  if (spec.quiet) spdlog::set_level(spdlog::level::warn);
  if (spec.verbose) spdlog::set_level(spdlog::level::debug);
  if (spec.nproc > 1) return launch_nproc(spec, argc, argv);
  if (command == "trial") return trial_command(spec);
  if (command == "train") return train_command(spec);
  if (command == "estimate") return estimate_command(spec);
  return tune_command(spec);  // run | probe
}

}  // namespace

int cli_main(int argc, char** argv) {
  init_logging_once();
  try {
    return dispatch(argc, argv);
  } catch (const UsageError& e) {
    spdlog::error("{}", e.what());
    return kExitUsage;
  } catch (const cxxopts::exceptions::exception& e) {
    spdlog::error("{}; see autotune --help", e.what());
    return kExitUsage;
  } catch (const StoppedBySignal& e) {
    spdlog::warn("{}", e.what());
    return 128 + e.signal;
  } catch (const RuntimeError& e) {
    spdlog::error("{}", e.what());
    return kExitRuntime;
  } catch (const c10::OutOfMemoryError& e) {
    spdlog::error("out of memory: {}; give a larger --budget or a smaller plan",
                  e.what_without_backtrace());
    return kExitRuntime;
  } catch (const c10::Error& e) {
    spdlog::error("libtorch error: {}", e.what_without_backtrace());
    return kExitRuntime;
  } catch (const std::exception& e) {
    spdlog::error("{}", e.what());
    return kExitRuntime;
  }
}

}  // namespace autotune
