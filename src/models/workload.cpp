#include "autotune/workload.h"

#include <stdexcept>

namespace autotune {

Batch::Batch(torch::Tensor input, torch::Tensor target) {
  tensors.emplace("input", std::move(input));
  tensors.emplace("target", std::move(target));
}

const torch::Tensor& Batch::at(const std::string& name) const {
  const auto it = tensors.find(name);
  if (it != tensors.end()) return it->second;
  std::string names;
  for (const auto& [n, t] : tensors) names += (names.empty() ? "" : ", ") + n;
  throw std::out_of_range("the batch has no tensor '" + name + "' (it has: " + names + ")");
}

int64_t Batch::samples() const {
  return tensors.empty() ? 0 : tensors.begin()->second.size(0);
}

Batch Batch::to(torch::Device device, bool non_blocking) const {
  Batch b;
  for (const auto& [name, t] : tensors) b.tensors.emplace(name, t.to(device, non_blocking));
  return b;
}

std::vector<torch::Tensor> TrainableModel::decay_parameters() {
  std::vector<torch::Tensor> out;
  for (auto& p : parameters())
    if (p.dim() >= 2) out.push_back(p);
  return out;
}

std::vector<torch::Tensor> TrainableModel::no_decay_parameters() {
  std::vector<torch::Tensor> out;
  for (auto& p : parameters())
    if (p.dim() < 2) out.push_back(p);
  return out;
}

}  // namespace autotune
