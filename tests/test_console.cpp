// What a person sees and types: a live progress line on a terminal and plain lines elsewhere,
// every option in --help, the closest valid name for a typo, `train --profile`, `--resume auto`,
// and a summary that ends with the commands to type next.
#include <gtest/gtest.h>

#include <pty.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>

#include <nlohmann/json.hpp>

#include "test_support.h"

namespace tu = autotune::testing;
namespace fs = std::filesystem;

extern char** environ;

namespace {

std::vector<std::string> tiny_run(const std::string& store) {
  return {"--budget",       "1G", "--model", "gpt-tiny", "--data",      tu::corpus_path(),
          "--global-batch", "8",  "--steps", "20",       "--log-every", "5",
          "--profile-dir",  store};
}

// Runs the binary on a pseudo-terminal (its stderr is a TTY) and returns what it wrote there.
std::string run_on_a_terminal(std::vector<std::string> args, const std::vector<std::string>& env) {
  args = tu::on_cpu(args);
  int master = -1;
  const pid_t pid = forkpty(&master, nullptr, nullptr, nullptr);
  if (pid == 0) {
    for (const auto& e : env) putenv(const_cast<char*>(e.c_str()));
    std::vector<char*> argv = {const_cast<char*>(AUTOTUNE_BIN)};
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    execv(AUTOTUNE_BIN, argv.data());
    _exit(127);
  }
  std::string out;
  char buf[4096];
  for (;;) {
    const ssize_t n = read(master, buf, sizeof buf);
    if (n <= 0) break;  // EIO once the child has closed the terminal
    out.append(buf, static_cast<size_t>(n));
  }
  int status = 0;
  waitpid(pid, &status, 0);
  close(master);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << out;
  return out;
}

// A terminal turns each "\n" into "\r\n" (its onlcr setting): that "\r" is the terminal's.
bool has_control_characters(const std::string& s) {
  for (size_t i = 0; i < s.size(); ++i) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    if (c == '\r' && i + 1 < s.size() && s[i + 1] == '\n') continue;
    if ((c < 0x20 && c != '\n' && c != '\t') || c == 0x7f) return true;
  }
  return false;
}

}  // namespace

TEST(Console, APipeGetsPlainLinesATerminalALiveProgressLine) {
  const std::string store = tu::temp_dir("console-pipe");
  auto piped = tu::run_autotune(tiny_run(store));
  ASSERT_EQ(piped.exit_code, 0) << piped.err;
  EXPECT_FALSE(has_control_characters(piped.err)) << "control characters in a pipe";
  EXPECT_NE(piped.err.find("step    20/20"), std::string::npos) << piped.err;

  const std::string term = run_on_a_terminal(tiny_run(tu::temp_dir("console-tty")), {});
  EXPECT_NE(term.find("\r\x1b[2K"), std::string::npos) << "the bar is redrawn in place";
  EXPECT_NE(term.find("] 100% | loss "), std::string::npos) << term;
  EXPECT_NE(term.find("trial 1"), std::string::npos) << "a live line per trial";
  // NO_COLOR and --json keep a terminal plain too.
  EXPECT_FALSE(has_control_characters(
      run_on_a_terminal(tiny_run(tu::temp_dir("console-nocolor")), {"NO_COLOR=1"})));
  auto json = tiny_run(tu::temp_dir("console-json"));
  json.push_back("--json");
  const std::string with_json = run_on_a_terminal(json, {});
  const std::string err_part = with_json.substr(0, with_json.find("\n{"));
  EXPECT_EQ(err_part.find("\r\x1b[2K"), std::string::npos) << "no live line with --json";
}

TEST(Console, QuietKeepsTheSummaryVerboseAddsMemoryLines) {
  auto quiet = tiny_run(tu::temp_dir("console-quiet"));
  quiet.push_back("--quiet");
  auto q = tu::run_autotune(quiet);
  ASSERT_EQ(q.exit_code, 0) << q.err;
  EXPECT_EQ(q.err.find("step    10/20"), std::string::npos) << q.err;
  EXPECT_EQ(q.err.find("+-- settings"), std::string::npos) << q.err;
  EXPECT_NE(q.err.find("+-- what next"), std::string::npos) << q.err;
  auto verbose = tiny_run(tu::temp_dir("console-verbose"));
  verbose.push_back("--verbose");
  auto v = tu::run_autotune(verbose);
  ASSERT_EQ(v.exit_code, 0) << v.err;
  EXPECT_NE(v.err.find("mem   step     5"), std::string::npos) << "a memory line every log line";
}

TEST(Console, TheSummaryEndsWithWhyWhereAndWhatToTypeNext) {
  const std::string store = tu::temp_dir("console-next");
  auto r = tu::run_autotune(tiny_run(store));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const auto at = r.err.find("+-- what next");
  ASSERT_NE(at, std::string::npos) << r.err;
  const std::string tail = r.err.substr(at);
  for (const char* row :
       {"| chosen", "| did not fit", "| fitted, slower", "| peak / budget", "| profile",
        "next: run again", "autotune train --profile ", "autotune report "})
    EXPECT_NE(tail.find(row), std::string::npos) << row << "\n" << tail;
  EXPECT_NE(tail.find(store), std::string::npos) << "the profile's path";
}

