#include "autotune/workload.h"

namespace autotune {

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
