#include "autotune/checkpoint.h"

#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>

#include "autotune/errors.h"
#include "util/atomic_file.h"

namespace fs = std::filesystem;

namespace autotune {

std::string checkpoint_dir(const std::string& run_dir) {
  return run_dir + "/checkpoints";
}

UsageError resume_needs_run_dir() {
  return UsageError("--resume needs --run-dir DIR (the directory of the run to continue)");
}

UsageError no_complete_checkpoint(const std::string& run_dir) {
  return UsageError("--resume: no complete checkpoint in " + checkpoint_dir(run_dir) +
                    "; start without --resume (or give --resume auto)");
}

std::string optimizer_shard_path(const std::string& run_dir, int64_t step, int rank) {
  char name[64];
  std::snprintf(name, sizeof name, "optimizer_step_%08lld.rank%d.pt", static_cast<long long>(step),
                rank);
  return checkpoint_dir(run_dir) + "/" + name;
}

std::vector<std::string> list_checkpoints(const std::string& run_dir) {
  std::vector<std::string> out;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(checkpoint_dir(run_dir), ec)) {
    const auto name = e.path().filename().string();
    if (name.rfind("step_", 0) == 0 && e.path().extension() == ".pt") out.push_back(e.path());
  }
  std::sort(out.begin(), out.end());  // zero-padded step numbers sort by step
  return out;
}

namespace {
// A writer killed mid-write (kill -9, power loss) leaves its temp file; the checkpoint it was
// writing never appeared, so the file is garbage. Remove those of processes that are gone.
void remove_stale_temp_files(const std::string& dir) {
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    const std::string name = e.path().filename().string();
    const auto at = name.find(".tmp.");
    if (at == std::string::npos) continue;
    const long pid = std::strtol(name.c_str() + at + 5, nullptr, 10);
    if (pid > 0 && pid != ::getpid() && ::kill(static_cast<pid_t>(pid), 0) != 0 && errno == ESRCH)
      fs::remove(e.path(), ec);
  }
}

// LibTorch's own file writer throws on a failed write and throws again from its destructor,
// which terminates the process (seen with a file-size limit). Our writer keeps the first error,
// lets LibTorch finish as if all went well, and reports the error afterwards; the archive is
// streamed, never held in memory whole.
void write_archive(torch::serialize::OutputArchive& archive, const std::string& tmp) {
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (fd < 0) throw RuntimeError("cannot create " + tmp + ": " + std::strerror(errno));
  int error = 0;
  try {
    archive.save_to([&](const void* data, size_t n) -> size_t {
      if (error == 0) error = write_all(fd, data, n);
      return n;
    });
  } catch (...) {
    ::close(fd);
    throw;
  }
  if (::close(fd) != 0 && error == 0) error = errno;
  if (error != 0)
    throw RuntimeError("cannot write " + tmp.substr(0, tmp.find(".tmp.")) + ": " +
                       std::strerror(error));
}
}  // namespace

void save_optimizer_shard(const std::string& run_dir, int64_t step, int rank,
                          torch::optim::Optimizer& optimizer) {
  const std::string dir = checkpoint_dir(run_dir);
  std::error_code ec;
  fs::create_directories(dir, ec);
  const std::string path = optimizer_shard_path(run_dir, step, rank);
  try {
    atomic_write_with(path, [&](const std::string& tmp) {
      torch::serialize::OutputArchive archive, optim_archive;
      optimizer.save(optim_archive);
      archive.write("optimizer", optim_archive);
      archive.write("meta", c10::IValue(nlohmann::json{{"step", step}, {"rank", rank}}.dump()));
      write_archive(archive, tmp);
    });
  } catch (const RuntimeError& e) {
    throw RuntimeError(std::string(e.what()) +
                       "; free disk space or choose another --run-dir (the previous checkpoint "
                       "is intact)");
  }
}

