// Bad input: one line naming the problem and the fix, exit 2 (usage) or 1 (runtime), no crash,
// no partial file. One case per row of docs/ERRORS.md.
#include <gtest/gtest.h>
#include <sys/resource.h>
#include <torch/torch.h>

#include <filesystem>
#include <fstream>

#include "autotune/token_file.h"
#include "test_support.h"

namespace tu = autotune::testing;
namespace fs = std::filesystem;

namespace {
struct Case {
  std::string name;
  std::vector<std::string> args;
  int exit_code;
  std::string needle;  // a word of the one line
};

int lines(const std::string& s) {
  int n = 0;
  for (char c : s) n += c == '\n';
  return n;
}

std::string fixture_dir() {
  static std::string dir = [] {
    std::string d = tu::temp_dir("bad-input");
    auto model = [&](const std::string& name, const std::string& json) {
      tu::write_file(d + "/" + name + ".json", json);
    };
    model("heads", R"({"n_layer":2,"n_head":3,"d_model":64,"seq_len":32,"vocab_size":256})");
    model("zero", R"({"n_layer":0,"n_head":2,"d_model":64,"seq_len":32,"vocab_size":256})");
    model("negative", R"({"n_layer":2,"n_head":2,"d_model":-64,"seq_len":32,"vocab_size":256})");
    model("absurd",
          R"({"n_layer":1024,"n_head":64,"d_model":65536,"seq_len":1048576,"vocab_size":1048576})");
    model("garbage", "{n_layer: two");
    model("wrongtype", R"({"n_layer":"two"})");
    model("unknownkey", R"({"n_layers":2})");
    // Token files
    tu::write_file(d + "/empty.tok", "");
    tu::write_file(d + "/magic.tok", std::string(64, 'x') + std::string(100, '\0'));
    const std::string good = tu::read_file(tu::corpus_path());
    tu::write_file(d + "/truncated.tok", good.substr(0, good.size() / 2));
    // A valid file with a 40-token train split: shorter than one window of gpt-tiny (65 tokens).
    tu::write_file(d + "/short.txt", std::string(44, 'a'));
    autotune::prepare_token_file({d + "/short.txt"}, d + "/short.tok", 0.1);
    tu::write_file(d + "/preset-garbage.json", "[1, 2");
    tu::write_file(d + "/preset-field.json",
                   R"({"schema":1,"kind":"preset","name":"x","mode":"sideways","start":"small",)"
                   R"("max_micro_batch":0,"precisions":["fp32"],"checkpointing":"auto",)"
                   R"("eval_batch":0,"margin_percent":5,"monitor_every_steps":10})");
    // Found by scripts/fuzz: a field of the wrong JSON type escaped as json's type_error.
    tu::write_file(d + "/preset-type.json", R"({"schema":1,"kind":["fp32","marg"],"name":"x"})");
    tu::write_file(d + "/file", "not a directory");
    return d;
  }();
  return dir;
}

std::vector<Case> cases() {
  const std::string d = fixture_dir(), data = tu::corpus_path();
  auto train = [&](std::vector<std::string> extra) {
    std::vector<std::string> a = {"train", "--model", "gpt-tiny", "--data", data, "--steps", "2"};
    a.insert(a.end(), extra.begin(), extra.end());
    return a;
  };
  auto probe = [&](const std::string& budget) {
    return std::vector<std::string>{"probe",    "--model", "gpt-tiny",      "--data",    data,
                                    "--budget", budget,    "--profile-dir", d + "/store"};
  };
  return {
      {"budget 10X", probe("10X"), 2, "unknown unit"},
      {"budget -1G", probe("-1G"), 2, "positive number"},
      {"budget 0", probe("0"), 2, "at least 1 byte"},
      {"budget empty", probe(""), 2, "--budget"},
      {"budget 1e999G", probe("1e999G"), 2, "invalid size"},
      {"budget 150%", probe("150%"), 2, "percentage"},
      {"n_head does not divide d_model", train({"--model", d + "/heads.json"}), 2, "divide"},
      {"zero size", train({"--model", d + "/zero.json"}), 2, "n_layer"},
      {"negative size", train({"--model", d + "/negative.json"}), 2, "d_model"},
      {"absurd size", train({"--model", d + "/absurd.json"}), 2, "2^40"},
      {"model JSON garbage", train({"--model", d + "/garbage.json"}), 2, "not valid JSON"},
      {"model wrong type", train({"--model", d + "/wrongtype.json"}), 2, "integer"},
      {"model unknown key", train({"--model", d + "/unknownkey.json"}), 2, "unknown key"},
      {"token file missing", train({"--data", d + "/missing.tok"}), 2, "missing.tok"},
      {"token file empty", train({"--data", d + "/empty.tok"}), 2, "empty"},
      {"token file wrong magic", train({"--data", d + "/magic.tok"}), 2, "magic"},
      {"token file truncated", train({"--data", d + "/truncated.tok"}), 2, "prepare-data"},
      {"token file shorter than a window", train({"--data", d + "/short.tok"}), 2, "seq_len"},
      {"seq_len beyond the data", train({"--seq-len", "100000000"}), 2, "seq_len"},
      {"preset garbage",
       {"probe", "--data", data, "--budget", "1G", "--preset", d + "/preset-garbage.json"},
       2,
       "not valid JSON"},
      {"preset bad field",
       {"probe", "--data", data, "--budget", "1G", "--preset", d + "/preset-field.json"},
       2,
       "'mode'"},
      {"preset field of the wrong type",
       {"probe", "--data", data, "--budget", "1G", "--preset", d + "/preset-type.json"},
       2,
       "'kind' must be a string"},
      {"unknown preset",
       {"probe", "--data", data, "--budget", "1G", "--preset", "turbo"},
       2,
       "turbo"},
      {"run dir unwritable", train({"--run-dir", d + "/file/run"}), 2, "--run-dir"},
      {"profile dir unwritable, save required",
       [&] {
         auto a = probe("1G");
         a[8] = d + "/file/store";
         a.push_back("--require-profile-save");
         return a;
       }(),
       1, "--require-profile-save"},
      {"--device cuda without one", train({"--device", "cuda"}), 2, "--device"},
      {"--device garbage", train({"--device", "tpu9"}), 2, "--device"},
      {"--resume without checkpoint", train({"--run-dir", d + "/fresh-run", "--resume"}), 2,
       "no complete checkpoint"},
      {"--resume without --run-dir", train({"--resume"}), 2, "--run-dir"},
      {"global batch unreachable", train({"--global-batch", "10", "--micro-batch", "4"}), 2,
       "not reachable"},
      {"three batch flags disagree",
       train({"--global-batch", "16", "--micro-batch", "4", "--grad-accum", "2"}), 2, "drop one"},
      {"--global-batch and --batch-tokens", train({"--global-batch", "8", "--batch-tokens", "512"}),
       2, "not both"},
      {"negative steps", train({"--steps", "-3"}), 2, "--steps"},
      {"--nproc with estimate",
       {"estimate", "--model", "gpt-tiny", "--data", data, "--nproc", "2"},
       2,
       "--nproc works with"},
      {"--shard-optimizer with estimate",
       {"estimate", "--model", "gpt-tiny", "--data", data, "--shard-optimizer", "on"},
       2,
       "--shard-optimizer works with"},
      {"train --shard-optimizer on with one process", train({"--shard-optimizer", "on"}), 2,
       "add --nproc N"},
      {"train --global-batch that does not split over the ranks",
       train({"--global-batch", "7", "--nproc", "2"}), 2, "does not split over 2 ranks"},
      {"bad --shard-optimizer",
       {"probe", "--data", data, "--budget", "1G", "--shard-optimizer", "half"},
       2,
       "use on or off"},
      {"--shard-optimizer on with one process",
       {"probe", "--data", data, "--budget", "1G", "--shard-optimizer", "on"},
       2,
       "add --nproc N"},
      {"--global-batch that does not split over the ranks",
       {"run", "--data", data, "--budget", "1G", "--global-batch", "7", "--nproc", "2"},
       2,
       "does not split over 2 ranks"},
      {"autotune trial by hand",
       {"trial", "--data", data, "--budget", "1G"},
       2,
       "autotune trial runs one trial for autotune run or probe"},
      {"bad --search",
       {"probe", "--data", data, "--budget", "1G", "--search", "random"},
       2,
       "--search"},
  };
}
}  // namespace

TEST(BadInput, EveryRowGivesOneLineAndItsExitCode) {
  const auto all = cases();
  int tried = 0;
  for (const auto& c : all) {
    // On a GPU host --device cuda is no bad input: the row tests its absence.
    if (c.name == std::string("--device cuda without one") && torch::cuda::is_available()) continue;
    auto r = tu::run_autotune(c.args);
    ++tried;
    EXPECT_EQ(r.exit_code, c.exit_code) << c.name << ": " << r.err;
    EXPECT_EQ(lines(r.err), 1) << c.name << ": " << r.err;
    EXPECT_NE(r.err.find(c.needle), std::string::npos) << c.name << ": " << r.err;
    EXPECT_EQ(r.err.find("terminate called"), std::string::npos) << c.name;
  }
  std::printf("bad inputs tried: %d\n", tried);
  // Nothing half-written anywhere in the fixture directory.
  for (auto& e : fs::recursive_directory_iterator(fixture_dir()))
    EXPECT_EQ(e.path().filename().string().find(".tmp."), std::string::npos) << e.path();
}