TEST(Console, EverySubcommandsHelpNamesEachOptionWithItsDefault) {
  const std::vector<std::string> common = {"--model",
                                           "--data",
                                           "--val-data",
                                           "--device",
                                           "--global-batch",
                                           "--batch-tokens",
                                           "--steps",
                                           "--seed",
                                           "--lr",
                                           "--eval-every",
                                           "--eval-sequences",
                                           "--log-every",
                                           "--run-dir",
                                           "--checkpoint-every",
                                           "--resume",
                                           "--budget",
                                           "--host-budget",
                                           "--margin",
                                           "--profile-dir",
                                           "--profile",
                                           "--mode",
                                           "--preset",
                                           "--search",
                                           "--allow-shrink",
                                           "--reprobe",
                                           "--require-profile-save",
                                           "--json",
                                           "--quiet",
                                           "--verbose",
                                           "--micro-batch",
                                           "--grad-accum",
                                           "--precision",
                                           "--checkpointing",
                                           "--seq-len",
                                           "--d-model",
                                           "--eval-batch"};
  for (const std::string cmd : {"run", "probe", "train", "estimate"}) {
    auto r = tu::run_autotune({cmd, "--help"});
    EXPECT_EQ(r.exit_code, 0) << cmd;
    for (const auto& o : common) EXPECT_NE(r.out.find(o), std::string::npos) << cmd << " " << o;
    EXPECT_NE(r.out.find("default 200"), std::string::npos) << "defaults are named: " << r.out;
  }
  auto report = tu::run_autotune({"report", "--help"});
  EXPECT_EQ(report.exit_code, 0);
  for (const char* o : {"--run", "--output"}) EXPECT_NE(report.out.find(o), std::string::npos);
  auto prepare = tu::run_autotune({"prepare-data", "--help"});
  EXPECT_EQ(prepare.exit_code, 0);
  for (const char* o : {"--input", "--output", "--val-fraction"})
    EXPECT_NE(prepare.out.find(o), std::string::npos);
}

TEST(Console, ATypoGetsTheClosestValidName) {
  auto cmd = tu::run_autotune({"trian", "--steps", "1"});
  EXPECT_EQ(cmd.exit_code, 2);
  EXPECT_NE(cmd.err.find("did you mean train?"), std::string::npos) << cmd.err;
  auto flag = tu::run_autotune({"train", "--micro-bath", "2"});
  EXPECT_EQ(flag.exit_code, 2);
  EXPECT_NE(flag.err.find("did you mean --micro-batch?"), std::string::npos) << flag.err;
}

TEST(Console, TrainWithAProfileTrainsItsPlanAndAFlagOverridesOneKnob) {
  const std::string store = tu::temp_dir("console-profile");
  auto probe = tu::run_autotune({"probe", "--budget", "1G", "--model", "gpt-tiny", "--data",
                                 tu::corpus_path(), "--global-batch", "16", "--profile-dir", store,
                                 "--json"});
  ASSERT_EQ(probe.exit_code, 0) << probe.err;
  const auto pj = nlohmann::json::parse(probe.out);
  const std::string path = pj.at("profile").get<std::string>();
  const auto plan = pj.at("plan");
  // No --model or --data: they come from the profile too.
  auto same = tu::run_autotune({"train", "--profile", path, "--steps", "2", "--json"});
  ASSERT_EQ(same.exit_code, 0) << same.err;
  const auto sj = nlohmann::json::parse(same.out).at("plan");
  EXPECT_EQ(sj.at("micro_batch"), plan.at("micro_batch"));
  EXPECT_EQ(sj.at("grad_accum"), plan.at("grad_accum"));
  EXPECT_EQ(sj.at("precision"), plan.at("precision"));
  const auto row = same.err.find("| plan source");
  ASSERT_NE(row, std::string::npos) << same.err;
  EXPECT_NE(same.err.substr(row, same.err.find('\n', row) - row).find("| profile " + path),
            std::string::npos)
      << "the settings table says where the plan came from: " << same.err;
  const int64_t other = plan.at("micro_batch").get<int64_t>() == 2 ? 4 : 2;
  auto over = tu::run_autotune({"train", "--profile", path, "--micro-batch", std::to_string(other),
                                "--steps", "2", "--json"});
  ASSERT_EQ(over.exit_code, 0) << over.err;
  const auto oj = nlohmann::json::parse(over.out).at("plan");
  EXPECT_EQ(oj.at("micro_batch").get<int64_t>(), other);
  EXPECT_EQ(oj.at("grad_accum").get<int64_t>(), 16 / other) << "the global batch is kept";
  EXPECT_EQ(oj.at("precision"), plan.at("precision")) << "the other knobs stay the profile's";
  EXPECT_NE(over.err.find("from the command line: micro_batch (--micro-batch)"), std::string::npos)
      << over.err;
}

TEST(Console, ResumeAutoStartsFreshThenContinues) {
  const std::string dir = tu::temp_dir("console-resume");
  auto args = [&](const std::string& steps) {
    return std::vector<std::string>{"train",
                                    "--model",
                                    "gpt-tiny",
                                    "--data",
                                    tu::corpus_path(),
                                    "--global-batch",
                                    "4",
                                    "--steps",
                                    steps,
                                    "--run-dir",
                                    dir,
                                    "--resume",
                                    "auto",
                                    "--eval-sequences",
                                    "0",
                                    "--json"};
  };
  auto first = tu::run_autotune(args("3"));
  ASSERT_EQ(first.exit_code, 0) << first.err;
  EXPECT_EQ(nlohmann::json::parse(first.out).at("first_step").get<int64_t>(), 0);
  auto second = tu::run_autotune(args("6"));
  ASSERT_EQ(second.exit_code, 0) << second.err;
  EXPECT_EQ(nlohmann::json::parse(second.out).at("first_step").get<int64_t>(), 3);
  // --resume alone still refuses an empty directory.
  auto plain = tu::run_autotune({"train", "--model", "gpt-tiny", "--data", tu::corpus_path(),
                                 "--run-dir", tu::temp_dir("console-empty"), "--resume"});
  EXPECT_EQ(plain.exit_code, 2) << plain.err;
}