std::string save_checkpoint(const std::string& run_dir, const CheckpointMeta& meta,
                            torch::nn::Module& model, torch::optim::Optimizer& optimizer,
                            const torch::Tensor& loss_scaler_state, int keep) {
  const std::string dir = checkpoint_dir(run_dir);
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec)
    throw RuntimeError("cannot create checkpoint directory " + dir + ": " + ec.message() +
                       "; choose a writable --run-dir");
  remove_stale_temp_files(dir);
  char name[32];
  std::snprintf(name, sizeof name, "step_%08lld.pt", static_cast<long long>(meta.step));
  const std::string path = dir + "/" + name;

  try {
    atomic_write_with(path, [&](const std::string& tmp) {
      torch::serialize::OutputArchive archive;
      torch::serialize::OutputArchive model_archive, optim_archive;
      model.save(model_archive);
      optimizer.save(optim_archive);
      archive.write("model", model_archive);
      archive.write("optimizer", optim_archive);
      nlohmann::json m = {{"step", meta.step},
                          {"plan", meta.plan},
                          {"seed", meta.seed},
                          {"workload", meta.workload}};
      if (meta.world_size != 1) m["world_size"] = meta.world_size;
      archive.write("meta", c10::IValue(m.dump()));
      archive.write("rng_cpu", at::detail::getDefaultCPUGenerator().get_state(),
                    /*is_buffer=*/true);
      if (!meta.device.is_cpu())
        archive.write("rng_device", at::globalContext().defaultGenerator(meta.device).get_state(),
                      /*is_buffer=*/true);
      archive.write("loss_scaler", loss_scaler_state, /*is_buffer=*/true);
      write_archive(archive, tmp);
    });
  } catch (const RuntimeError& e) {
    // Disk full, a file-size limit, an I/O error: the rename never happened.
    throw RuntimeError(std::string(e.what()) +
                       "; free disk space or choose another --run-dir (the previous checkpoint "
                       "is intact)");
  }

  auto all = list_checkpoints(run_dir);
  for (size_t i = 0; keep > 0 && i + static_cast<size_t>(keep) < all.size(); ++i)
    fs::remove(all[i], ec);
  // Optimizer shards of steps older than this one whose checkpoint is gone (pruned, or never
  // written because the writer stopped between the shards and its file).
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    const std::string name = e.path().filename().string();
    long long step = 0;
    int rank = 0;
    if (std::sscanf(name.c_str(), "optimizer_step_%lld.rank%d.pt", &step, &rank) != 2) continue;
    char main_name[32];
    std::snprintf(main_name, sizeof main_name, "step_%08lld.pt", step);
    if (step < meta.step && !fs::exists(dir + "/" + main_name)) fs::remove(e.path(), ec);
  }
  return path;
}

namespace {
CheckpointMeta parse_meta(torch::serialize::InputArchive& archive) {
  c10::IValue v;
  archive.read("meta", v);
  auto m = nlohmann::json::parse(v.toStringRef());
  CheckpointMeta meta;
  meta.step = m.at("step").get<int64_t>();
  meta.plan = m.at("plan").get<Plan>();
  meta.seed = m.at("seed").get<uint64_t>();
  meta.workload = m.at("workload");
  meta.world_size = m.value("world_size", 1);
  return meta;
}
}  // namespace

std::optional<CheckpointMeta> read_checkpoint_meta(const std::string& path, std::string* why) {
  try {
    torch::serialize::InputArchive archive;
    archive.load_from(path);
    return parse_meta(archive);
  } catch (const std::exception& e) {
    if (why) {
      // LibTorch's messages carry a backtrace after the first line.
      const std::string what = e.what();
      *why = what.substr(0, what.find('\n'));
    }
    return std::nullopt;
  }
}

CheckpointMeta load_checkpoint(const std::string& path, torch::nn::Module& model,
                               torch::optim::Optimizer& optimizer, torch::Tensor* loss_scaler_state,
                               torch::Device device, const std::string& optimizer_path) {
  torch::serialize::InputArchive archive;
  archive.load_from(path);
  CheckpointMeta meta = parse_meta(archive);
  torch::serialize::InputArchive model_archive, optim_archive;
  archive.read("model", model_archive);
  if (optimizer_path.empty()) {
    archive.read("optimizer", optim_archive);
  } else {
    torch::serialize::InputArchive shard;
    shard.load_from(optimizer_path);
    shard.read("optimizer", optim_archive);
  }
  model.load(model_archive);
  optimizer.load(optim_archive);
  torch::Tensor rng;
  archive.read("rng_cpu", rng, /*is_buffer=*/true);
  at::Generator gen = at::detail::getDefaultCPUGenerator();  // a handle: shares the state
  gen.set_state(rng);
  torch::Tensor device_rng;
  if (!device.is_cpu() && archive.try_read("rng_device", device_rng, /*is_buffer=*/true)) {
    at::Generator device_gen = at::globalContext().defaultGenerator(device);  // a handle
    device_gen.set_state(device_rng);
  }
  if (loss_scaler_state) archive.read("loss_scaler", *loss_scaler_state, /*is_buffer=*/true);
  return meta;
}

}  // namespace autotune
