// argv/envp for exec from strings: what the rank launcher and the runners of child processes
// (isolated trials, script mode) hand to execve.
#pragma once
#include <string>
#include <vector>

namespace autotune {

// Pointers into `v` (which must outlive them), null-terminated.
inline std::vector<char*> c_strings(std::vector<std::string>& v) {
  std::vector<char*> out;
  for (auto& s : v) out.push_back(s.data());
  out.push_back(nullptr);
  return out;
}

}  // namespace autotune
